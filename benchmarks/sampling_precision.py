"""Sampling the shipped models in fp32 and under bf16: the shapes benchmark's ``eval`` score and images per second.

    python benchmarks/sampling_precision.py [--models sd3-shapes unclip-shapes sd3-shapes-turbo] [--threads 1]
        [--per-category N] [--precisions fp32 bf16]

For each model and precision (``load_generator(precision=)``: bf16 is autocast on the denoisers, plus
``channels_last`` for the unCLIP Unets), the ``eval`` split is drawn at the model's default settings in batches of
64, exactly as ``make quality`` draws it, and scored by the unchanged evaluator. The precisions of one model run
one after the other in one process; the seconds are the split's, drawing and scoring together (``evaluate_model``
times them as one), not loading. ``--per-category``
limits the split to its first N prompts per category (the full split is 840 prompts).

``--speed-only N`` skips the scoring and times the precisions alternately instead, on one batch of N ``eval``
prompts spread over the categories, best of ``--reps``: the cleaner speed ratio on a shared machine, where the
full runs of the two precisions may meet different load.
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.eval.quality import evaluate_model


def speed_only(models: list[str], precisions: list[str], n: int, reps: int) -> None:
    from t2i.pipelines.folders import load_generator
    from t2i.shapes.captions import split_prompts

    split = split_prompts("eval")
    items = split[:: max(1, len(split) // n)][:n]  # spread over the categories
    prompts, seeds = [p.caption for p in items], [p.seed for p in items]
    print(
        f"one batch of {n} eval prompts (every {max(1, len(split) // n)}th) at each model's defaults; best of "
        f"{reps}, alternating\n"
    )
    print("| model | precision | seconds | images/s | vs first |\n|---|---|---:|---:|---:|")
    for model in models:
        gens = {p: load_generator(model, precision=p) for p in precisions}
        best = dict.fromkeys(precisions, float("inf"))
        for _ in range(reps):
            for p, gen in gens.items():
                t = time.perf_counter()
                gen.generate(prompts, seeds, gen.settings())
                best[p] = min(best[p], time.perf_counter() - t)
        for p in precisions:
            print(f"| {model} | {p} | {best[p]:.2f} | {n / best[p]:.2f} | {best[precisions[0]] / best[p]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd3-shapes", "unclip-shapes", "sd3-shapes-turbo"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--per-category", type=int, help="only the first N prompts of each category")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-only", type=int, metavar="N", help="only time one batch of N prompts, alternating")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per precision with --speed-only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed_only:
        speed_only(args.models, args.precisions, args.speed_only, args.reps)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s); eval split"
          f"{'' if args.per_category is None else f', first {args.per_category} prompts per category'}\n")  # fmt: skip
    rows = []
    for model in args.models:
        base = None
        for precision in args.precisions:
            t = time.perf_counter()
            r = evaluate_model(model, per_category=args.per_category, splits=("eval",), sweep=False, grid_dir=None,
                               precision=precision, log=lambda *a: None)  # fmt: skip
            e = r["eval"]
            ips = e["n_images"] / e["seconds"]  # drawn and scored
            base = base or ips
            cats = " ".join(f"{k} {v:.3f}" for k, v in e["accuracy"].items())
            rows.append(f"| {r['model']} | {precision} | {e['overall']:.3f} | {e['n_images']} | {e['seconds']:.1f} | "
                        f"{ips:.2f} | {ips / base:.2f}x |")  # fmt: skip
            print(f"{r['model']} {precision}: {cats} ({time.perf_counter() - t:.0f} s with loading and scoring)")
    print("\n| model | precision | `eval` overall | images | seconds (drawing + scoring) | images/s | vs first |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
