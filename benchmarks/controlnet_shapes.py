"""How often placement follows a ControlNet control on the shapes world, with and without the control.

Scenes come from the shapes world's own prompt stream under a seed no training run or split uses (so neither the
``eval`` / ``heldout`` prompts nor the training draws), restricted to categories whose objects have positions to
follow. For each scene the ground truth is rendered, its object outlines (Canny edges) become the control image,
and the model draws the scene's caption twice with the same seed: without the control and with it. The shapes
detector then finds the objects in each image, and every ground-truth object is matched to the detection of its
colour (and shape, when one has both) with the largest box overlap:

- placed: the share of ground-truth objects whose matched detection overlaps its box with IoU >= 0.5;
- IoU: the mean box IoU per object (0 when nothing matches);
- centre error: the mean distance between box centres, as a fraction of the side (0.5 when nothing matches);
- correct: the share of images the shapes evaluator accepts for the caption (GenEval's rules).

    python benchmarks/controlnet_shapes.py                                  # models/sd3-shapes + its ControlNet
    python benchmarks/controlnet_shapes.py --controlnet runs/x/controlnet.safetensors --n 96 --grid grid.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from t2i.pipelines.control import Control
from t2i.pipelines.folders import load_generator
from t2i.shapes.captions import train_prompt
from t2i.shapes.detect import Detection, detect
from t2i.shapes.scenes import ground_truth
from t2i.shapes.scoring import score_image
from t2i.shapes.world import Obj

BENCH_SEED = 770_001  # a stream of the world that no config or split draws from
CATEGORIES = ("single_object", "two_objects", "counting", "position", "color_attribution")
WEIGHTS = {c: 1.0 for c in CATEGORIES}


def scenes(n: int, size: int):
    """``n`` ground-truth samples of positioned objects from the benchmark's own stream."""
    out, i = [], 0
    while len(out) < n:
        p = train_prompt(BENCH_SEED, i, weights=WEIGHTS)
        i += 1
        if p.spec.category in CATEGORIES:
            out.append(ground_truth(p, size))
    return out


def _iou(a: tuple, b: tuple) -> float:
    """IoU of two (cx, cy, w, h) boxes."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def placement(objects: tuple[Obj, ...], found: list[Detection]) -> list[tuple[float, float]]:
    """(IoU, centre error) per ground-truth object, each matched greedily to an unused detection of its colour,
    preferring its shape, then the largest IoU."""
    left = list(found)
    out = []
    for o in objects:
        truth = (o.cx, o.cy, o.size, o.size)
        same = [d for d in left if d.color == o.color]
        same = [d for d in same if d.shape == o.shape] or same
        if not same:
            out.append((0.0, 0.5))
            continue
        best = max(same, key=lambda d: _iou(truth, d.box))
        left.remove(best)
        out.append((_iou(truth, best.box), float(np.hypot(best.cx - o.cx, best.cy - o.cy))))
    return out


def measure(gen, samples, settings, *, scale: float | None, seed: int, batch: int) -> tuple[dict, list]:
    """The row of the table for one setting (``scale`` None: no control) and its images."""
    per_obj, correct, images = [], [], []
    for b in range(0, len(samples), batch):
        chunk = samples[b : b + batch]
        controls = None
        if scale is not None:
            controls = [Control([Image.fromarray(s.image) for s in chunk], "canny", scale)]
        out = gen.generate([s.prompt.caption for s in chunk], [seed + b + k for k in range(len(chunk))], settings,
                           controls=controls)  # fmt: skip
        for s, img in zip(chunk, out, strict=True):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            images.append(arr)
            per_obj += placement(s.scene.objects, detect(arr))
            correct.append(score_image(s.prompt.spec, arr, s.prompt.caption).passed)
    ious = np.array([p[0] for p in per_obj])
    row = {"placed": float((ious >= 0.5).mean()), "iou": float(ious.mean()),
           "centre": float(np.mean([p[1] for p in per_obj])), "correct": float(np.mean(correct))}  # fmt: skip
    return row, images


def grid(samples, rows: dict[str, list], path: str, n: int = 8) -> None:
    """Columns: ground truth, its outlines, then each setting's image; one row per scene."""
    from t2i.data.control import canny_edges

    cells = []
    for i, s in enumerate(samples[:n]):
        line = [s.image, np.asarray(canny_edges(Image.fromarray(s.image)))]
        line += [imgs[i] for imgs in rows.values()]
        cells.append(np.concatenate(line, axis=1))
    Image.fromarray(np.concatenate(cells, axis=0)).save(path)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sd3-shapes", help="an sd3 model folder (its controlnet.safetensors is used)")
    ap.add_argument("--controlnet", action="append", default=[], help="ControlNet weights to add to the model")
    ap.add_argument("--n", type=int, default=64, help="scenes")
    ap.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    ap.add_argument("--scales", default="1.0", help="comma-separated control scales to measure (default 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grid", help="write a PNG grid: truth, outlines, without, with each scale")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = load_generator(args.model, controlnets=args.controlnet)
    if not gen.controlnets():
        raise SystemExit(f"{args.model} has no ControlNet: pass --controlnet PATH (or export one into the folder)")
    s = gen.settings(steps=args.steps)
    samples = scenes(args.n, s.size)
    results, images = {}, {}
    scales = [float(x) for x in args.scales.split(",")]
    settings_list = [("without control", None)] + [(f"outlines, scale {x:g}", x) for x in scales]
    for label, scale in settings_list:
        t0 = time.perf_counter()
        results[label], images[label] = measure(gen, samples, s, scale=scale, seed=args.seed, batch=args.batch_size)
        results[label]["seconds"] = time.perf_counter() - t0
    print(f"\n{gen.name}, {args.n} scenes of the benchmark stream, {s.steps} steps, guidance {s.guidance:g}\n")
    print("| setting | objects placed (IoU >= 0.5) | mean IoU | centre error | prompt correct | seconds |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['placed']:.3f} | {r['iou']:.3f} | {r['centre']:.3f} | {r['correct']:.3f} | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    if args.grid:
        grid(samples, images, args.grid)
        print(f"\ngrid: {args.grid} (columns: ground truth, outlines, {', '.join(images)})")
    return results


if __name__ == "__main__":
    main()
