"""A 64 -> 256 -> 1024 unCLIP cascade on the CPU: seconds and peak memory of each stage, with and without tiling.

The stages are small random Unets (the point is the shape of the cascade, not the picture): a 64 px base decoder
and two super-resolution stages conditioned on the stage below. The 1024 px stage runs once whole and once in
overlapping 256 px tiles (``DecoderStage(tile=256)``, ``t2i.diffusion.TiledDenoiser``), which bounds its
activations by one tile's. Peak memory is the process's resident-set high-water mark, reset before each stage
(``/proc/self/clear_refs``), minus the resident size before it: what the stage itself added.

    python benchmarks/unclip_cascade_memory.py
    python benchmarks/unclip_cascade_memory.py --steps 8 --dim 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from t2i.diffusion import Seeds, VPPath
from t2i.models.unet import Unet
from t2i.pipelines.unclip_stages import DecoderStage, LowresAugment, run_stage


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def unet(dim: int, sr: bool) -> Unet:
    torch.manual_seed(0)
    return Unet(dim=dim, dim_mults=(1, 2, 4), num_res_blocks=1, attn_levels=(False, False, not sr),
                self_attn=(False, False, not sr), heads=2, head_dim=16, groups=8, image_embed_dim=0 if sr else 64,
                lowres_cond=sr, lowres_noise_cond=sr).eval()  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps per stage")
    ap.add_argument("--dim", type=int, default=16, help="base width of the super-resolution Unets")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    path = VPPath("cosine", 1000)
    base = DecoderStage(unet(32, sr=False), 64, path, "eps", sampler="ddim", steps=args.steps)
    sr256 = DecoderStage(unet(args.dim, sr=True), 256, path, "v", sampler="ddim", steps=args.steps,
                         lowres=LowresAugment(64))  # fmt: skip
    net1024 = unet(args.dim, sr=True)

    def top(tile: int | None) -> DecoderStage:
        return DecoderStage(net1024, 1024, path, "v", sampler="ddim", steps=args.steps, lowres=LowresAugment(256),
                            tile=tile, tile_overlap=args.overlap)  # fmt: skip

    stages = [("64 (base)", base), ("256", sr256), ("1024, whole", top(None)), (f"1024, {args.tile} px tiles",
                                                                             top(args.tile))]  # fmt: skip
    seeds = Seeds([0])
    embed = torch.nn.functional.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    outputs: dict[int, torch.Tensor] = {}
    print(f"threads {torch.get_num_threads()}, {args.steps} DDIM steps per stage, SR Unets of width {args.dim}")
    print("| stage | output | seconds | peak memory added (MB) |")
    print("|---|---|---:|---:|")
    for name, stage in stages:
        lower = outputs.get(stage.lowres.lowres_size) if stage.lowres is not None else None
        before = _status_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        out = run_stage(stage, seeds=seeds, image_embed=embed if stage.net.cfg.image_embed_dim else None, prev=lower)
        seconds = time.perf_counter() - t0
        peak = (_status_kb("VmHWM") - before) / 1024
        outputs.setdefault(stage.size, out)
        print(f"| {name} | {out.shape[-2]}x{out.shape[-1]} | {seconds:.1f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
