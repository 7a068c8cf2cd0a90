"""PNG files that remember how they were made, and contact sheets.

Generation settings go in the PNG ``parameters`` text chunk, in the layout AUTOMATIC1111's web UI writes and
ComfyUI, InvokeAI, civitai and PNG-info readers parse:

    a red circle above a blue square
    Negative prompt: blurry
    Steps: 28, Sampler: euler, CFG scale: 4.0, Seed: 7, Size: 64x64, Model: sd3-shapes, Version: t2i 0.1.0

The prompt comes first (it may span lines), then an optional ``Negative prompt:`` line, then one line of
``key: value`` pairs. ``parse_parameters`` reads that back, so a file's settings can be replayed exactly.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torch import Tensor

_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def format_parameters(prompt: str, settings: Mapping[str, Any], negative: str = "") -> str:
    """The ``parameters`` text for ``prompt``, ``settings`` (ordered key -> value) and a negative prompt."""

    def value(v: Any) -> str:
        s = str(v)
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' if ("," in s or ":" in s or '"' in s) else s

    lines = [one_line(prompt)]
    if negative:
        lines.append(f"Negative prompt: {one_line(negative)}")
    lines.append(", ".join(f"{k}: {one_line(value(v))}" for k, v in settings.items()))
    return "\n".join(lines)


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters (NUL included) as spaces: a prompt must not forge
    the ``Negative prompt:`` or settings lines that readers of the chunk parse."""
    return _CONTROL.sub(" ", text)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings as strings) from a ``parameters`` text."""
    lines = text.split("\n")
    settings: dict[str, str] = {}
    if lines and _PAIR.match(lines[-1]) and "Steps:" in lines[-1]:
        for key, val in _PAIR.findall(lines[-1]):
            if val.startswith('"') and val.endswith('"') and len(val) >= 2:
                val = re.sub(r"\\(.)", r"\1", val[1:-1])
            settings[key.strip()] = val.strip()
        lines = lines[:-1]
    negative = ""
    if lines and lines[-1].startswith("Negative prompt: "):
        negative = lines[-1].removeprefix("Negative prompt: ")
        lines = lines[:-1]
    return "\n".join(lines), negative, settings


def to_pil(image: Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """``(C, H, W)`` with values in ``value_range`` -> a PIL image, RGB for 3 channels and L for 1 (rounded, not
    truncated). Generators return [0, 1], the default; training data and samples are [-1, 1]."""
    lo, hi = value_range
    x = ((image.detach().float() - lo) / (hi - lo)).clamp(0, 1)
    arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))


def _png_info(parameters: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters)  # iTXt, so any Unicode prompt fits
    return info


def save_png(path: str | Path, image: Image.Image, parameters: str) -> Path:
    """Write ``image`` with ``parameters`` in its ``parameters`` text chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=_png_info(parameters))
    return path


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The PNG file ``save_png`` would write, in memory (the HTTP server's ``b64_json`` responses)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(parameters))
    return buf.getvalue()


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG file, or None."""
    with Image.open(path) as im:
        return im.text.get("parameters") if hasattr(im, "text") else None


Color = tuple[int, int, int]


def contact_sheet(images: Sequence[Image.Image | None], labels: Sequence[str] | None = None, *, cell: int = 128,
                  columns: int | None = None, pad: int = 4, frames: Sequence[Color | None] | None = None,
                  row_labels: Sequence[str] | None = None, label_width: int = 120) -> Image.Image:  # fmt: skip
    """The one image grid of t2i (``t2i generate``'s contact sheet, training sample grids, the shapes evaluator's
    pass/fail grid): ``images`` scaled to ``cell`` px (nearest neighbour when enlarging: small images stay crisp),
    ``columns`` per row (default square-ish), ``pad`` px apart on white.

    ``labels`` captions each image (cut to the cell's width); ``frames`` colours the padding around each image (the
    evaluator's green pass / red fail); ``row_labels`` writes one label per row in a left margin of
    ``label_width`` px. A ``None`` image leaves its cell empty (rows of unequal length)."""
    n = len(images)
    if n == 0:
        raise ValueError("a contact sheet needs at least one image")
    cols = columns or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    label_h = 14 if labels else 0
    left = label_width if row_labels else 0
    sheet = Image.new("RGB", (left + cols * (cell + pad) + pad, rows * (cell + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    f = ImageFont.load_default(size=10)  # Pillow's bundled FreeType font: no font file to find
    for r, text in enumerate(row_labels or ()):
        draw.text((4, pad + r * (cell + label_h + pad) + cell // 2 - 6), text, fill=(0, 0, 0), font=f)
    for i, im in enumerate(images):
        if im is None:
            continue
        r, c = divmod(i, cols)
        x, y = left + pad + c * (cell + pad), pad + r * (cell + label_h + pad)
        if frames is not None and frames[i] is not None:
            half = pad // 2
            draw.rectangle((x - half, y - half, x + cell + half - 1, y + cell + half - 1), fill=frames[i])
        resample = Image.NEAREST if im.width < cell else Image.LANCZOS
        sheet.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
        if labels:
            text = labels[i]
            while text and draw.textlength(text, font=f) > cell:
                text = text[:-2] + "…" if len(text) > 2 else ""
            draw.text((x, y + cell + 1), text, fill=(0, 0, 0), font=f)
    return sheet
