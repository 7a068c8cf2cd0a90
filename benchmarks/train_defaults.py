"""Training throughput of the default recipes (``configs/default/``): images per second of each component's run.

    python benchmarks/train_defaults.py [--steps 8] [--reps 2] [--threads 1] [--baseline OTHER_CHECKOUT]

Each case builds the run's ``Trainer`` from its config exactly as ``make train-defaults`` does (precision, batch,
EMA, data from the shapes stream, the frozen parts the task loads) and times ``--steps`` optimiser steps after two
warm-up steps; checkpoints, sample grids and evaluations are not part of it. Frozen inputs that the recipes take
from earlier runs come from the shipped model folders instead (the shapes CLIP and VAE, each side its own
checkout's), which changes nothing in the step's cost.

``--precision fp32`` (the default where this CPU has no native bf16 matmul, `t2i info`) or ``bf16`` overrides the
configs' ``run.precision`` on both sides; ``config`` keeps each config's own.

``--baseline`` names another checkout of t2i (for example a worktree of an older commit): every case then runs
alternately under that checkout's code and configs and this one's, each in a fresh subprocess, ``--reps`` times;
the best of each side is kept (load from other processes only adds time) and the ratio printed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SD3_FILES = [
    "task.params.vae=models/sd3-shapes/vae.safetensors",
    "task.params.text=models/sd3-shapes/clip.safetensors",
    "task.params.caption_encoder=models/sd3-shapes/caption.safetensors",
]
UNCLIP_CLIP = [
    "task.params.clip_path=models/unclip-shapes/clip.safetensors",
    "task.params.caption_encoder=models/unclip-shapes/caption.safetensors",  # the prior reads its states
]
CASES = {  # label: (config, overrides); a task.params override applies where the config names that parameter
    "CLIP": ("configs/default/clip.yaml", []),
    "caption encoder": ("configs/default/caption.yaml", ["task.params.clip=models/sd3-shapes/clip.safetensors"]),
    "VAE": ("configs/default/vae.yaml", []),
    "sd3-shapes MMDiT-X": ("configs/default/sd3.yaml", SD3_FILES),
    "unCLIP prior": ("configs/default/prior.yaml", UNCLIP_CLIP),
    "unCLIP decoder": ("configs/default/decoder.yaml", UNCLIP_CLIP),
    "unCLIP upsampler": ("configs/default/sr.yaml", []),
}


def worker(label: str, steps: int, threads: int, config_root: Path = ROOT, precision: str = "config") -> dict:
    """Time one case in this process (the code on ``sys.path``); returns images/s and the step time."""
    import torch

    from t2i.train.config import load_config
    from t2i.train.loop import Trainer

    torch.set_num_threads(threads)
    config, overrides = CASES[label]
    text = (
        config_root / config
    ).read_text()  # an older checkout's config may lack a newer input (the caption encoder)
    overrides = [
        o for o in overrides if not o.startswith("task.params.") or f"{o.split('=')[0].split('.')[-1]}:" in text
    ]
    # each side reads the frozen parts shipped in its own checkout: an older checkout's code cannot load a newer
    # CLIP (one with a picture head), and its recipe was trained on its own
    overrides = [o.replace("=models/", f"={config_root}/models/") for o in overrides]
    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"run.out_dir={tmp}", "run.name=bench", f"run.threads={threads}", "run.progress=false"]
        extra += [f"run.precision={precision}"] if precision != "config" else []
        cfg = load_config(config_root / config, [*overrides, *extra])
        tr = Trainer(cfg, out=io.StringIO())
        for _ in range(2):  # warm-up: allocator, autocast caches, first-call overheads, data workers
            tr.train_step()
        t = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        seconds = (time.perf_counter() - t) / steps
    return {"images_per_s": cfg.data.batch_size * cfg.optim.grad_accum / seconds, "step_s": seconds,
            "batch": cfg.data.batch_size, "precision": cfg.run.precision}  # fmt: skip


def run_in(checkout: Path, label: str, steps: int, threads: int, precision: str) -> dict | None:
    """One case in a fresh process under ``checkout``'s code and configs; None where that checkout has no such run."""
    if not (checkout / CASES[label][0]).exists():
        return None
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", label, "--steps", str(steps), "--threads", str(threads),
           "--config-root", str(checkout), "--precision", precision]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{label} under {checkout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps per case")
    ap.add_argument("--reps", type=int, default=2, help="runs per side with --baseline (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--baseline", type=Path, help="another t2i checkout to compare against, alternating")
    ap.add_argument(
        "--precision",
        choices=("config", "fp32", "bf16"),
        help="override every config's run.precision (default: fp32 where bf16 is emulated, else config)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config-root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads, args.config_root, args.precision or "config")))
        return
    if args.precision is None:
        from t2i.nn.precision import bf16_is_native

        args.precision = "config" if bf16_is_native() else "fp32"
    print(f"{args.threads} thread(s), {args.steps} timed steps per run after 2 warm-up steps"
          + (f", best of {args.reps} alternating runs per side" if args.baseline else "") + "\n")  # fmt: skip
    if args.baseline is None:
        print("| run | precision | batch | s/step | images/s |\n|---|---|---:|---:|---:|")
        for label in args.cases:
            r = run_in(ROOT, label, args.steps, args.threads, args.precision)
            print(f"| {label} | {r['precision']} | {r['batch']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} |")
        return
    print("| run | precision | batch | baseline images/s | this checkout images/s | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for label in args.cases:
        best = {"base": 0.0, "new": 0.0}
        for _ in range(args.reps):
            for side, checkout in (("base", args.baseline.resolve()), ("new", ROOT)):
                r = run_in(checkout, label, args.steps, args.threads, args.precision)
                if r is not None:
                    best[side], row = max(best[side], r["images_per_s"]), r
        if not best["base"]:
            print(f"| {label} | {row['precision']} | {row['batch']} | - (no such run) | {best['new']:.1f} | - |")
            continue
        print(f"| {label} | {row['precision']} | {row['batch']} | {best['base']:.1f} | {best['new']:.1f} | "
              f"{best['new'] / best['base']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
