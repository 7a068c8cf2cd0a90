"""Training-step throughput of the tiny models: samples/s and achieved GFLOP/s, fp32 and bf16 autocast.

Achieved GFLOP/s divides the FLOPs of one training step, as counted by ``torch.utils.flop_counter`` (matmuls,
convolutions and attention of forward and backward, for any model), by the measured step time. Norms,
activations, the optimiser and data loading count as overhead. It is printed next
to this machine's measured peak for the same dtype and thread count: the best of dense matmuls (512-2048) and one
large 3x3 convolution, because on some CPUs (AMD with MKL) oneDNN's convolutions outrun torch's matmul.

    python benchmarks/train_throughput.py                  # all tiny models, fp32 and bf16, 1 thread
    python benchmarks/train_throughput.py --threads 2 --steps 30
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from t2i.train.config import load_config
from t2i.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]

# (label, config, overrides): every tiny model that exists, at the sizes the smoke configs train
CASES = [
    ("toy_unet 16px flow (w16)", "configs/tiny/flow_rf.yaml", []),
    ("toy_unet 16px eps accum2", "configs/tiny/eps_vp.yaml", []),
    ("toy_unet 32px flow (w32)", "configs/tiny/flow_rf.yaml", ["data.image_size=32", "model.params.width=32"]),
    ("toy_mlp 48-d vectors", "configs/tiny/mlp_vectors.yaml", []),
    ("unclip Unet 32px (d16)", "configs/tiny/unclip_decoder.yaml", []),
    ("unclip Unet 32px (d32)", "configs/tiny/unclip_decoder.yaml", ["model.params.dim=32"]),
    ("unclip prior (tiny)", "configs/tiny/unclip_prior.yaml", []),
]

# (label, MMDiT preset, latent size, batch): the SD3 model trained outside the toy loop, on random features
MMDIT_CASES = [
    ("mmdit tiny-x 16x16 latent", "tiny-x", 16, 8),
    ("mmdit bench (9M) 32x32", "bench", 32, 4),
]


def _best_rate(fn, flops: float, seconds: float) -> float:
    for _ in range(2):
        fn()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return best


def measured_peak(dtype: torch.dtype, seconds: float = 0.7) -> tuple[float, str]:
    """Best GFLOP/s of n^3 matmuls (n = 512, 1024, 2048) and a 64->64 3x3 conv on 8x64x64, in ``dtype``."""
    results = []
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        results.append((_best_rate(lambda a=a, b=b: a @ b, 2 * n**3, seconds), f"matmul {n}^3"))
    x, w = torch.randn(8, 64, 64, 64, dtype=dtype), torch.randn(64, 64, 3, 3, dtype=dtype)
    conv_flops = 2 * 8 * 64 * 64 * 64 * 64 * 9
    results.append((_best_rate(lambda: torch.conv2d(x, w, padding=1), conv_flops, seconds), "conv 3x3 64ch"))
    return max(results)


def step_flops(tr: Trainer) -> int:
    """FLOPs of one optimiser step's forward and backward passes, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        tr.train_step()
    return counter.get_total_flops()


def _embedding_file(tmp: Path) -> Path:
    from t2i.data.embeddings import cache_embeddings
    from t2i.data.toy import ToyBlobs

    path = tmp / "toy_pixels.safetensors"
    cache_embeddings(ToyBlobs(256, 16), path)
    return path


def bench_case(config: str, overrides: list[str], precision: str, steps: int, tmp: Path, threads: int) -> dict:
    extra = [
        f"run.out_dir={tmp}",
        f"run.name=bench_{precision}",
        f"run.precision={precision}",
        f"run.threads={threads}",
        "run.progress=false",
        "run.tensorboard=false",
        "ema.enabled=false",
    ]
    cfg = load_config(ROOT / config, [*overrides, *extra])
    if cfg.data.source == "embeddings":
        cfg = load_config(ROOT / config, [*overrides, *extra, f"data.path={_embedding_file(tmp)}"])
    tr = Trainer(cfg, out=io.StringIO())
    for _ in range(3):  # warm-up: allocator, autocast caches, first-call overheads
        tr.train_step()
    flops = step_flops(tr)  # counted, forward + backward, for any model
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    seconds = time.perf_counter() - t
    return {
        "samples_per_s": steps * cfg.data.batch_size / seconds,
        "gflops": steps * flops / seconds / 1e9,
        "params": sum(p.numel() for p in tr.model.parameters() if p.requires_grad),
    }


def bench_mmdit(preset: str, latent: int, batch: int, precision: str, steps: int) -> dict:
    """One AdamW step of an MMDiT preset on random latents and text features (flow-matching loss, SD3 recipe)."""
    from t2i.diffusion import RectifiedFlow, flow_matching_objective
    from t2i.models.mmdit import PRESETS, MMDiT

    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = MMDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = flow_matching_objective(RectifiedFlow(3.0))
    x0 = torch.randn(batch, cfg.in_channels, latent, latent)
    ctx, pooled = torch.randn(batch, 77, cfg.context_dim), torch.randn(batch, cfg.pooled_dim)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = objective(lambda x, t: model(x, t, ctx, pooled), x0).mean()
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t
    return {
        "samples_per_s": steps * batch / seconds,
        "gflops": steps * counter.get_total_flops() / seconds / 1e9,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models run best on 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measured = {p: measured_peak(dt) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    peaks = {p: v[0] for p, v in measured.items()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps per case")
    for p, (gflops, probe) in measured.items():
        print(f"measured peak {p}: {gflops:.1f} GFLOP/s ({probe})")
    print()
    header = f"{'model':<28} {'params':>8} {'precision':<9} {'samples/s':>10} {'GFLOP/s':>9} {'% of peak':>9}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for label, config, overrides in CASES:
            for precision in ("fp32", "bf16"):
                r = bench_case(config, overrides, precision, args.steps, Path(tmp), args.threads)
                pct = 100 * r["gflops"] / peaks[precision]
                print(
                    f"{label:<28} {r['params']:>8} {precision:<9} {r['samples_per_s']:>10.1f} "
                    f"{r['gflops']:>9.2f} {pct:>8.1f}%"
                )
    for label, preset, latent, batch in MMDIT_CASES:
        for precision in ("fp32", "bf16"):
            r = bench_mmdit(preset, latent, batch, precision, max(3, args.steps // 4))
            pct = 100 * r["gflops"] / peaks[precision]
            print(
                f"{label:<28} {r['params']:>8} {precision:<9} {r['samples_per_s']:>10.1f} "
                f"{r['gflops']:>9.2f} {pct:>8.1f}%"
            )


if __name__ == "__main__":
    main()
