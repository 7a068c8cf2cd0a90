"""Slow-client attack on ``t2i serve``: does a keyed client still get its images?

    python benchmarks/serve_attack.py                        # 2000 slow connections, 40 s, sd3-shapes at 4 steps
    python benchmarks/serve_attack.py --slow 20000 --duration 60

A fresh server runs in its own process with an API key. Three phases, each ``--duration`` seconds:

1. **quiet**: one keyed client alone, sending a request (one image) as soon as the previous one is answered;
2. **burst**: the same, and half way through a burst of ``--burst`` concurrent requests that overfills the queue,
   so 429s are measured;
3. **attack + burst**: the same while ``--slow`` connections (from another process) each send half a request's
   headers, then a byte every second, never finishing; when the server cuts one, it reconnects at once
   (slowloris). The last line lists the kinds of connection errors the keyed client and the burst saw;
4. **after**: the client alone again (the server must have recovered).

Printed per phase: keyed requests answered and their p50 / p95 latency, errors, the connections the server process
held (sampled from /proc), its RSS, and how much it logged. The 429 latency is the time from sending a request the
queue cannot take to receiving the 429.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from serve_common import free_port, wait_healthy

KEY = "bench-key"
PARTIAL = b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


def start_server(args, port: int, log: Path) -> subprocess.Popen:
    t2i = Path(sys.executable).with_name("t2i")
    cmd = [str(t2i), "serve", "--model", args.model, "--port", str(port), "--api-key", KEY,
           "--max-connections", str(args.max_connections), "--read-timeout", str(args.read_timeout),
           "--max-queue", str(args.max_queue), "--log-level", "info"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log.read_text)
    return proc


def proc_stats(pid: int) -> tuple[int, float]:
    """(open file descriptors, RSS in MiB) of the server process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return fds, rss


async def slow_client(port: int, until: float, counts: dict) -> None:
    while time.perf_counter() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(0.5)
            continue
        counts["opened"] += 1
        try:
            writer.write(PARTIAL)
            await writer.drain()
            while time.perf_counter() < until:
                try:
                    if await asyncio.wait_for(reader.read(1024), timeout=1.0) == b"":
                        break  # the server cut us: come back at once
                except TimeoutError:
                    writer.write(b"X")  # one more byte of a header that never ends
                    await writer.drain()
        except OSError:
            pass
        finally:
            counts["cut"] += 1
            writer.close()


def attack_process(port: int, n: int, seconds: float, results) -> None:
    """The slow connections, in their own process and event loop, so the keyed client's latency is the server's
    and not this benchmark's own loop juggling thousands of sockets."""
    raise_fd_limit(n + 256)
    counts = {"opened": 0, "cut": 0, "refused": 0}

    async def main():
        until = time.perf_counter() + seconds
        await asyncio.gather(*(slow_client(port, until, counts) for _ in range(n)), return_exceptions=True)

    asyncio.run(main())
    results.put(counts)


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))


async def keyed_client(url: str, body: dict, until: float, out: list) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=120) as client:
        i = 0
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/images/generations", json={**body, "seed": i}, headers=headers)
                status = r.status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            out.append((status, time.perf_counter() - t0))
            i += 1
            if status == 429:
                await asyncio.sleep(0.2)


async def burst(url: str, body: dict, n: int, out: list) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:

        async def one(k):
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/images/generations", json={**body, "seed": 10_000 + k},
                                      headers=headers)  # fmt: skip
                out.append((r.status_code, time.perf_counter() - t0))
            except httpx.HTTPError as err:
                out.append((type(err).__name__, time.perf_counter() - t0))

        await asyncio.gather(*(one(k) for k in range(n)))


