"""``t2i serve``: the HTTP API (OpenAI images protocol) and web page over any model ``t2i generate`` loads.

    t2i serve --model sd3-shapes                          # http://127.0.0.1:8000/
    T2I_API_KEY=secret t2i serve --host 0.0.0.0 --port 8000
    curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
         -d '{"prompt": "a red circle above a blue square", "n": 2, "seed": 7}'
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP (OpenAI images API) with a web page",
        description="Serve models over HTTP: POST /v1/images/generations (OpenAI's shape), GET /v1/models, "
        "/metrics, /healthz, and a web page at /. Needs the serve extra: pip install -e '.[serve]'.",
    )
    p.add_argument("--model", action="append", dest="models",
                   help="a model to load at start (shipped name, model folder, or SD3 file/folder); repeatable, "
                        "the first is the default (default: sd3-shapes)")  # fmt: skip
    p.add_argument("--allow-model", action="append", default=[], dest="allow_models",
                   help="a further model id a request may name; loaded on first use (repeatable). Requests can "
                        "never name anything else")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        dest="api_keys",
        help="require 'Authorization: Bearer <key>' (repeatable; also $T2I_API_KEY, comma-separated)",
    )
    p.add_argument("--output-dir", default="out/serve", help="where response_format=url images go (out/serve)")
    p.add_argument("--public-url", help="URL prefix of response_format=url links (default: the bound address; the "
                   "request's Host header is never used)")  # fmt: skip
    p.add_argument("--url-ttl", type=float, default=3600.0,
                   help="seconds response_format=url images are kept before deletion (default 3600)")  # fmt: skip
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at most; beyond, the oldest one still sending its request is dropped",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's headers and body (default 10)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="most images per sampling call (default 16)")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=50.0,
        help="how long the oldest request waits for others to batch with (default 50 ms)",
    )
    p.add_argument("--no-batching", action="store_true", help="run every request alone")
    p.add_argument("--max-queue", type=int, default=64, help="most images waiting before 429 (default 64)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds (default 300)")
    p.add_argument("--max-n", type=int, default=8, help="most images per request (default 8)")
    p.add_argument("--max-steps", type=int, default=100, help="most sampler steps per request (default 100)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from pathlib import Path

    from t2i.cli.main import CLIError
    from t2i.serve.app import ServeConfig
    from t2i.serve.schemas import Limits

    for flag in ("max_batch", "max_queue", "max_n", "max_steps"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.timeout <= 0 or args.batch_window_ms < 0:
        raise CLIError("--timeout must be > 0 and --batch-window-ms >= 0")
    if args.max_connections < 1 or not args.read_timeout > 0:
        raise CLIError("--max-connections must be at least 1 and --read-timeout > 0")
    if not args.url_ttl > 0:
        raise CLIError(f"--url-ttl must be > 0 seconds, got {args.url_ttl}")
    if args.public_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", args.public_url):
        raise CLIError(f"--public-url must be an http(s) URL such as https://example.org/t2i, got {args.public_url!r}")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1-65535, got {args.port}")
    if any(not k.strip() for k in args.api_keys):
        raise CLIError("--api-key is empty; give a secret (an empty key would silently turn authentication off)")
    keys = [*args.api_keys, *(k.strip() for k in os.environ.get("T2I_API_KEY", "").split(",") if k.strip())]
    return ServeConfig(
        models=args.models or ["sd3-shapes"],
        allow_models=args.allow_models,
        api_keys=keys,
        output_dir=Path(args.output_dir),
        limits=Limits(max_n=args.max_n, max_steps=args.max_steps),
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.timeout,
        batching=not args.no_batching,
        public_url=args.public_url,
        url_ttl_s=args.url_ttl,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from t2i.cli.main import CLIError

    try:  # before anything else, so a missing extra is one line, not a traceback
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (the images/edits form)
        import uvicorn
    except ImportError as err:
        raise CLIError(f"t2i serve needs the serve extra ({err.name} is missing): pip install -e '.[serve]'") from None
    from t2i.serve.app import create_app

    cfg = config_from_args(args)
    from t2i.pipelines.folders import resolve_model

    for m in [*cfg.models, *cfg.allow_models]:  # a typo fails here, in one line, not at startup or first use
        try:
            resolve_model(m)
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not _is_loopback(args.host) and not cfg.api_keys:
        print(f"t2i serve: warning: listening on {args.host} without an API key; anyone who can reach this port "
              "can use the server (set --api-key or T2I_API_KEY)", file=sys.stderr)  # fmt: skip
    print(f"t2i serve: {', '.join(cfg.models)} on http://{args.host}:{args.port}/ (API docs at /docs)",
          file=sys.stderr)  # fmt: skip
    from t2i.serve.guard import ConnectionLimits, uvicorn_config

    limits = ConnectionLimits(max_connections=args.max_connections, request_read_s=args.read_timeout)
    config = uvicorn_config(create_app(cfg), host=args.host, port=args.port, limits=limits, log_level=args.log_level)
    if config.guard.limits.max_connections < args.max_connections:
        print(f"t2i serve: at most {config.guard.limits.max_connections} connections (the file-descriptor limit)",
              file=sys.stderr)  # fmt: skip
    uvicorn.Server(config).run()
    return 0
