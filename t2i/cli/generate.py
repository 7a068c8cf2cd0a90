"""``t2i generate``: text to images with a shipped model, a t2i model folder or an official SD3.5 checkpoint.

    t2i generate "a red circle above a blue square" -n 4 --seed 7 -o out/
    t2i generate --from-file prompts.txt --model unclip-shapes --steps 16

Image ``k`` of a prompt uses seed ``seed + k``, whatever the batch it runs in, so a file can be regenerated
alone from the settings in its PNG ``parameters`` chunk. All (prompt, seed) pairs are batched together across
prompts (``--batch-size``). Every image is written as ``<prompt#>-<seed>-<slug>.png``; a contact sheet of all of
them goes to ``contact_sheet.png``. Arguments are checked before any model is loaded, so a typo costs no time.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "sd3-shapes"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images from text prompts",
        description="Generate images from text prompts. Flags left out take the model's own defaults.",
    )
    p.add_argument("prompt", nargs="?", help="the text prompt (or use --from-file)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image; image k uses seed + k")
    p.add_argument("-o", "--output", default="out", help="output folder (default out/)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a shipped model (sd3-shapes, sd3-shapes-turbo, unclip-shapes), a t2i model folder, or an "
                        f"official SD3/SD3.5 file or diffusers folder (default {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float,
                   help="classifier-free guidance scale (1 disables it); --cfg is the same flag")  # fmt: skip
    p.add_argument("--sampler", help="sampler name (see `t2i info`)")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--negative", default="", help="negative prompt (SD3-family models)")
    p.add_argument("--preset", help="a named settings preset of the model (e.g. sd3.5-large-turbo, fast)")
    p.add_argument("--quantize", choices=["int8"], help="store an SD3 model's large weights as int8 (needs torchao)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="run the denoisers in fp32 or under bf16 autocast (default: the model folder's choice, "
                        "bf16 for the shipped models where the CPU has native bf16, else fp32; fp32 for official "
                        "files)")  # fmt: skip
    p.add_argument("--init-image", metavar="PNG", help="img2img: start from this image (SD3-family models)")
    p.add_argument("--mask", metavar="PNG", help="inpainting: repaint where this mask is white (needs --init-image)")
    p.add_argument("--strength", type=float, help="img2img / inpainting: how much to repaint, in (0, 1] (0.8)")
    p.add_argument("--mask-blur", type=float, help="inpainting: soften the mask's edge by this many pixels (0)")
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="KIND:PNG[:SCALE[:START:END]]",
        help="a ControlNet control (repeatable; several sum): KIND is canny, blur, depth or none (the image as "
        "given), SCALE its strength (1), START:END the fraction of the steps where it acts (0:1), e.g. "
        "canny:photo.png:0.8 or depth:depth.png:1:0:0.6",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="ControlNet weights (repeatable): an SD3.5 ControlNet file, a diffusers SD3ControlNetModel folder or a "
        "t2i ControlNet file; a model folder's own controlnet.safetensors loads by itself",
    )
    p.add_argument(
        "--controlnet-layout",
        choices=["reference", "diffusers"],
        help="which MMDiT blocks take the ControlNet residuals: reference (all, the default) or diffusers (all "
        "but the last)",
    )
    p.add_argument("--from-file", help="a text file with one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--no-sheet", action="store_true", help="do not write contact_sheet.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _prompts(args) -> list[str]:
    from t2i.cli.main import CLIError

    if args.from_file is not None:
        if args.prompt is not None:
            raise CLIError("give a prompt or --from-file, not both")
        path = Path(args.from_file)
        if not path.is_file():
            raise CLIError(f"--from-file {path}: no such file")
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if not prompts:
            raise CLIError(f"--from-file {path} has no prompts (one per line; blank lines and # comments skipped)")
        return prompts
    if args.prompt is None or not args.prompt.strip():
        raise CLIError('the prompt is empty; pass some text, e.g. t2i generate "a red circle above a blue square"')
    return [args.prompt.strip()]


MAX_SEED = 2**62  # torch generators take 64-bit seeds; room for seed + k over any batch


def _check_args(args) -> None:
    from t2i.cli.main import CLIError

    if args.num_images < 1:
        raise CLIError(f"--num-images must be at least 1, got {args.num_images}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.seed < MAX_SEED:  # checked before the model loads: image k uses seed + k
        raise CLIError(f"--seed must lie in [0, 2**62), got {args.seed}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out} exists and is not a folder")
    if args.mask and not args.init_image:
        raise CLIError("--mask needs --init-image: inpainting repaints part of an existing image")
    args.control_specs = [parse_control_spec(text) for text in args.control]
    for path in args.controlnet:
        if not Path(path).exists():
            raise CLIError(f"--controlnet {path}: no such file or folder")


def parse_control_spec(text: str) -> tuple[str, str, float, float, float]:
    """``KIND:PATH[:SCALE[:START:END]]`` -> (kind, path, scale, start, end), checked; numbers are read from the
    right, so a path may itself hold colons."""
    from t2i.cli.main import CLIError
    from t2i.data.control import CONTROL_KINDS

    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise CLIError(f"--control {text!r}: write KIND:PNG[:SCALE[:START:END]], e.g. canny:edges.png:0.8")
    if kind not in CONTROL_KINDS:
        from t2i.errors import unknown_choice

        raise CLIError(f"--control {text!r}: {unknown_choice('control kind', kind, CONTROL_KINDS)}")
    parts = rest.split(":")

    def number(s: str) -> float | None:
        try:
            x = float(s)
        except ValueError:
            return None
        return x if abs(x) < float("inf") else None

    numbers: list[float] = []
    for count in (3, 1):  # SCALE:START:END, else SCALE
        tail = [number(s) for s in parts[-count:]] if len(parts) > count else []
        if tail and all(x is not None for x in tail):
            numbers, parts = tail, parts[:-count]
            break
    path = ":".join(parts)
    scale, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers) :]) if numbers else (1.0, 0.0, 1.0)
    if not 0.0 <= start < end <= 1.0:
        raise CLIError(f"--control {text!r}: the window START:END must satisfy 0 <= START < END <= 1, got "
                       f"{start:g}:{end:g}")  # fmt: skip
    if not Path(path).is_file():
        raise CLIError(f"--control {text!r}: no image file {path!r}")
    return kind, path, scale, start, end


def _controls(args):
    """The ``Control`` of every --control, its image loaded (checked readable)."""
    from PIL import Image, UnidentifiedImageError

    from t2i.cli.main import CLIError
    from t2i.pipelines.control import Control

    controls = []
    for kind, path, scale, start, end in args.control_specs:
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (OSError, UnidentifiedImageError) as err:
            raise CLIError(f"--control {path}: not a readable image ({err})") from None
        controls.append(Control(image, kind, scale, start, end))
    return controls


def _edit_images(args):
    """(init image, mask) as PIL images from --init-image / --mask (None where not given), checked readable."""
    from PIL import Image, UnidentifiedImageError

    from t2i.cli.main import CLIError

    loaded = []
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is None:
            loaded.append(None)
            continue
        try:
            with Image.open(path) as im:
                loaded.append(im.convert("RGB" if flag == "--init-image" else "L"))
        except (OSError, UnidentifiedImageError) as err:
            raise CLIError(f"{flag} {path}: not a readable image ({err})") from None
    return tuple(loaded)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-") or "image"


# the flag that sets each Settings field (errors name the flag the user typed)
_FLAG = {
    "guidance": "--guidance",
    "negative": "--negative",
    "init_image": "--init-image",
    "mask_blur": "--mask-blur",
    "control": "--control",
    "controlnet": "--controlnet",
    "controlnet_layout": "--controlnet-layout",
}


def _settings(gen, args):
    """The flags over the model's defaults (or ``--preset``), through ``Generator.settings`` as the server does."""
    from t2i.cli.main import CLIError
    from t2i.pipelines.generator import SettingsError

    pairs = (("strength", args.strength), ("mask_blur", args.mask_blur), ("controlnet_layout", args.controlnet_layout))
    extra = {k: v for k, v in pairs if v is not None}
    try:
        return gen.settings(args.preset, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                            size=args.size, negative=args.negative or None, extra=extra or None)  # fmt: skip
    except SettingsError as err:
        flag = _FLAG.get(err.field, f"--{err.field}")
        raise CLIError(f"{flag}: {err}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():  # not torch.set_grad_enabled: the CLI also runs inside other programs (and tests)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    prompts = _prompts(args)
    _check_args(args)

    from t2i.cli.main import CLIError
    from t2i.io.png import contact_sheet, format_parameters, save_png, to_pil
    from t2i.pipelines.folders import load_generator
    from t2i.pipelines.generator import SettingsError

    try:
        gen = load_generator(args.model, quantize=args.quantize, precision=args.precision,
                             controlnets=args.controlnet)  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        if not args.controlnet:
            raise
        raise CLIError(f"--controlnet: {err}") from None
    if gen.precision_note:
        print(f"{gen.name}: {gen.precision_note}; --precision bf16 forces it")
    s = _settings(gen, args)
    init, mask = _edit_images(args)
    controls = _controls(args)
    try:
        if init is not None:
            gen.check_edits(init, mask)
        gen.check_controls(controls)
    except SettingsError as err:
        raise CLIError(f"{_FLAG.get(err.field, '--' + err.field)}: {err}") from None
    jobs = [(i, p, args.seed + k) for i, p in enumerate(prompts) for k in range(args.num_images)]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="img", desc=f"{gen.name} {s.size}px {s.steps} steps", file=sys.stderr)
    files, pils, labels, first = [], [], [], None
    for b in range(0, len(jobs), args.batch_size):
        batch = jobs[b : b + args.batch_size]
        images = gen.generate([p for _, p, _ in batch], [seed for _, _, seed in batch], s, init_images=init,
                              masks=mask, controls=controls)  # fmt: skip
        for (i, prompt, seed), image in zip(batch, images, strict=True):
            pil = to_pil(image)
            params = format_parameters(prompt, s.describe(gen.name, seed), args.negative)
            path = save_png(out / f"{i:03d}-{seed}-{_slug(prompt)}.png", pil, params)
            files.append(path)
            pils.append(pil)
            labels.append(f"{seed}: {prompt}")
        if first is None:
            first = time.perf_counter() - t_start
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    print(f"wrote {len(files)} image{'s' * (len(files) != 1)} to {out}/ (first after {first:.1f} s, all after "
          f"{time.perf_counter() - t_start:.1f} s)")  # fmt: skip
    if not args.no_sheet:
        sheet = contact_sheet(pils, labels, cell=max(128, s.size))
        sheet.save(out / "contact_sheet.png")
        print(f"contact sheet: {out / 'contact_sheet.png'}")
    return 0
