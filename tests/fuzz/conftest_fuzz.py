"""A live t2i server for the fuzz tests (a plain module: conftest fixtures cannot be imported)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn


@contextmanager
def live_api(model_folder: str, output_dir, limits):
    from t2i.serve.app import ServeConfig, create_app
    from t2i.serve.guard import uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(models=[model_folder], api_keys=["fuzz"], output_dir=output_dir, limits=limits,
                      batch_window_ms=0, max_batch=2, max_queue=4, request_timeout_s=60)  # fmt: skip
    server = uvicorn.Server(uvicorn_config(create_app(cfg), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the fuzz server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