def run_phase(args, port: int, pid: int, log: Path, attack: bool, with_burst: bool) -> dict:
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red circle above a blue square", "n": 1, "steps": args.steps}
    keyed: list = []
    burst_out: list = []
    counts = {"opened": 0, "cut": 0, "refused": 0}
    samples: list[tuple[int, float]] = []
    log_before = log.stat().st_size

    attacker, results = None, None
    if attack:
        results = multiprocessing.Queue()
        attacker = multiprocessing.Process(target=attack_process, args=(port, args.slow, args.duration, results))
        attacker.start()

    async def main():
        until = time.perf_counter() + args.duration
        tasks = [asyncio.create_task(keyed_client(url, body, until, keyed))]
        if with_burst:

            async def later_burst():
                await asyncio.sleep(args.duration / 2)
                await burst(url, body, args.burst, burst_out)

            tasks.append(asyncio.create_task(later_burst()))
        while time.perf_counter() < until:
            samples.append(proc_stats(pid))
            await asyncio.sleep(1.0)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    if attacker is not None:
        counts.update(results.get(timeout=60))
        attacker.join(timeout=30)
    ok = np.array([t for s, t in keyed if s == 200] or [np.nan])
    errors = sorted({str(s) for s, _ in keyed + burst_out if s not in (200, 429)})
    rejected = [t for s, t in burst_out + keyed if s == 429]
    fds = [f for f, _ in samples]
    return {
        "keyed_ok": int(sum(s == 200 for s, _ in keyed)),
        "keyed_errors": int(sum(s not in (200, 429) for s, _ in keyed)),
        "p50": float(np.nanpercentile(ok, 50)),
        "p95": float(np.nanpercentile(ok, 95)),
        "burst_ok": int(sum(s == 200 for s, _ in burst_out)),
        "n429": len(rejected),
        "p50_429": float(np.median(rejected)) if rejected else float("nan"),
        "fds_max": max(fds) if fds else 0,
        "rss_end": samples[-1][1] if samples else float("nan"),
        "log_bytes": log.stat().st_size - log_before,
        "error_kinds": errors,
        **counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd3-shapes")
    ap.add_argument("--slow", type=int, default=2000, help="slow connections during the attack")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--burst", type=int, default=24, help="concurrent requests sent half way through the attack")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-connections", type=int, default=512)
    ap.add_argument("--read-timeout", type=float, default=10.0)
    ap.add_argument("--threads", type=int, help="the server's torch threads")
    args = ap.parse_args()
    raise_fd_limit(args.slow + 256)
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    proc = start_server(args, port, log)
    try:
        fds0, rss0 = proc_stats(proc.pid)
        rows = [("quiet", run_phase(args, port, proc.pid, log, attack=False, with_burst=False)),
                ("burst", run_phase(args, port, proc.pid, log, attack=False, with_burst=True)),
                ("attack + burst", run_phase(args, port, proc.pid, log, attack=True, with_burst=True)),
                ("after", run_phase(args, port, proc.pid, log, attack=False, with_burst=False))]  # fmt: skip
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"t2i serve under a slow-client attack: {args.model}, {args.steps} steps, one keyed client; attack = "
          f"{args.slow} slow connections; burst = {args.burst} requests; {args.duration:g} s per phase")  # fmt: skip
    print(f"server limits: --max-connections {args.max_connections}, --read-timeout {args.read_timeout:g} s, "
          f"--max-queue {args.max_queue}; machine: {platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
    print(f"server at start: {fds0} descriptors, RSS {rss0:.0f} MiB\n")
    print("| phase | keyed 200s | keyed errors | p50 (s) | p95 (s) | burst 200s | 429s | 429 p50 (s) | "
          "server fds (max) | RSS end (MiB) | log bytes | slow conns opened / cut |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in rows:
        slow = f"{r['opened']} / {r['cut']}" if name.startswith("attack") else "-"
        cells = [name, r["keyed_ok"], r["keyed_errors"], f"{r['p50']:.2f}", f"{r['p95']:.2f}", r["burst_ok"]]
        cells += [r["n429"], f"{r['p50_429']:.3f}", r["fds_max"], f"{r['rss_end']:.0f}", r["log_bytes"], slow]
        print("| " + " | ".join(map(str, cells)) + " |")
    kinds = {name: r["error_kinds"] for name, r in rows if r["error_kinds"]}
    print(f"\nserver still running at the end: {alive}" + (f"; keyed errors: {kinds}" if kinds else ""))


if __name__ == "__main__":
    main()
