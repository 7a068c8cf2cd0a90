"""Full-size SD3.5 MMDiTs on this CPU: peak memory and seconds of one denoising step, bf16 against int8 weights.

Each model is built on the ``meta`` device (no memory), then filled module by module with seeded random weights in
bf16, so no fp32 copy of the weights ever exists; for int8 each linear layer is quantized (``t2i.nn.quantize``,
torchao) as soon as it is filled, so the peak holds one bf16 layer beside the int8 model. One denoising step is one
MMDiT forward pass with classifier-free guidance (batch 2) at the given size, with 333 text tokens (77 CLIP + 256 T5,
the reference pipeline's context). The same seeds give the same weights and inputs to
both precisions, so the relative error of int8 against bf16 is measured on identical inputs. Peak memory is the
process's resident-set high-water mark after loading and after the step; each model and precision runs in a fresh
process so one cannot inflate the next.

    python benchmarks/full_size_cpu.py                                   # sd3.5-medium (512, 1024), sd3.5-large (512)
    python benchmarks/full_size_cpu.py --models sd3.5-medium --sizes 512
    python benchmarks/full_size_cpu.py --models bench --sizes 256        # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from t2i.models.mmdit import PRESETS, MMDiT, count_parameters

TOKENS = 333  # 77 CLIP + 256 T5 context tokens, as the reference pipeline sends


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _seeded_fill_(t: torch.Tensor, name: str, std: float = 0.02) -> None:
    """Gaussian values from a generator seeded by the tensor's name, row block by row block, so the fp32 draw
    never holds more than a few MB and both precisions get the same weights."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rows = t.view(t.shape[0], -1) if t.ndim else t.view(1, 1)
    step = max(1, 2**20 // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        block = rows[i : i + step]
        block.copy_(torch.randn(block.shape, generator=g, dtype=torch.float32).mul_(std).to(t.dtype))


def build(name: str, precision: str) -> MMDiT:
    """``PRESETS[name]`` filled with seeded weights in bf16, its linears int8 when ``precision == "int8"``."""
    model = MMDiT(PRESETS[name], dtype=torch.bfloat16, device="meta")
    quantize = None
    if precision == "int8":
        from t2i.nn.quantize import quantize_weights

        quantize = quantize_weights
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own:
            continue
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            for p_name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
                _seeded_fill_(t, f"{mod_name}.{p_name}")
        if quantize is not None and isinstance(module, nn.Linear):
            quantize(module)
    return model.eval()


def one_case(name: str, precision: str, size: int, out: Path) -> dict:
    """Run in its own process: build, one guided step, save the output for the error comparison."""
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = build(name, precision)
    load_s, load_peak = time.perf_counter() - t0, _peak_mb()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    x = torch.randn(2, cfg.in_channels, lat, lat, generator=g).to(torch.bfloat16)
    context = torch.randn(2, TOKENS, cfg.context_dim, generator=g).to(torch.bfloat16)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0, 500.0])
    t0 = time.perf_counter()
    y = model(x, t, context=context, pooled=pooled)
    step_s = time.perf_counter() - t0
    save_file({"y": y.float().contiguous()}, out)
    return {"model": name, "precision": precision, "size": size, "params": count_parameters(model),
            "load_s": load_s, "load_peak_mb": load_peak, "step_s": step_s, "peak_mb": _peak_mb()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sd3.5-medium", "sd3.5-large"])
    ap.add_argument("--sizes", nargs="+", type=int, default=None, help="default: 512 and 1024 for Medium, 512 else")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "int8"])
    ap.add_argument("--case", nargs=4, metavar=("MODEL", "PRECISION", "SIZE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:  # the child process
        name, precision, size, out = args.case
        print(json.dumps(one_case(name, precision, int(size), Path(out))))
        return
    print(f"threads {torch.get_num_threads()}; one denoising step = one MMDiT forward, CFG batch 2, {TOKENS} tokens")
    print(
        "| model | params | size | precision | load s | peak after load (GB) | step s | peak (GB) | rel. err vs bf16 |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            sizes = args.sizes or ([512, 1024] if name == "sd3.5-medium" else [512])
            for size in sizes:
                ref = None
                for precision in args.precisions:
                    out = Path(tmp) / f"{name}-{precision}-{size}.pt"
                    run = subprocess.run([sys.executable, __file__, "--case", name, precision, str(size), str(out)],
                                         capture_output=True, text=True)  # fmt: skip
                    if run.returncode != 0:
                        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["killed (out of memory?)"]
                        print(f"| {name} | | {size} | {precision} | failed: {tail[0][:80]} | | | | |", flush=True)
                        continue
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    y = load_file(out)["y"]
                    err = "-" if ref is None else f"{((y - ref).norm() / ref.norm()).item():.4f}"
                    ref = y if precision == "bf16" else ref
                    print(f"| {name} | {r['params'] / 1e9:.2f}B | {size} | {precision} | {r['load_s']:.0f} | "
                          f"{r['load_peak_mb'] / 1024:.1f} | {r['step_s']:.1f} | {r['peak_mb'] / 1024:.1f} | {err} |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
