"""Inpainting on the shapes world: repaint one object of a ground-truth scene as another colour or shape.

For the first ``--n`` colour-attribution prompts of the ``eval`` split ("a circle that is green and a square that is
purple"), the ground-truth scene is rendered, the second object's box (grown by ``--grow`` of its side on each
edge) is masked, and the caption is rewritten with that object in a new colour, or as a new shape. A model then
inpaints the masked box from the new caption. The shapes evaluator judges each result against the rewritten
caption (both objects, the kept one as it was and the edited one as asked), and the kept region is compared with
the ground truth pixel by pixel (mean absolute difference, 0-255; the VAE's own round trip is printed beside it as
the floor an SD3 latent edit can reach).

    python benchmarks/inpaint_shapes.py                       # sd3-shapes, 40 scenes, both edits
    python benchmarks/inpaint_shapes.py --model runs/...      # any model folder
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from t2i.pipelines.folders import load_generator
from t2i.shapes.captions import split_prompts
from t2i.shapes.scenes import ground_truth
from t2i.shapes.scoring import evaluate_images
from t2i.shapes.specs import Clause
from t2i.shapes.world import COLORS, SHAPES


def _replace_last(text: str, old: str, new: str) -> str:
    i = text.rindex(old)
    return text[:i] + new + text[i + len(old) :]


def edits(n: int, size: int, grow: float, kind: str, seed: int = 0):
    """(ground truth uint8 image, mask, rewritten caption, rewritten spec) for ``n`` scenes."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in split_prompts("eval") if p.spec.category == "color_attribution"][:n]
    out = []
    for p in prompts:
        sample = ground_truth(p, size)
        a, b = p.spec.include
        obj = next(o for o in sample.scene.objects if o.shape == b.shape and o.color == b.color)
        if kind == "colour":
            new = str(rng.choice([c for c in COLORS if c not in (a.color, b.color)]))
            caption, clause = _replace_last(p.caption, b.color, new), replace(b, color=new)
        else:
            new = str(rng.choice([s for s in SHAPES if s not in (a.shape, b.shape)]))
            caption, clause = _replace_last(p.caption, b.shape, new), Clause(shape=new, color=b.color)
        left, top, right, bottom = obj.box()
        pad = grow * obj.size
        mask = np.zeros((size, size), np.float32)
        y0, y1 = int(max(0, (top - pad) * size)), int(np.ceil(min(1, bottom + pad) * size))
        x0, x1 = int(max(0, (left - pad) * size)), int(np.ceil(min(1, right + pad) * size))
        mask[y0:y1, x0:x1] = 1.0
        out.append((sample.image, mask, caption, replace(p.spec, include=(a, clause))))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd3-shapes")
    ap.add_argument("--n", type=int, default=40, help="scenes per edit kind")
    ap.add_argument("--grow", type=float, default=0.15, help="mask margin around the object, as a fraction of it")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument("--strength", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    gen = load_generator(args.model)
    s = gen.settings(steps=args.steps, extra={"strength": args.strength})
    print(f"{gen.name}: {s.steps} steps of {s.sampler}, guidance {s.guidance}, strength {args.strength}, "
          f"{args.n} scenes per edit, mask = object box + {args.grow:.0%}")  # fmt: skip
    print("| edit | scenes | edit judged right | kept region mean abs diff | VAE round trip | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("colour", "shape"):
        rows = edits(args.n, s.size, args.grow, kind)
        gt = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).float() / 255
        masks = torch.from_numpy(np.stack([r[1] for r in rows]))[:, None]
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(rows), 16):
            sl = slice(i, i + 16)
            out.append(gen.generate([r[2] for r in rows[sl]], list(range(i, i + len(rows[sl]))), s,
                                    init_images=gt[sl], masks=masks[sl]))  # fmt: skip
        images = torch.cat(out)
        seconds = time.perf_counter() - t0
        report = evaluate_images(list(images), [r[3] for r in rows], [r[2] for r in rows])
        keep = (1 - masks).expand_as(gt).bool()
        kept = ((images - gt).abs() * 255)[keep].mean().item()
        roundtrip = _vae_roundtrip(gen, gt)
        vae = ((roundtrip - gt).abs() * 255)[keep].mean().item() if roundtrip is not None else float("nan")
        print(f"| {kind} | {len(rows)} | {report.overall:.3f} | {kept:.1f} | {vae:.1f} | {seconds:.0f} |")


def _vae_roundtrip(gen, images: torch.Tensor) -> torch.Tensor | None:
    """Decode(encode(images)) through the model's VAE at the posterior mean: what any latent edit must live with."""
    vae = getattr(getattr(gen, "pipe", None), "vae", None)
    if vae is None:
        return None
    return ((vae.decode(vae.encode(images * 2 - 1, sample=False)).float() + 1) / 2).clamp(0, 1)


if __name__ == "__main__":
    main()
