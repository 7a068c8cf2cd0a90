"""``t2i eval shapes``: score a folder of images on the shapes benchmark, or write the folders it reads.

    t2i eval shapes --images DIR [--json report.json] [--grid grid.png] [--features]
    t2i eval shapes --write-prompts DIR [--split eval] [--per-prompt 4]     # metadata.jsonl for a sampler
    t2i eval shapes --write-ground-truth DIR [--split eval] [--size 32]     # rendered ground truth
    t2i eval quality [--models sd3-shapes unclip-shapes] [--per-category N]  # docs/quality.md
    t2i eval clip [--clip models/unclip-shapes/clip.safetensors] [--split eval]  # order and binding probe

The folder format (``metadata.jsonl`` + images) is documented in ``t2i/shapes/folders.py`` and docs/shapes.md.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate images (the shapes benchmark)")
    bench = p.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    s = bench.add_parser("shapes", help="GenEval-style shapes benchmark: per-category accuracy and FD-probe")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--images", metavar="DIR", help="score the images listed in DIR/metadata.jsonl")
    mode.add_argument("--write-prompts", metavar="DIR", help="write DIR/metadata.jsonl for a split, no images")
    mode.add_argument("--write-ground-truth", metavar="DIR", help="render a split's ground truth into DIR")
    s.add_argument("--split", default="eval", choices=("eval", "heldout"), help="prompt list to write")
    s.add_argument("--size", type=int, default=32, help="canvas size of written ground truth (>= 32)")
    s.add_argument("--per-prompt", type=int, default=1, help="images per prompt listed by --write-prompts")
    s.add_argument("--json", metavar="PATH", help="also write the full report (every image's verdict) as JSON")
    s.add_argument("--grid", metavar="PATH", help="also write a PNG grid of samples framed green/red")
    s.add_argument("--features", action="store_true", help="also compute FD-probe and KID against ground truth")
    s.set_defaults(func=run)
    q = bench.add_parser("quality", help="the quality report of models (default: both shipped models)")
    q.add_argument("--models", nargs="+", default=["sd3-shapes", "unclip-shapes"], help="shipped names or folders")
    q.add_argument("--out", default="docs/quality.md", help="Markdown report (a .json copy is written beside it)")
    q.add_argument("--per-category", type=int, help="only the first N prompts of each category (a quick subset)")
    q.add_argument(
        "--sweep-per-category",
        type=int,
        default=20,
        help="prompts per category in the step sweep (0: no sweep; the report is then JSON only, to --merge)",
    )
    q.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 28, 50], help="step counts of the sweep")
    q.add_argument("--precision", choices=("fp32", "bf16"), help="run the models so (default: each folder's own)")
    q.add_argument("--grid-dir", default="docs/images", help="where the per-split sample grids go ('' for none)")
    q.add_argument("--merge", nargs="+", metavar="JSON", help="instead: merge partial reports (one per model, made "
                   "side by side with the same settings) into --out")  # fmt: skip
    q.set_defaults(func=run_quality)
    c = bench.add_parser("clip", help="does a CLIP read relations and colour binding? (counterfactual captions)")
    c.add_argument("--clip", default="models/unclip-shapes/clip.safetensors",
                   help="a model folder's clip.safetensors, or a `t2i train` clip run")  # fmt: skip
    c.add_argument("--split", default="eval", choices=("eval", "heldout"))
    c.add_argument("--per-category", type=int, help="only the first N prompts of each category")
    c.set_defaults(func=run_clip_probe)


def run_clip_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from t2i.eval.clip_probe import counterfactual_probe, probe_table

    path = Path(args.clip)
    if not path.exists():
        raise FileNotFoundError(f"--clip {path} does not exist; pass a clip.safetensors or a clip training run")
    from t2i.train.trained import load_trained

    clip = load_trained(path, "clip").eval().requires_grad_(False)
    print(f"counterfactual probe of {path} on the {args.split} split")
    print(probe_table(counterfactual_probe(clip, args.split, args.per_category)))
    return 0


def run_quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from t2i.eval.quality import merge_reports, run_report

    if args.merge:
        data = merge_reports(args.merge, out_md=args.out)
        print(f"merged {len(args.merge)} reports into {args.out}")
        return 0
    data = run_report(
        args.models,
        out_md=args.out,
        per_category=args.per_category,
        sweep_per_category=args.sweep_per_category,
        steps=args.steps,
        grid_dir=args.grid_dir or None,
        precision=args.precision,
        sweep=args.sweep_per_category > 0,
    )
    for r in data["models"]:
        print(f"{r['model']}: eval {r['eval']['overall']:.3f}, heldout {r['heldout']['overall']:.3f}")
    wrote = args.out if all("sweep" in r for r in data["models"]) else "no Markdown (a partial report, for --merge)"
    print(f"wrote {wrote} and {Path(args.out).with_suffix('.json')} in {data['seconds']:.0f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.write_prompts:
        from t2i.shapes.folders import write_prompts

        path = write_prompts(args.write_prompts, args.split, per_prompt=args.per_prompt)
        print(f"wrote {path}: render each listed file into {path.parent}, then run t2i eval shapes --images")
        return 0
    if args.write_ground_truth:
        from t2i.shapes.folders import write_folder

        out = write_folder(args.write_ground_truth, args.split, args.size)
        print(f"wrote the {args.split} split's ground truth at {args.size} px to {out}")
        return 0

    from t2i.shapes.scoring import evaluate_folder

    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images} is not a folder; pass the folder holding metadata.jsonl")
    report = evaluate_folder(args.images, features=args.features, grid=args.grid, json_path=args.json)
    print(f"shapes benchmark: {len(report.results)} images at {report.size} px from {args.images}")
    print(report.table())
    return 0
