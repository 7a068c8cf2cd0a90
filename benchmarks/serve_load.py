"""Load test of ``t2i serve``: N concurrent clients on loopback for a fixed time, dynamic batching on vs off.

    python benchmarks/serve_load.py                       # 8 clients x 60 s per mode, sd3-shapes at its defaults
    python benchmarks/serve_load.py --clients 4 --duration 20 --steps 8

For each mode a fresh server runs in its own process (``t2i serve``, so the clients never share its GIL), is warmed
up with one request, then every client loops: send one request (one image, its own prompt and seed), wait for the
answer, repeat, until the time is up. Throughput counts images answered inside the window; latency is per request
as the client saw it. Errors are any answer but 200 or a deliberate 429 (the queue is deep enough that 8 clients
never fill it, so 429s should be 0 as well). The batch-size histogram comes from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from serve_common import free_port, wait_healthy

PROMPTS = [
    "a red circle above a blue square",
    "three green triangles",
    "a purple square",
    "two yellow circles",
    "a blue triangle left of a red square",
    'the word "CAT"',
    "an orange circle",
    "four cyan squares",
]


def start_server(args, batching: bool, port: int) -> subprocess.Popen:
    t2i = Path(sys.executable).with_name("t2i")
    cmd = [
        str(t2i),
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-queue",
        "64",
        "--max-batch",
        str(args.max_batch),
        "--batch-window-ms",
        str(args.window_ms),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_healthy(proc, port, proc.stderr.read)
    return proc


async def client_loop(k: int, url: str, body: dict, until: float, results: list) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        i = 0
        while time.perf_counter() < until:
            req = {**body, "prompt": PROMPTS[(k + i) % len(PROMPTS)], "seed": 1000 * k + i}
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/images/generations", json=req)
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            t1 = time.perf_counter()
            results.append((status, t0, t1))
            if status == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            i += 1


def run_mode(args, batching: bool) -> dict:
    port = free_port()
    proc = start_server(args, batching, port)
    url = f"http://127.0.0.1:{port}"
    body = {"n": 1}
    if args.steps:
        body["steps"] = args.steps
    try:
        httpx.post(f"{url}/v1/images/generations", json={**body, "prompt": "warm up", "seed": 0}, timeout=600)
        results: list = []
        start = time.perf_counter()
        until = start + args.duration

        async def main():
            await asyncio.gather(*(client_loop(k, url, body, until, results) for k in range(args.clients)))

        asyncio.run(main())
        end = time.perf_counter()
        metrics = httpx.get(f"{url}/metrics", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ok = [(t0, t1) for s, t0, t1 in results if s == 200]
    in_window = [t1 for _, t1 in ok if t1 <= until]
    lat = np.array([t1 - t0 for t0, t1 in ok]) if ok else np.array([np.nan])
    return {
        "mode": "batching" if batching else "no batching",
        "requests": len(results),
        "images_in_window": len(in_window),
        "images_per_s": len(in_window) / args.duration,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "rejected_429": sum(s == 429 for s, _, _ in results),
        "errors": sum(s not in (200, 429) for s, _, _ in results),
        "mean_batch": metrics["batches"]["mean_images"],
        "histogram": metrics["batches"]["images_histogram"],
        "wall_s": end - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd3-shapes")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode")
    ap.add_argument("--steps", type=int, help="sampler steps per request (default: the model's)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=50.0)
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: all cores)")
    ap.add_argument("--modes", default="batching,off", help="comma-separated: batching, off")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = [run_mode(args, m == "batching") for m in args.modes.split(",")]
    steps = args.steps or "default"
    print(f"t2i serve load test: {args.model}, {args.clients} clients x {args.duration:g} s per mode, one image "
          f"per request, steps {steps}, max batch {args.max_batch}, window {args.window_ms:g} ms")  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, server threads "
          f"{args.threads or 'default'}\n")  # fmt: skip
    print("| mode | requests | images/s | p50 (s) | p95 (s) | p99 (s) | errors | 429 | mean batch | batch sizes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        hist = " ".join(f"{k}:{v}" for k, v in r["histogram"].items())
        print(f"| {r['mode']} | {r['requests']} | {r['images_per_s']:.3f} | {r['p50']:.2f} | {r['p95']:.2f} | "
              f"{r['p99']:.2f} | {r['errors']} | {r['rejected_429']} | {r['mean_batch']} | {hist} |")  # fmt: skip
    if len(rows) == 2 and rows[1]["images_per_s"] > 0:
        print(f"\nthroughput, batching / no batching: {rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
