"""The HTTP server: OpenAI's images API over any model ``t2i generate`` can load, with dynamic batching.

Routes (all but ``/healthz`` and the page shell ``/`` need the API key when one is set):

    POST /v1/images/generations   OpenAI request/response shape, plus seed/steps/guidance/sampler/negative_prompt
    GET  /v1/models               the served models, with their defaults and sizes
    GET  /v1/progress/{id}        queued/running/done and the sampler step of a request sent with ``request_id``
    GET  /files/{name}            the PNGs of ``response_format: "url"`` responses (only from the output folder)
    GET  /metrics                 queue depth, batch sizes, latency percentiles, images served (JSON or Prometheus)
    GET  /healthz                 liveness (no key needed)
    GET  /                        the web page (a static shell; its API calls carry the key the user types in)

Why FastAPI on uvicorn: it is the ASGI stack the Python serving field uses, pydantic (already how the project
validates configs) gives exact field errors, and ``/docs`` documents the API for free. Bodies are read and parsed
by hand, not by FastAPI's body injection, so a size limit is enforced while reading and malformed JSON, wrong types
and unknown fields all get OpenAI-shaped 4xx answers.

A request never names a file to load: its ``model`` must be one of the server's ``--model`` ids or on its
``--allow-model`` list (those load on first use), so a client cannot make the server read arbitrary paths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2i.serve.batcher import Aborted, Batcher, Job, QueueFull
from t2i.serve.edits import ControlInputs, EditInputs, decode_controls, parse_edit
from t2i.serve.metrics import Metrics
from t2i.serve.schemas import (
    APIError,
    GenerationRequest,
    Limits,
    check_limits,
    edit_schema,
    parse_request,
    request_schema,
    validation_error,
)

log = logging.getLogger("t2i.serve")
STATIC = Path(__file__).parent / "static"
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}\.png")

_ERROR_BODY = {
    "description": "an error in OpenAI's shape",
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    }}},
}  # fmt: skip
_WHY = {
    400: "malformed JSON, or a value this server's limits or the model cannot take (the message names the field)",
    401: "missing or wrong API key",
    404: "no such model, request id or file",
    405: "method not allowed",
    413: "request body too large",
    415: "the body is not application/json",
    422: "a field of the wrong type, out of range, or unknown",
    429: "the queue is full; retry after the Retry-After seconds",
    500: "an internal error (the message holds an id to find in the server log, nothing else)",
    504: "the request did not finish within the server's timeout",
}


def _errors(*codes: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route can answer (schemathesis checks them)."""
    return {c: {**_ERROR_BODY, "description": _WHY[c]} for c in (*codes, 401, 405, 500)}


@dataclass
class ServeConfig:
    """Everything ``t2i serve`` sets; the defaults are the CLI's."""

    models: list[str] = field(default_factory=list)  # loaded at start; the first is the default (CLI: sd3-shapes)
    allow_models: list[str] = field(default_factory=list)  # more ids a request may name; loaded on first use
    api_keys: list[str] = field(default_factory=list)
    output_dir: Path = Path("out/serve")
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 16
    batch_window_ms: float = 50.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    batching: bool = True
    # response_format=url: the URL prefix clients are given (default: the address the server is bound to; never the
    # request's Host header, which any client can set), and how long the PNGs are kept before they are deleted
    public_url: str | None = None
    url_ttl_s: float = 3600.0


class ModelRegistry:
    """The models a request may name: the served ones (loaded at start) and the allow-listed (loaded lazily)."""

    def __init__(self, served: list[str], allowed: list[str], preloaded: dict[str, Any] | None = None):
        self.ids = list(dict.fromkeys([*served, *(preloaded or {}), *allowed]))
        if not self.ids:
            raise ValueError("serve at least one model")
        self.served = [m for m in self.ids if m not in allowed or m in served]
        self.loaded: dict[str, Any] = dict(preloaded or {})

    @property
    def default(self) -> str:
        return self.ids[0]

    def get(self, model_id: str):
        """The generator for ``model_id`` (loading it if allow-listed); runs in the model thread."""
        if model_id not in self.ids:
            raise KeyError(model_id)
        if model_id not in self.loaded:
            from t2i.pipelines.folders import load_generator

            log.info("loading model %s", model_id)
            self.loaded[model_id] = load_generator(model_id)
        return self.loaded[model_id]


# the request field that carries each Settings field (errors name the field the client sent)
_REQUEST_FIELD = {"negative": "negative_prompt", "init_image": "image", "control": "controls",
                  "controlnet": "controls"}  # fmt: skip


