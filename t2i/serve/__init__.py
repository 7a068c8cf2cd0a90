"""``t2i serve``: an HTTP server speaking OpenAI's images API, with dynamic batching and a web page.

Needs the ``serve`` extra (``pip install -e .[serve]``: FastAPI and uvicorn)."""

from t2i.serve.app import ModelRegistry, ServeConfig, create_app
from t2i.serve.batcher import Batcher, Job, QueueFull
from t2i.serve.schemas import GenerationRequest, Limits
