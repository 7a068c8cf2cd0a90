"""``t2i info``: versions, the samplers, paths and objectives this build provides, and the shipped models."""

from __future__ import annotations

import argparse
import platform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions and the available samplers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from t2i import __version__
    from t2i.diffusion import PREDICTIONS, SAMPLERS, TIME_SAMPLERS

    print(f"t2i {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()}  cuda: {torch.cuda.is_available()}")
    from t2i.nn.precision import bf16_is_native, bf16_slowdown, x86_bf16_units

    units = {True: "AVX-512 BF16 or AMX: yes; ", False: "AVX-512 BF16 or AMX: no; ", None: ""}[x86_bf16_units()]
    if bf16_is_native("cpu"):
        verdict = "native: bf16 autocast is a fast path"
    else:
        verdict = "emulated: the shipped models run fp32 here; train with run.precision=fp32"
    print(f"cpu bf16 matmul: {bf16_slowdown('cpu'):.2f}x the fp32 time ({units}{verdict})")
    print("samplers:")
    for name, s in SAMPLERS.items():
        kind = "stochastic" if s.stochastic else "deterministic"
        print(f"  {name:<16} {kind:<13} order {s.order}  {s.description}")
    print(f"predictions: {', '.join(PREDICTIONS)}")
    print(f"training time densities: {', '.join(TIME_SAMPLERS)}")
    from t2i.pipelines.folders import SHIPPED, model_folder, models_dir, read_model_json
    from t2i.pipelines.generator import Settings

    print(f"shipped models ({models_dir()}):")
    for name in SHIPPED:
        folder = model_folder(name)
        if folder is None:
            print(f"  {name:<16} missing")
            continue
        d = Settings.from_dict(read_model_json(folder)["defaults"]).to_dict()
        mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
        print(f"  {name:<16} {d['size']} px, {d['steps']} steps of {d['sampler']}, CFG {d['guidance']}  ({mb:.1f} MB)")
    return 0
