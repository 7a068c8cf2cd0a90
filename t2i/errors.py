"""Errors that tell the user what to do: one "did you mean" for every name a user types.

Model names, sampler names, config keys, task names and CLI choices all go through ``unknown_choice``, so a typo
gets the same message wherever it is made. This module imports nothing from t2i: every layer may use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, options: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The option nearest to ``name`` (difflib's ratio above ``cutoff``), or None."""
    found = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=cutoff)
    return found[0] if found else None


def unknown_choice(what: str, name: object, options: Iterable[str], *, cutoff: float = 0.6,
                   prefix: str = "") -> ValueError:  # fmt: skip
    """A ``ValueError`` for an unknown ``what`` called ``name``, naming the nearest option and listing them all.

    ``prefix`` is put before the name and the suggestion (``"model.params."`` makes both config paths)."""
    options = sorted(str(o) for o in options)
    close = closest(str(name), options, cutoff)
    hint = f"; did you mean {prefix + close!r}?" if close else ""
    return ValueError(f"unknown {what} {prefix + str(name)!r}{hint} (choose one of: {', '.join(options)})")


def check_choice(what: str, name: object, options: Iterable[str], **kw) -> None:
    """Raise ``unknown_choice`` unless ``name`` is one of ``options``."""
    options = list(options)
    if name not in options:
        raise unknown_choice(what, name, options, **kw)
