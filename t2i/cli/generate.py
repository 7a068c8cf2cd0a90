"""``t2i generate``: text to image with a shipped or local model.

No default model ships yet (it is trained by this project's own code in a later milestone), so for now the
command checks its arguments and says so plainly instead of pretending to generate anything.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a text prompt")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("-o", "--output", default="out", help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from t2i.cli.main import CLIError

    if not args.prompt.strip():
        raise CLIError('the prompt is empty; pass some text, e.g. t2i generate "a red circle"')
    if args.num_images < 1:
        raise CLIError(f"--num-images must be at least 1, got {args.num_images}")
    raise CLIError(
        "no default model is shipped yet: the small shapes models are still to be trained "
        "(see the Status table in the README). Nothing was generated."
    )
