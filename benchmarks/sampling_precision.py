"""Sampling the shipped models in fp32 and under bf16: the shapes benchmark's ``eval`` score and images per second.

    python benchmarks/sampling_precision.py [--models sd3-shapes unclip-shapes sd3-shapes-turbo] [--threads 1]
        [--per-category N] [--precisions fp32 bf16]

For each model and precision (``load_generator(precision=)``: bf16 is autocast on the denoisers, plus
``channels_last`` for the unCLIP Unets), the ``eval`` split is drawn at the model's default settings in batches of
64, exactly as ``make quality`` draws it, and scored by the unchanged evaluator. The precisions of one model run
one after the other in one process; images/s counts generation only (not loading, not scoring). ``--per-category``
limits the split to its first N prompts per category (the full split is 840 prompts).
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.eval.quality import evaluate_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd3-shapes", "unclip-shapes", "sd3-shapes-turbo"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--per-category", type=int, help="only the first N prompts of each category")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
            ips = e["n_images"] / e["seconds"]
            base = base or ips
            cats = " ".join(f"{k} {v:.3f}" for k, v in e["accuracy"].items())
            rows.append(f"| {r['model']} | {precision} | {e['overall']:.3f} | {e['n_images']} | {e['seconds']:.1f} | "
                        f"{ips:.2f} | {ips / base:.2f}x |")  # fmt: skip
            print(f"{r['model']} {precision}: {cats} ({time.perf_counter() - t:.0f} s with loading and scoring)")
    print("\n| model | precision | `eval` overall | images | seconds | images/s | vs first |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
