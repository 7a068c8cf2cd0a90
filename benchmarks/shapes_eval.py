"""Measure the shapes evaluator: accuracy on ground truth and on corruptions, speed on one core, and the
distribution metric (FD-probe, KID) on ground truth / blurred / shuffled-colour / noise images.

    python benchmarks/shapes_eval.py            # about a minute on one core

Every number printed is measured here; docs/shapes.md pastes this output.
"""

from __future__ import annotations

import os

# One core for BLAS too (the palette projection is a matmul), before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from t2i.shapes.captions import split_prompts  # noqa: E402
from t2i.shapes.probe import frechet_distance, kid, probe_features  # noqa: E402
from t2i.shapes.scenes import failure_scene, ground_truth, render  # noqa: E402
from t2i.shapes.scoring import REFERENCE_SEED_OFFSET, evaluate_images  # noqa: E402
from t2i.shapes.specs import ALL_CATEGORIES, CATEGORIES, Prompt  # noqa: E402
from t2i.shapes.world import BACKGROUND  # noqa: E402

COLS = (*CATEGORIES, "overall", "text")
HEAD = {"single_object": "single", "two_objects": "two", "color_attribution": "attr"}


def header(first: str) -> str:
    return f"{first:<28}" + "".join(f"{HEAD.get(c, c):>9}" for c in COLS)


def row(name: str, report) -> str:
    acc = report.accuracy()
    vals = [acc.get(c) for c in CATEGORIES] + [report.overall, acc.get("text")]
    return f"{name:<28}" + "".join(f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in vals)


def blur_noise(images, sigma: float, noise: float, rng) -> list[np.ndarray]:
    out = []
    for im in images:
        x = im.astype(np.float32)
        if sigma > 0:
            x = ndimage.gaussian_filter(x, (sigma, sigma, 0))
        x = x + rng.normal(0, noise, im.shape) if noise > 0 else x
        out.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return out


def chance_images(prompts, size: int, rng) -> list[np.ndarray]:
    """Ground truth of another prompt of the same category: what a model ignoring the text would score."""
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.spec.category, []).append(p)
    out = []
    for p in prompts:
        pool = [q for q in by_cat[p.spec.category] if q.caption != p.caption]
        out.append(ground_truth(pool[int(rng.integers(len(pool)))], size).image)
    return out


def accuracy_tables(sizes) -> None:
    print("## Evaluator accuracy on ground truth (fraction of images judged correct)\n")
    print(header("split / size"))
    for split in ("eval", "heldout"):
        prompts = split_prompts(split)
        for size in sizes:
            images = [ground_truth(p, size).image for p in prompts]
            print(row(f"{split} {size}px (n={len(prompts)})", evaluate_images(images, [p.spec for p in prompts])))
    print("\n## Evaluator accuracy on corrupted images (eval split; ideal: 1.000 for mild, 0.000 for the rest)\n")
    prompts = split_prompts("eval")
    specs = [p.spec for p in prompts]
    for size in sizes:
        rng = np.random.default_rng(0)
        gt = [ground_truth(p, size).image for p in prompts]
        s = size / 32  # blur in units of a 32-px canvas, so both sizes see the same relative blur
        cases = {
            "ground truth": gt,
            "blur 0.5 + noise 5": blur_noise(gt, 0.5 * s, 5, rng),
            "blur 0.7 + noise 10": blur_noise(gt, 0.7 * s, 10, rng),
            "blur 1.0": blur_noise(gt, 1.0 * s, 0, rng),
            "failure mode of category": [render(failure_scene(p.spec, rng), size) for p in prompts],
            "chance (other prompt's GT)": chance_images(prompts, size, rng),
            "uniform noise": [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in prompts],
            "blank": [np.full((size, size, 3), BACKGROUND, np.uint8) for _ in prompts],
        }
        print(header(f"{size}px"))
        for name, images in cases.items():
            print(row(name, evaluate_images(images, specs)))
        print()


def speed(sizes) -> None:
    print("## Evaluator speed on one core (BLAS and torch limited to 1 thread; images pre-rendered; best of 3)\n")
    prompts = split_prompts("eval")
    for size in sizes:
        images = [ground_truth(p, size).image for p in prompts]
        evaluate_images(images, [p.spec for p in prompts])  # warm the template caches
        for name, keep in (("all 840 eval images", None), ("six GenEval categories", "shapes"), ("text", "text")):
            idx = [i for i, p in enumerate(prompts) if keep is None or (p.spec.category == "text") == (keep == "text")]
            ims, specs = [images[i] for i in idx], [prompts[i].spec for i in idx]
            wall = cpu = float("inf")
            for _ in range(3):
                t, c = time.perf_counter(), time.process_time()
                evaluate_images(ims, specs)
                wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
            print(f"{size}px {name:<24} {len(ims) / wall:7.0f} images/s wall, {len(ims) / cpu:7.0f} per CPU-second")
    print()


def distribution(size: int, n_per_category: int) -> None:
    print(f"## Distribution metric at {size}px (probe features; reference: ground truth with other seeds)\n")
    prompts = [p for p in split_prompts("eval")]
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.spec.category, []).append(p)
    prompts = [p for c in ALL_CATEGORIES for p in by_cat[c][:n_per_category]]
    rng = np.random.default_rng(0)
    gt = [ground_truth(p, size).image for p in prompts]
    ref = [ground_truth(Prompt(p.caption, p.spec, p.seed + REFERENCE_SEED_OFFSET), size).image for p in prompts]
    cases = {
        "ground truth (new seeds)": gt,
        "blurred (sigma 1 px @32)": blur_noise(gt, size / 32, 0, rng),
        "shuffled colour (RGB->BRG)": [im[..., [2, 0, 1]] for im in gt],
        "uniform noise": [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in prompts],
    }
    f_ref = probe_features(ref)
    print(f"{'images (n=' + str(len(prompts)) + ')':<30}{'FD-probe':>12}{'KID-probe':>12}")
    for name, images in cases.items():
        f = probe_features(images)
        print(f"{name:<30}{frechet_distance(f, f_ref):>12.3f}{kid(f, f_ref):>12.4f}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--fd-per-category", type=int, default=120, help="prompts per category for the FD table")
    args = p.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    accuracy_tables(args.sizes)
    speed(args.sizes)
    for size in args.sizes:
        distribution(size, args.fd_per_category)
    print(f"(benchmark wall time {time.perf_counter() - t:.0f}s)")


if __name__ == "__main__":
    main()
