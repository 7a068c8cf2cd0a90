"""``t2i lora``: train adapters, merge them into base weights, convert between LoRA file layouts.

t2i lora train CONFIG.yaml [key=value ...]            # a config with task.name: lora (see docs/lora.md)
t2i lora merge BASE.safetensors A.safetensors[:0.8] [B.safetensors:0.5 ...] -o MERGED.safetensors
t2i lora convert IN.safetensors --to diffusers|kohya|t2i -o OUT.safetensors [--base BASE.safetensors]
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: train, merge into base weights, convert file layouts")
    lora = p.add_subparsers(dest="lora_command", metavar="<action>", required=True)

    t = lora.add_parser("train", help="train adapters (a config whose task.name is 'lora')")
    t.add_argument("config", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.params.rank=8")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.set_defaults(func=run_train)

    m = lora.add_parser("merge", help="fold one or more adapters into base weights (a new file)")
    m.add_argument("base", help="base weights (.safetensors)")
    m.add_argument("loras", nargs="+", help="LoRA files, each optionally ':weight' (default 1.0)")
    m.add_argument("-o", "--output", required=True, help="merged weights file to write")
    m.set_defaults(func=run_merge)

    c = lora.add_parser("convert", help="convert a LoRA file between the t2i, kohya and diffusers layouts")
    c.add_argument("input", help="LoRA file (.safetensors)")
    c.add_argument("--to", required=True, choices=("t2i", "kohya", "diffusers"), help="target layout")
    c.add_argument("-o", "--output", required=True, help="file to write")
    c.add_argument("--base", help="base weights whose module names resolve kohya names (needed to read kohya)")
    c.set_defaults(func=run_convert)


def _module_names(base: str | None) -> list[str] | None:
    if base is None:
        return None
    from safetensors import safe_open

    with safe_open(base, framework="pt") as f:
        return sorted({k.rsplit(".", 1)[0] for k in f.keys()})  # noqa: SIM118 (safe_open is not a Mapping)


def _split_weight(spec: str) -> tuple[str, float]:
    path, sep, w = spec.rpartition(":")
    if sep and path and not w.endswith(".safetensors"):
        try:
            return path, float(w)
        except ValueError:
            raise ValueError(f"bad LoRA weight in {spec!r}: expected PATH or PATH:NUMBER") from None
    return spec, 1.0


def run_train(args: argparse.Namespace) -> int:
    from t2i.train.config import load_config
    from t2i.train.loop import train

    cfg = load_config(args.config, args.overrides)
    if cfg.task.name != "lora":
        raise ValueError(f"{args.config} trains task {cfg.task.name!r}; t2i lora train needs task.name: lora")
    summary = train(cfg, resume=args.resume)
    print(f"adapter checkpoints in {summary['run_dir']}/checkpoints (model.safetensors holds the adapter alone)")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from t2i.io import load_weights, save_weights
    from t2i.io.lora import convert_lora, load_lora, merge_into_state_dict

    base = load_weights(args.base)
    names = sorted({k.rsplit(".", 1)[0] for k in base})
    loras = []
    for spec in args.loras:
        path, weight = _split_weight(spec)
        state, meta = load_lora(path)
        loras.append((convert_lora(state, "t2i", module_names=names, metadata=meta), weight))
    save_weights(args.output, merge_into_state_dict(base, loras), metadata={"merged_loras": ",".join(args.loras)})
    print(f"wrote {args.output}: {args.base} with {len(loras)} adapter(s) merged")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from t2i.io.lora import convert_lora, detect_format, load_lora, save_lora

    state, meta = load_lora(args.input)
    out = convert_lora(state, args.to, module_names=_module_names(args.base), metadata=meta)
    save_lora(args.output, out, metadata={k: v for k, v in meta.items() if k.startswith("base")})
    print(f"wrote {args.output}: {detect_format(state)} -> {args.to}, {len(out)} tensors")
    return 0
