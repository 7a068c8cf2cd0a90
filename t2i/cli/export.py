"""``t2i export``: write a model folder (what ships in ``models/``) from ``t2i train`` runs.

    t2i export sd3 --out models/sd3-shapes          # runs/default_{sd3,vae,clip}
    t2i export unclip --out models/unclip-shapes    # runs/default_{clip,prior,decoder,sr}
    t2i export controlnet --run runs/controlnet_shapes_outlines --out models/sd3-shapes   # adds controlnet.safetensors

Each network is taken from its run's newest checkpoint (EMA weights), or from the checkpoint folder named instead
of the run (``--transformer runs/x/checkpoints/step_00001000``), stored in fp16 with its config, and the
sampling settings are read from the runs' own configs; a model card (README.md) records the training.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model folder from training runs (see models/)")
    kinds = p.add_subparsers(dest="kind", metavar="<kind>", required=True)
    s = kinds.add_parser("sd3", help="an MMDiT run + its VAE and CLIP runs")
    s.add_argument(
        "--transformer",
        default="runs/default_sd3_polish",
        help="the sd3 task run (its last stage), or one of its checkpoint folders",
    )
    s.add_argument("--vae", default="runs/default_vae", help="the sd3_vae run")
    s.add_argument("--clip", default="runs/default_clip", help="the clip run (text encoder)")
    s.add_argument("--name", default="sd3-shapes")
    s.add_argument("--out", required=True, help="the model folder to write")
    s.add_argument("--share-from", metavar="FOLDER",
                   help="use this sd3 model folder's VAE and CLIP files instead of copies (a distilled student "
                        "beside its teacher); they must hold the --vae and --clip runs' weights")  # fmt: skip
    _defaults(s)
    g = s.add_argument_group("skip-layer guidance written to model.json (default: off)")
    g.add_argument("--slg-scale", type=float, help="skip-layer guidance strength (SD3.5 Medium uses 2.5)")
    g.add_argument("--slg-layers", type=_layers, help="the MMDiT blocks skipped, comma-separated (e.g. 2,3)")
    s.add_argument("--guidance-interval", type=_interval, metavar="LOW,HIGH",
                   help="classifier-free guidance only while the noise level (1 = pure noise) lies in [LOW, HIGH], "
                        "e.g. 0,0.8 (default: every step)")  # fmt: skip
    s.set_defaults(func=run)
    u = kinds.add_parser("unclip", help="CLIP + prior + base decoder + super-resolution runs")
    u.add_argument("--clip", default="runs/default_clip")
    u.add_argument("--prior", default="runs/default_prior")
    u.add_argument("--decoder", default="runs/default_decoder")
    u.add_argument("--sr", default="runs/default_sr")
    u.add_argument("--name", default="unclip-shapes")
    u.add_argument("--out", required=True)
    _defaults(u)
    g = u.add_argument_group(
        "the prior's own sampling settings in model.json (default: 32 DDIM steps, guidance 2, "
        "best of 2; an existing folder's prior keeps its folder's)"
    )
    g.add_argument("--prior-steps", type=int, help="steps of the prior's sampler")
    g.add_argument("--prior-sampler", help="the prior's sampler")
    g.add_argument("--prior-guidance", type=float, help="the prior's classifier-free guidance scale")
    g.add_argument("--prior-candidates", type=int,
                   help="embeddings the prior samples per prompt; the one closest to the caption is kept")  # fmt: skip
    g = u.add_argument_group("the upsamplers' own sampling settings in model.json (default: the sr run's)")
    g.add_argument("--upsampler-steps", type=int, help="steps of each super-resolution stage")
    g.add_argument("--upsampler-sampler", help="sampler of each super-resolution stage")
    u.set_defaults(func=run)
    c = kinds.add_parser("controlnet", help="add a controlnet task run's ControlNet to an sd3 model folder")
    c.add_argument("--run", required=True, help="the controlnet task run")
    c.add_argument("--out", required=True, help="the sd3 model folder that gets controlnet.safetensors")
    c.set_defaults(func=run_controlnet)


def _defaults(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling defaults written to model.json (default: the training run's settings)")
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", "--cfg", dest="guidance", type=float, help="guidance scale (--cfg: the same)")
    g.add_argument("--sampler")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="how the denoisers run: bf16 autocast (default) or fp32")  # fmt: skip


def _layers(text: str) -> list[int]:
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 2,3, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected block indices >= 0 like 2,3, got {text!r}")
    return layers


def _interval(text: str) -> list[float]:
    from t2i.diffusion import check_guidance_interval

    try:
        return list(check_guidance_interval(text.split(",")))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}; write it as LOW,HIGH, e.g. 0,0.8") from None


def run_controlnet(args: argparse.Namespace) -> int:
    from t2i.pipelines.model_card import write_model_card
    from t2i.train.export import export_controlnet

    out = export_controlnet(args.out, run=args.run)
    card = write_model_card(out)  # the card lists the ControlNet beside the other parts
    print(f"wrote {out / 'controlnet.safetensors'} ({(out / 'controlnet.safetensors').stat().st_size / 1e6:.2f} MB) "
          f"and refreshed {card}")  # fmt: skip
    return 0


def _sampling_flags(args: argparse.Namespace, part: str, keys: tuple[str, ...]) -> dict:
    """The sampling settings given as ``--{part}-{key}`` flags (``--{key}`` for no part), each checked under its
    flag's name."""
    from t2i.diffusion import check_sampling_setting

    given = {k: getattr(args, f"{part}_{k}" if part else k) for k in keys}
    return {k: check_sampling_setting(k, v, f"--{part}-{k}" if part else f"--{k}") for k, v in given.items()
            if v is not None}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from t2i.cli.main import CLIError
    from t2i.pipelines.model_card import write_model_card
    from t2i.train.export import export_sd3, export_unclip

    defaults = _sampling_flags(args, "", ("steps", "guidance", "sampler"))
    if args.kind == "sd3":
        if args.slg_scale is not None:
            defaults["slg_scale"] = args.slg_scale
        if args.slg_layers is not None:
            if not args.slg_scale:
                raise CLIError("--slg-layers needs --slg-scale (a strength above 0)")
            defaults["slg_layers"] = args.slg_layers
        if args.guidance_interval is not None:
            defaults["guidance_interval"] = args.guidance_interval
        out = export_sd3(args.out, transformer=args.transformer, vae=args.vae, clip=args.clip, name=args.name,
                         defaults=defaults, share_from=args.share_from, precision=args.precision)  # fmt: skip
    else:
        prior = _sampling_flags(args, "prior", ("steps", "sampler", "guidance", "candidates"))
        upsampler = _sampling_flags(args, "upsampler", ("steps", "sampler"))
        out = export_unclip(args.out, clip=args.clip, prior=args.prior, decoder=args.decoder, sr=args.sr,
                            name=args.name, defaults=defaults, precision=args.precision,
                            prior_settings=prior, upsampler_settings=upsampler)  # fmt: skip
    card = write_model_card(out)
    sizes = {f.name: f.stat().st_size for f in sorted(out.glob("*.safetensors"))}
    for name, size in sizes.items():
        print(f"{out / name}: {size / 1e6:.2f} MB")
    print(f"wrote {out} ({sum(sizes.values()) / 1e6:.2f} MB of weights) and its model card {card}")
    return 0
