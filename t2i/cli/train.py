"""``t2i train``: train a model from a YAML config with dotted overrides; ``--dry-run`` prints the resolved config.

    t2i train configs/tiny/flow_rf.yaml optim.lr=3e-4 run.steps=50
    t2i train configs/tiny/flow_rf.yaml --resume                  # continue from the newest checkpoint
    t2i train configs/tiny/flow_rf.yaml --resume-from runs/tiny_flow_rf/checkpoints/step_00000020
    torchrun --nproc_per_node 2 -m t2i.cli.main train configs/tiny/flow_rf.yaml   # DDP (gloo on CPU)

``t2i cache-embeddings`` encodes a dataset once with a model's encoder and writes a safetensors embedding dataset
that ``data.source=embeddings`` trains on.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file, e.g. configs/tiny/flow_rf.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 run.steps=100")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of the run (fresh if none)"
    )
    p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint folder")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickle weight files (.pt/.bin), read with torch.load(weights_only=True)",
    )
    p.set_defaults(func=run)

    c = sub.add_parser("cache-embeddings", help="encode a dataset once into a safetensors embedding dataset")
    c.add_argument("config", help="YAML config whose data section describes the images to encode")
    c.add_argument("output", help="output .safetensors file")
    c.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    c.add_argument(
        "--encoder", default="pixels", help="encoder name from t2i.data.embeddings.ENCODERS (default: pixels)"
    )
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--limit", type=int, default=None, help="encode only the first N samples")
    c.set_defaults(func=run_cache)


def run(args: argparse.Namespace) -> int:
    from t2i.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from t2i.train.tasks import resolve_params

        print(resolve_params(cfg).to_yaml(), end="")  # also validates model.params and task.params
        return 0
    from t2i.train.loop import train

    if args.resume and args.resume_from:
        raise ValueError("pass either --resume (newest checkpoint) or --resume-from CKPT, not both")
    summary = train(cfg, resume=args.resume_from or args.resume, allow_pickle=args.allow_pickle)
    if summary["rank"] == 0:
        print(json.dumps(summary, default=str))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from t2i.data.embeddings import cache_embeddings
    from t2i.train.config import load_config
    from t2i.train.data import build_dataset

    cfg = load_config(args.config, args.overrides)
    if cfg.data.source == "embeddings":
        raise ValueError("the config's data source is already an embeddings file; point it at images to encode")
    dataset = build_dataset(cfg.data, seed=cfg.run.seed)
    n = cache_embeddings(dataset, args.output, encoder=args.encoder, batch_size=args.batch_size, limit=args.limit)
    print(f"wrote {n} embeddings to {args.output}")
    return 0