def _settings(gen, req: GenerationRequest, edit=None, controls=None):
    """The request's sampling settings over the model's defaults (``Generator.settings``, as the CLI uses it);
    400 naming the field when one is impossible. Being frozen and hashable, they are the batch key's second half:
    jobs batch together only when the model and all of them are equal."""
    from t2i.pipelines.generator import SettingsError

    try:
        side = req.side()
    except ValueError as err:
        raise APIError(400, str(err), param="size") from None
    try:
        s = gen.settings(
            steps=req.steps,
            guidance=req.guidance,
            sampler=req.sampler,
            size=side,
            negative=req.negative_prompt or None,
            extra=edit.settings_extra() if edit else None,
        )
        if edit is not None:
            gen.check_edits(edit.image, edit.mask)
        if controls is not None:
            gen.check_controls(list(controls.controls))
        return s
    except SettingsError as err:
        param = _REQUEST_FIELD.get(err.field, err.field)
        raise APIError(400, f"{param}: {err}", param=param) from None


def create_app(cfg: ServeConfig | None = None, *, generators: dict[str, Any] | None = None) -> FastAPI:
    """The ASGI app. ``generators`` (id -> Generator) serves already-loaded models (tests, notebooks)."""
    from t2i.diffusion import SAMPLERS

    cfg = cfg or ServeConfig()
    registry = ModelRegistry(cfg.models, cfg.allow_models, generators)
    # a request larger than the whole queue would get 429 for ever and clients that honour Retry-After would loop:
    # it is a 400 instead ("at most N images per request")
    limits = replace(cfg.limits, max_n=min(cfg.limits.max_n, cfg.max_batch, cfg.max_queue))
    metrics = Metrics()
    out_dir = Path(cfg.output_dir)
    sweeper = _Sweeper(out_dir, cfg.url_ttl_s)
    keys = [k for k in cfg.api_keys if k]

    def run_batch(key, prompts, seeds, progress):
        import torch

        model_id, settings, *inputs = key
        images: dict[str, Any] = {}
        for extra in inputs:
            if isinstance(extra, EditInputs):
                images.update(init_images=extra.image, masks=extra.mask)
            elif isinstance(extra, ControlInputs):
                images["controls"] = list(extra.controls)
        with torch.no_grad():  # this thread only; never the process-wide switch
            return registry.get(model_id).generate(prompts, seeds, settings, callback=progress, **images)

    batcher = Batcher(run_batch, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1000,
                      max_queue=cfg.max_queue, batching=cfg.batching, on_batch=metrics.on_batch)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        for model_id in registry.served:
            await batcher.call(registry.get, model_id)  # fail at start, not at the first request
        yield
        await batcher.stop()

    app = FastAPI(title="t2i", summary="OpenAI-compatible text-to-image API", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.registry, app.state.config = batcher, metrics, registry, cfg

    # -- errors: always OpenAI's shape ------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        if request.url.path.startswith("/v1/images"):
            metrics.on_response(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        e = validation_error(list(err.errors()))
        return JSONResponse(e.body(), status_code=e.status)

    # an unexpected error is answered inside the app, as an ordinary response: Starlette's last-resort handler
    # re-raises after answering, which made uvicorn drop the (keep-alive) connection and skip the metrics
    app.add_middleware(_ContainErrors, on_error=metrics.on_response)

    # -- auth -------------------------------------------------------------------------------------------------

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    # -- routes -----------------------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok", "models": sorted(registry.loaded)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models", responses=_errors())
    async def list_models(request: Request):
        authorize(request)
        data = []
        for model_id in registry.ids:
            entry: dict[str, Any] = {"id": model_id, "object": "model", "created": int(metrics.started),
                                     "owned_by": "t2i", "loaded": model_id in registry.loaded}  # fmt: skip
            gen = registry.loaded.get(model_id)
            if gen is not None:
                d = gen.defaults
                entry["defaults"] = {"steps": d.steps, "guidance": d.guidance, "sampler": d.sampler,
                                     "size": f"{d.size}x{d.size}", **d.options}  # fmt: skip
                entry["presets"] = sorted(gen.presets())
                entry["samplers"] = sorted(SAMPLERS)
            data.append(entry)
        return {"object": "list", "data": data}

    @app.get("/v1/progress/{request_id}", responses=_errors(404, 422))
    async def progress(request_id: str, request: Request):
        authorize(request)
        state = batcher.progress(request_id)
        if state is None:
            raise APIError(404, f"no request with request_id {request_id!r} is queued or recent", param="request_id")
        return state

    @app.get(
        "/metrics",
        responses={
            **_errors(422),
            200: {
                "description": "counters, histograms and latencies",
                "content": {"application/json": {}, "text/plain": {}},
            },
        },
    )
    async def get_metrics(request: Request, format: Literal["json", "prometheus"] = "json"):
        authorize(request)
        if format == "prometheus":
            return PlainTextResponse(metrics.prometheus(batcher), media_type="text/plain; version=0.0.4")
        return metrics.snapshot(batcher)

    @app.get(
        "/files/{name}",
        responses={**_errors(404), 200: {"content": {"image/png": {}}, "description": "a PNG this server wrote"}},
    )
    async def files(name: str, request: Request):
        authorize(request)
        path = (out_dir / name).resolve()
        if not _FILE_NAME.fullmatch(name) or path.parent != out_dir.resolve() or not path.is_file():
            raise APIError(404, "no such file", code="file_not_found")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/images/generations", responses=_errors(400, 404, 413, 415, 422, 429, 504),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": request_schema(limits, list(SAMPLERS))}}}})  # fmt: skip
    async def generations(request: Request):
        authorize(request)
        # control images may make a body as large as an upload; any other body keeps the small limit
        obj = await _read_json(request, max(limits.max_body_bytes, limits.max_upload_bytes), limits.max_body_bytes)
        return await _serve(request, parse_request(obj))

    @app.post("/v1/images/edits", responses=_errors(400, 404, 413, 415, 422, 429, 504),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": edit_schema(limits, list(SAMPLERS))}}}})  # fmt: skip
    async def edits(request: Request):
        """OpenAI's image edits: the multipart ``image`` (+ optional ``mask``) repainted from ``prompt``."""
        authorize(request)
        req, edit = await parse_edit(request, limits.max_upload_bytes)
        return await _serve(request, req, edit)

    async def _serve(request: Request, req: GenerationRequest, edit: EditInputs | None = None):
        """Queue a generation or edit request, wait for its images and answer in OpenAI's shape."""
        t0 = time.perf_counter()
        check_limits(req, limits)
        model_id = req.model or registry.default
        if model_id not in registry.ids:
            raise APIError(404, f"model {model_id!r} is not served here; GET /v1/models lists the ones that are",
                           param="model", code="model_not_found")  # fmt: skip
        gen = registry.loaded.get(model_id) or await batcher.call(registry.get, model_id)
        controls = decode_controls(req.controls)
        s = _settings(gen, req, edit, controls)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31 - req.n)
        # an edit or controls batch only with themselves (their images are part of the key, by identity)
        key = (model_id, s, *(x for x in (edit, controls) if x is not None))
        job = Job(key, req.prompt, [seed + k for k in range(req.n)], request_id=req.request_id)
        try:
            batcher.submit(job)
        except QueueFull as full:
            metrics.rejected_queue_full += 1
            raise APIError(429, f"the server is busy ({batcher.queued_images} images queued); retry after "
                           f"{full.retry_after} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None  # fmt: skip
        images = await _wait(job, request)
        if images is None:  # the client went away; nobody reads this response
            metrics.on_response(499)
            return Response(status_code=499)
        if req.response_format == "url":
            await asyncio.to_thread(sweeper.sweep)
        data = await asyncio.to_thread(_encode, images, job, req, gen.name, s, _base_url(request, cfg), out_dir)
        body = {"created": int(time.time()), "data": data,
                "t2i": {"model": model_id, "steps": s.steps, "guidance": s.guidance, "sampler": s.sampler,
                        "size": f"{s.size}x{s.size}", "negative_prompt": s.negative,
                        "seeds": job.seeds, **s.options}}  # fmt: skip
        metrics.on_response(200, images=len(data), latency=time.perf_counter() - t0)
        return JSONResponse(body)

    async def _wait(job: Job, request: Request):
        """The job's images; None if the client disconnected; 504 past the request timeout."""
        deadline = time.perf_counter() + cfg.request_timeout_s
        while True:
            left = deadline - time.perf_counter()
            done, _ = await asyncio.wait({job.future}, timeout=max(0.0, min(0.2, left)))
            if done:
                try:
                    return job.future.result()
                except Aborted:
                    return None
                except Exception as err:
                    raise internal_error("sampling failed", err) from err
            if await request.is_disconnected():
                batcher.cancel(job)
                metrics.cancelled += 1
                job.future.cancel()
                return None
            if time.perf_counter() >= deadline:
                batcher.cancel(job)
                metrics.timeouts += 1
                job.future.cancel()
                raise APIError(504, f"the request did not finish within {cfg.request_timeout_s:g} s",
                               type="timeout_error", code="timeout")  # fmt: skip

    return app


def _base_url(request: Request, cfg: ServeConfig) -> str:
    """Where clients fetch ``/files/...``: the configured public URL, else the socket the request arrived on."""
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    server = request.scope.get("server")
    if not server:
        return ""  # no socket (an in-process client): a path-only URL
    host, port = server[0], server[1]
    host = f"[{host}]" if ":" in host else host
    return f"{request.url.scheme}://{host}:{port}"


class _Sweeper:
    """Deletes response_format=url PNGs older than ``ttl`` seconds: at most one pass a minute, when new ones come."""

    def __init__(self, folder: Path, ttl: float, every: float = 60.0):
        self.folder, self.ttl, self.every, self.last = folder, ttl, every, -math.inf

    def sweep(self) -> int:
        now = time.time()
        if now - self.last < min(self.every, self.ttl) or not self.folder.is_dir():
            return 0
        self.last, gone = now, 0
        for path in self.folder.iterdir():
            if _FILE_NAME.fullmatch(path.name) and now - path.stat().st_mtime > self.ttl:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    gone += 1
        return gone


def internal_error(what: str, err: BaseException) -> APIError:
    """A 500 that names an id to find in the server log, and nothing of the exception (it may hold paths)."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s [error id %s]", what, ref, exc_info=(type(err), err, err.__traceback__))
    return APIError(500, f"{what}: an internal error; the server log has the details under error id {ref}",
                    type="server_error", code="internal_error")  # fmt: skip


class _ContainErrors:
    """ASGI middleware: an exception no handler took becomes a logged, counted 500 in OpenAI's error shape."""

    def __init__(self, app, on_error):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as err:
            e = internal_error(f"{scope.get('method', '')} {scope.get('path', '')}", err)
            self.on_error(500)
            if started:  # half a response is on the wire: nothing to do but end the connection
                raise
            await JSONResponse(e.body(), status_code=500)(scope, receive, send)


async def _read_json(request: Request, max_bytes: int, plain_max_bytes: int | None = None) -> Any:
    """The body as JSON, read at most ``max_bytes`` (413 beyond); 400 for a body that is not JSON. A body over
    ``plain_max_bytes`` is accepted only when it carries ``controls`` (control images)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {max_bytes}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"the request body is over the {max_bytes}-byte limit", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        # a browser sends text/plain cross-origin without asking first (no CORS preflight): never read it as JSON
        raise APIError(415, f"the request body must be sent as application/json, got {media or 'no content-type'!r}",
                       code="unsupported_media_type")  # fmt: skip
    if not raw.strip():
        raise APIError(400, 'the request body is empty; send JSON such as {"prompt": "a red circle"}')
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # thousands of nested brackets: refuse them, never a 500
        raise APIError(400, "the request body nests too deeply to be a request", code="invalid_json") from None
    except ValueError as err:  # JSONDecodeError, a non-UTF-8 body, an integer of more than 4300 digits, NaN
        reason = str(err).splitlines()[0][:200]
        raise APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json") from None
    if (
        plain_max_bytes is not None
        and len(raw) > plain_max_bytes
        and not (isinstance(obj, dict) and obj.get("controls"))
    ):
        raise APIError(413, f"the request body is over the {plain_max_bytes}-byte limit (only requests with control "
                       f"images may be larger, up to {max_bytes} bytes)", code="body_too_large")  # fmt: skip
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json reads NaN and Infinity unless told not to


def _encode(images, job: Job, req: GenerationRequest, model_name: str, s, base_url: str, out_dir: Path):
    """One OpenAI image object per image: base64 PNG, or a PNG in ``out_dir`` and its URL. PNGs carry their
    settings in the ``parameters`` chunk, as ``t2i generate`` writes them."""
    from t2i.io.png import format_parameters, png_bytes, to_pil

    data = []
    for image, seed in zip(images, job.seeds, strict=True):
        png = png_bytes(
            to_pil(image), format_parameters(req.prompt, s.describe(model_name, seed), req.negative_prompt)
        )
        item: dict[str, Any] = {"seed": seed}
        if req.response_format == "b64_json":
            item["b64_json"] = base64.b64encode(png).decode("ascii")
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            name = f"{int(time.time())}-{uuid.uuid4().hex[:12]}-{seed}.png"
            tmp = out_dir / f".{name}.tmp"
            tmp.write_bytes(png)
            os.replace(tmp, out_dir / name)  # atomic: a client never fetches half a file
            item["url"] = f"{base_url.rstrip('/')}/files/{name}"
        data.append(item)
    return data
