"""How close the models run to this CPU's matmul peak: measured fp32 / bf16 GEMM peak, then each model's achieved
FLOP/s, forward and training step, as a fraction of the peak measured in the same run. The peak is the best of
several large square matmuls (``torch.mm``, the threads torch uses now). A model's FLOPs are counted analytically by
``torch.utils.flop_counter.FlopCounterMode`` on the call that is timed, in fp32 (matmuls, convolutions,
and attention as explicit matmuls; elementwise work is not counted, so the fraction says how
much of the time the matmul units are busy with useful work). Times are the fastest of ``--reps`` (interference from
other processes only ever adds time). bf16 means autocast, as training runs it (``run.precision: bf16``).

Models: the MMDiT of the diffusers comparison (``PRESETS["bench"]``, benchmarks/vs_diffusers.py: 4 layers, 9.08M
parameters, batch 4, 32 x 32 x 16 latents, 77 tokens of 256), the shipped ``sd3-shapes`` MMDiT-X at its training
batch (64 images of 16 x 16 x 8 latents, 24 CLIP + 24 word + 8 character tokens) and the shipped ``unclip-shapes``
base decoder Unet at its training batch (32 images of 32 px).

"Its GEMMs alone" times ``torch.mm`` at the shapes of the model's own linear layers (recorded by hooks; with the
two backward GEMMs of each for the training step), nothing else: the ceiling of a model whose non-matmul work
cost nothing. Against the square-matrix peak it shows how much of the gap is the matrices' size itself.

    python benchmarks/roofline.py                  # all models, 1 thread
    python benchmarks/roofline.py --threads 2 --reps 5
    python benchmarks/roofline.py --precisions fp32   # the default where bf16 is emulated (an AVX2-only CPU)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from t2i.models.files import load_model_file
from t2i.models.mmdit import PRESETS, MMDiT
from t2i.nn.attention import attention_kernel
from t2i.nn.precision import timed_precisions


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitive caches
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(dtype: torch.dtype, reps: int) -> float:
    """Best GFLOP/s of ``torch.mm`` over a few large square sizes in ``dtype``."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        s = best_seconds(lambda a=a, b=b: torch.mm(a, b), reps)
        best = max(best, 2 * n**3 / s / 1e9)
    return best


def count_flops(fn: Callable[[], object]) -> int:
    # attention as explicit matmuls, which the counter sees (it has no formula for SDPA's CPU kernels)
    with FlopCounterMode(display=False) as counter, attention_kernel("math"):
        fn()
    return counter.get_total_flops()


def mmdit_case(model: MMDiT, batch: int, latent: int, tokens: int) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, forward(), loss()) closures on fixed random inputs of the model's shapes."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    target = torch.randn_like(x)

    def forward():
        return model(x, t, context=context, pooled=pooled)

    def loss():
        return (forward().float() - target).square().mean()

    return model, forward, loss


def unet_case(model: torch.nn.Module, batch: int) -> tuple[torch.nn.Module, Callable, Callable]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    size = 32
    x = torch.randn(batch, cfg.channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    cond = {}
    if cfg.image_embed_dim:
        cond["image_embed"] = torch.randn(batch, cfg.image_embed_dim, generator=g)
    if cfg.text_embed_dim:
        cond["text_tokens"] = torch.randn(batch, 24, cfg.text_embed_dim, generator=g)
        cond["text_mask"] = torch.ones(batch, 24, dtype=torch.bool)
    target = torch.randn_like(x)

    def forward():
        return model(x, t, **cond)

    def loss():
        return (forward().float() - target).square().mean()

    return model, forward, loss


def cases() -> dict[str, Callable[[], tuple]]:
    def bench():
        torch.manual_seed(0)
        return mmdit_case(MMDiT(PRESETS["bench"]), batch=4, latent=32, tokens=77)

    def sd3_shapes():
        model, _ = load_model_file("models/sd3-shapes/transformer.safetensors")
        return mmdit_case(model, batch=64, latent=16, tokens=24 + 24 + 8)

    def unclip_decoder():
        model, _ = load_model_file("models/unclip-shapes/decoder.safetensors")
        return unet_case(model, batch=32)

    return {"mmdit-bench": bench, "sd3-shapes MMDiT-X": sd3_shapes,
            "unclip-shapes decoder Unet": unclip_decoder}  # fmt: skip


def linear_shapes(model: torch.nn.Module, forward: Callable) -> list[tuple[int, int, int]]:
    """(M, K, N) of every ``nn.Linear`` call in one forward: rows, input and output features."""
    shapes, hooks = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, i, o: shapes.append(
                        (i[0].numel() // mod.in_features, mod.in_features, mod.out_features)
                    )
                )
            )
    with torch.no_grad():
        forward()
    for h in hooks:
        h.remove()
    return shapes


