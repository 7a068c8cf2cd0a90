"""Entry point of the ``t2i`` command: a thin argparse front over the library.

Each command lives in its own module with ``register(subparsers)``, which adds a parser whose ``func`` default is
called with the parsed arguments. Heavy imports happen inside those functions, so ``t2i --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from t2i import __version__
from t2i.cli import eval as eval_cli
from t2i.cli import export, generate, info, lora, serve, train

COMMANDS = (generate, serve, info, train, eval_cli, lora, export)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2i",
        description="t2i: text-to-image diffusion (unCLIP and Stable Diffusion 3.5) on one shared core.",
    )
    parser.add_argument("--version", action="version", version=f"t2i {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS:
        module.register(sub)
    return parser


# Loggers that warn at import time about nothing a t2i user can act on: torchao (pulled in by transformers when the
# quant extra is installed) reports its CUDA-only kernels missing on a CPU machine, and torch's pytree notes
# torchao's deprecated Enum registrations.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting dotted overrides follow a flag (``t2i train CFG --resume run.steps=100``).

    argparse ends a ``nargs="*"`` positional at the first optional, so overrides written after ``--resume`` would
    be "unrecognized"; the leftovers that look like ``key=value`` are handed to commands that take overrides.
    """
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
        args.overrides = [*(args.overrides or []), *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, ImportError) as err:  # ImportError: a missing extra, named
        print(f"t2i {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
