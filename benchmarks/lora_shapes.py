"""LoRA on a held-out combination: the score on the prompts naming it, before and after, and on the rest.

    python benchmarks/lora_shapes.py --scan            # the base per held-out pair: pick one it fails on
    t2i lora train configs/lora/sd3_shapes_green_cross.yaml
    python benchmarks/lora_shapes.py --pair "green cross" \
        --adapter runs/sd3_shapes_lora_green_cross/checkpoints/step_00001000/model.safetensors

``--scan`` scores the base alone on the whole ``heldout`` split, per held-out pair and category, to pick the pair
the base fails most on (the one a LoRA has room to improve).

The focus rows use every ``heldout`` prompt naming ``--pair``; the control row uses the first
``--per-category`` prompts of each ``eval`` category, which the adapter must leave within a stated tolerance.
Every figure is measured here, at the base model's default settings.
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.eval.quality import _fn
from t2i.io import load_weights
from t2i.nn.lora import load_lora_state_dict
from t2i.pipelines.folders import load_generator
from t2i.shapes.captions import split_prompts
from t2i.shapes.scoring import evaluate_generator
from t2i.shapes.specs import HELDOUT_PAIRS, uses_pair

CATS = ("counting", "colors", "position", "color_attribution")


def row(gen, name: str, pair: tuple[str, str], per_category: int) -> str:
    t = time.perf_counter()
    focus = evaluate_generator(_fn(gen, gen.defaults, 64), split="heldout", size=gen.defaults.size,
                               where=lambda p: uses_pair(p.spec, pair), batch_size=512)  # fmt: skip
    rest = evaluate_generator(_fn(gen, gen.defaults, 64), split="eval", size=gen.defaults.size,
                              per_category=per_category, batch_size=512)  # fmt: skip
    acc = focus.accuracy()
    cells = " | ".join("-" if c not in acc else f"{acc[c]:.3f}" for c in CATS)
    return (f"| {name} | {len(focus.results)} | {focus.overall:.3f} | {cells} | {rest.overall:.3f} | "
            f"{time.perf_counter() - t:.0f} |")  # fmt: skip


SEEDS = (0, 1)


def sheet_row(gen, prompts) -> list:
    """Images of each prompt at ``SEEDS``, the model's default settings."""
    from t2i.io.png import to_pil

    texts = [p.caption for p in prompts for _ in SEEDS]
    images = gen.generate(texts, [s for _ in prompts for s in SEEDS], gen.defaults)
    return [to_pil(im) for im in images]


def write_grid(path: str, rows: list, prompts) -> None:
    from t2i.io.png import contact_sheet

    images = [im for _, row_images in rows for im in row_images]
    labels = [f"{name}: {p.caption} (seed {s})" for name, _ in rows for p in prompts for s in SEEDS]
    contact_sheet(images, labels, cell=128, columns=len(prompts) * len(SEEDS)).save(path)
    print(f"grid: {path}")


def scan(gen) -> None:
    """Base accuracy on the heldout prompts of each held-out pair, per category."""
    report = evaluate_generator(_fn(gen, gen.defaults, 64), split="heldout", size=gen.defaults.size, batch_size=512)
    prompts = split_prompts("heldout")
    assert [p.caption for p in prompts] == [r.caption for r in report.results]
    print(f"| pair | prompts | overall | {' | '.join(CATS)} |")
    print("|---|---:|---:|" + "---:|" * len(CATS))
    for pair in sorted(HELDOUT_PAIRS):
        acc: dict[str, list[bool]] = {}
        for p, r in zip(prompts, report.results, strict=True):
            if uses_pair(p.spec, pair):
                acc.setdefault(r.category, []).append(r.passed)
        means = {c: sum(v) / len(v) for c, v in acc.items()}
        overall = sum(means.values()) / len(means)
        cells = " | ".join(f"{means[c]:.3f} ({len(acc[c])})" if c in means else "-" for c in CATS)
        print(f"| {' '.join(pair)} | {sum(map(len, acc.values()))} | {overall:.3f} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd3-shapes")
    ap.add_argument("--adapter", help="a LoRA file (a lora run's checkpoint model.safetensors)")
    ap.add_argument("--scan", action="store_true", help="score the base per held-out pair and exit")
    ap.add_argument("--pair", default="green cross", help='the "colour shape" pair the adapter was trained on')
    ap.add_argument("--per-category", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="also write a base-vs-LoRA image grid (first heldout prompts naming the pair)")
    ap.add_argument("--no-scores", action="store_true", help="only the grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = tuple(args.pair.split())
    if not args.scan and not args.adapter:
        ap.error("give --adapter (or --scan)")
    with torch.no_grad():
        gen = load_generator(args.model)
        if args.scan:
            return scan(gen)
        prompts = [p for p in split_prompts("heldout") if uses_pair(p.spec, pair)]
        prompts = [next(p for p in prompts if p.spec.category == c) for c in CATS]  # one per category
        grid = []
        if not args.no_scores:
            print(f"| model | heldout prompts naming {args.pair} | their overall | {' | '.join(CATS)} | "
                  f"eval overall ({args.per_category}/category) | seconds |")  # fmt: skip
            print("|---|---:|---:|" + "---:|" * len(CATS) + "---:|---:|")
            print(row(gen, f"{gen.name} (base)", pair, args.per_category), flush=True)
        if args.grid:
            grid.append(("base", sheet_row(gen, prompts)))
        load_lora_state_dict(gen.pipe.transformer, load_weights(args.adapter))
        if not args.no_scores:
            print(row(gen, f"{gen.name} + LoRA", pair, args.per_category))
        if args.grid:
            grid.append(("+ LoRA", sheet_row(gen, prompts)))
            write_grid(args.grid, grid, prompts)


if __name__ == "__main__":
    main()
