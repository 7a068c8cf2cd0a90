"""LoRA on a held-out combination: the score on the prompts naming it, before and after, and on the rest.

    t2i lora train configs/lora/sd3_shapes_purple_circle.yaml
    python benchmarks/lora_shapes.py \
        --adapter runs/sd3_shapes_lora_purple_circle/checkpoints/step_00000400/model.safetensors

The focus rows use every ``heldout`` prompt naming ``--pair``; the control row uses the first
``--per-category`` prompts of each ``eval`` category, which the adapter must leave within a stated tolerance.
Every figure is measured here, at the base model's default settings.
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.data.captions import uses_pair
from t2i.eval.quality import _fn
from t2i.eval.shapes import evaluate_generator
from t2i.io import load_weights
from t2i.nn.lora import load_lora_state_dict
from t2i.pipelines.shipped import load_generator

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd3-shapes")
    ap.add_argument("--adapter", required=True, help="a LoRA file (a lora run's checkpoint model.safetensors)")
    ap.add_argument("--pair", default="purple circle", help='the "colour shape" pair the adapter was trained on')
    ap.add_argument("--per-category", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = tuple(args.pair.split())
    with torch.no_grad():
        gen = load_generator(args.model)
        print(f"| model | heldout prompts naming {args.pair} | their overall | {' | '.join(CATS)} | "
              f"eval overall ({args.per_category}/category) | seconds |")  # fmt: skip
        print("|---|---:|---:|" + "---:|" * len(CATS) + "---:|---:|")
        print(row(gen, f"{gen.name} (base)", pair, args.per_category), flush=True)
        load_lora_state_dict(gen.pipe.transformer, load_weights(args.adapter))
        print(row(gen, f"{gen.name} + LoRA", pair, args.per_category))


if __name__ == "__main__":
    main()