def gemm_ceiling(shapes: list[tuple[int, int, int]], dtype: torch.dtype, train: bool, reps: int) -> float:
    """GFLOP/s of the model's own linear-layer GEMMs alone (``torch.mm`` at their shapes, in ``dtype``; with
    ``train`` also the two backward GEMMs of each): what the model could reach if nothing but its matmuls ran."""
    flops = seconds = 0.0
    for (M, K, N), count in Counter(shapes).items():
        gemms = [(M, K, N)] + ([(M, N, K), (N, M, K)] if train else [])  # forward; grad of input; grad of weight
        for m, k, n in gemms:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            seconds += count * best_seconds(lambda a=a, b=b: torch.mm(a, b), reps)
            flops += count * 2 * m * k * n
    return flops / seconds / 1e9


def calls(forward: Callable, loss: Callable, model: torch.nn.Module, precision: str) -> dict[str, Callable]:
    """The timed calls of one precision: a no-grad forward and a training step (loss, backward, AdamW)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def fwd():
        with torch.no_grad(), autocast:
            return forward()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = loss()
        out.backward()
        opt.step()

    return {"forward": fwd, "train step": step}


def measure(name: str, build: Callable[[], tuple], peaks: dict[str, float], reps: int) -> list[str]:
    model, forward, loss = build()
    model.float().requires_grad_(True)  # model files load frozen, for inference
    # the same math in both precisions, counted once in fp32 with attention as explicit matmuls (an emulated bf16
    # pass would take tens of times longer and count the same matmuls)
    counted = {case: count_flops(fn) for case, fn in calls(forward, loss, model, "fp32").items()}
    shapes = linear_shapes(model, forward)
    rows = []
    for precision, peak in peaks.items():
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for case, fn in calls(forward, loss, model, precision).items():
            flops = counted[case]
            s = best_seconds(fn, reps)
            gflops = flops / s / 1e9
            ceiling = gemm_ceiling(shapes, dtype, case == "train step", reps)
            rows.append(f"| {name} | {precision} | {case} | {flops / 1e9:.1f} | {s * 1e3:.0f} | {gflops:.0f} | "
                        f"{ceiling:.0f} | {100 * gflops / peak:.0f}% |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="+", help="a subset of the model names (default: all)")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                    help="default: fp32, and bf16 where this CPU multiplies bf16 natively")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    precisions = args.precisions or timed_precisions()
    peaks = {p: matmul_peak(dtypes[p], args.reps) for p in precisions}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); matmul peak: "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items())
          + f" (best of {args.reps} at n = 1024, 2048, 3072)\n")  # fmt: skip
    rows = []
    for name, build in cases().items():
        if args.models and not any(m in name for m in args.models):
            continue
        rows += measure(name, build, peaks, args.reps)
    # a shared machine's peak moves between runs: measured again after the models, the better of the two counts
    again = {p: matmul_peak(dtypes[p], args.reps) for p in precisions}
    print("matmul peak again after the models: " + ", ".join(f"{p} {g:.0f}" for p, g in again.items()) + " GFLOP/s\n")
    print(
        "| model | precision | case | GFLOP (counted) | ms | GFLOP/s | its GEMMs alone, GFLOP/s | of the matmul peak |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = row.split(" | ")
        peak = max(peaks[cells[1]], again[cells[1]])
        cells[-1] = f"{100 * float(cells[-3]) / peak:.0f}% |"
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
