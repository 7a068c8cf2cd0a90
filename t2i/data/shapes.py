"""The shapes world: palette, shapes, scenes and an anti-aliased renderer.

A world simple enough that a tiny model learns it on a CPU and a program can check every image exactly, modelled
on GenEval (Ghosh et al. 2023). Scenes are resolution independent (centres and sizes are fractions of the canvas),
so one scene renders at 32, 64 or any size >= 32 px. Captions and the structured claims they make live in
``t2i.data.captions``; the torch Dataset and the folder / tar writers in ``t2i.data.dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import ImageFont

################################################################################################################
# The palette and the shapes
################################################################################################################

# GenEval's colours without white (it would vanish on the light background). Every pair is >= 92 apart in RGB
# and every colour is >= 111 from the background, so nearest-palette segmentation survives blur and noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "pink": (250, 130, 200),
    "brown": (120, 70, 20),
    "black": (10, 10, 10),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)  # plain light gray
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
TEXT_COLOR = "black"

MIN_SIZE = 32  # px; below this the smallest objects drop under 6 px and stop being classifiable
SUPERSAMPLE = 4  # render at 4x and box-downsample: anti-aliased edges the evaluator must not care about


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` at normalised box coordinates u (right) and v (down), both in [0, 1]."""
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    if shape == "circle":
        return du**2 + dv**2 <= 0.25
    if shape == "square":
        return np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if shape == "triangle":  # apex up, base along the bottom edge
        return du <= v / 2
    if shape == "diamond":
        return du + dv <= 0.5
    if shape == "cross":  # plus sign, arm width 1/3 of the box
        return (du <= 1 / 6) | (dv <= 1 / 6)
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


@lru_cache(maxsize=4096)
def shape_template(shape: str, h: int, w: int) -> np.ndarray:
    """Binary mask (h, w) of ``shape`` stretched to fill an h x w box, thresholded at half coverage."""
    return shape_coverage(shape, 0.0, 0.0, float(w), float(h), w, h) >= 0.5


def shape_coverage(shape: str, x0: float, y0: float, bw: float, bh: float, w: int, h: int) -> np.ndarray:
    """Fraction (h, w) of each pixel of a w x h grid covered by ``shape`` in the box (x0, y0, bw, bh), in px."""
    s = SUPERSAMPLE
    # Sub-pixel sample centres, so coverage is the mean of s*s point samples inside each output pixel.
    xs = (np.arange(w * s) + 0.5) / s
    ys = (np.arange(h * s) + 0.5) / s
    u = ((xs - x0) / bw)[None, :]
    v = ((ys - y0) / bh)[:, None]
    inside = shape_inside(shape, u, v) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)


################################################################################################################
# Scenes
################################################################################################################


@dataclass(frozen=True)
class Obj:
    """One object: centre (cx, cy) and side ``size`` of its square bounding box, all as canvas fractions."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) as canvas fractions."""
        r = self.size / 2
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


@dataclass(frozen=True)
class Text:
    """A rendered word: centre (cx, cy) and font ``height`` (em size) as canvas fractions."""

    word: str
    cx: float
    cy: float
    height: float
    color: str = TEXT_COLOR


@dataclass(frozen=True)
class Scene:
    """What an image shows: objects (drawn in order) and an optional word."""

    objects: tuple[Obj, ...] = ()
    text: Text | None = None

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "text": asdict(self.text) if self.text else None}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        text = Text(**d["text"]) if d.get("text") else None
        return cls(objects=tuple(Obj(**o) for o in d.get("objects", ())), text=text)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Scene:
        return cls.from_dict(json.loads(s))


def check_size(size: int) -> int:
    """``size`` as an int, or a ValueError that says what sizes work."""
    if not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"canvas size must be an integer >= {MIN_SIZE} px (e.g. 32 or 64), got {size!r}")
    return int(size)


################################################################################################################
# Rendering
################################################################################################################


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render ``scene`` to a uint8 (size, size, 3) RGB array with anti-aliased edges."""
    size = check_size(size)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for o in scene.objects:
        x0, y0, x1, y1 = (c * size for c in o.box())
        # Only the pixels under the object's box are supersampled: rendering costs O(object area), not O(canvas).
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), size), min(int(np.ceil(y1)), size)
        if c1 <= c0 or r1 <= r0:
            continue
        cov = shape_coverage(o.shape, x0 - c0, y0 - r0, x1 - x0, y1 - y0, c1 - c0, r1 - r0)[..., None]
        patch = canvas[r0:r1, c0:c1]
        patch += cov * (np.asarray(COLORS[o.color], np.float32) - patch)
    if scene.text is not None:
        _draw_text(canvas, scene.text, size)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font at ``px`` pixels: present on every machine with Pillow >= 10.1."""
    f = ImageFont.load_default(size=px)
    if not isinstance(f, ImageFont.FreeTypeFont):
        raise RuntimeError("the text track needs Pillow >= 10.1 built with FreeType (ImageFont.load_default(size=))")
    return f


GLYPH_GAP = 0.06  # em; keeps glyphs apart so the reader can split a word on empty columns
STROKE = 0.04  # em


@lru_cache(maxsize=4096)
def glyph_coverage(letter: str, px: int) -> np.ndarray:
    """Tight anti-aliased coverage (h, w) in [0, 1] of one glyph rendered at a ``px``-pixel em."""
    from PIL import Image, ImageDraw

    s = SUPERSAMPLE
    f = font(px * s)
    left, top, right, bottom = f.getbbox(letter)
    # A stroke of 4% of the em turns Pillow's regular-weight font into a bold one that survives 32 px.
    stroke = max(round(STROKE * px * s), 1)
    pad = s + stroke
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), letter, font=f, fill=255, stroke_width=stroke, stroke_fill=255)
    a = np.asarray(img, dtype=np.float32) / 255.0
    h, w = -(-a.shape[0] // s), -(-a.shape[1] // s)  # ceil, then pad to a multiple of s and box-downsample
    a = np.pad(a, ((0, h * s - a.shape[0]), (0, w * s - a.shape[1])))
    cov = a.reshape(h, s, w, s).mean(axis=(1, 3))
    rows, cols = np.nonzero(cov > 0.02)
    return cov[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def text_layout(text: Text, size: int) -> list[tuple[str, int, int]]:
    """(letter, left, top) in px for each glyph: baseline-aligned, separated by GLYPH_GAP em."""
    px = max(round(text.height * size), 6)
    f = font(px)
    boxes = [f.getbbox(ch) for ch in text.word]
    gap = max(round(GLYPH_GAP * px), 1) + 1
    widths = [glyph_coverage(ch, px).shape[1] for ch in text.word]
    total = sum(widths) + gap * (len(widths) - 1)
    ascent = min(b[1] for b in boxes)
    descent = max(b[3] for b in boxes)
    x = round(text.cx * size - total / 2)
    y_base = round(text.cy * size - (descent - ascent) / 2) - ascent
    out = []
    for ch, w, b in zip(text.word, widths, boxes, strict=True):
        out.append((ch, x, y_base + b[1]))
        x += w + gap
    return out


def _draw_text(canvas: np.ndarray, text: Text, size: int) -> None:
    px = max(round(text.height * size), 6)
    color = np.asarray(COLORS[text.color], np.float32)
    for ch, x, y in text_layout(text, size):
        cov = glyph_coverage(ch, px)
        h, w = cov.shape
        r0, c0 = max(y, 0), max(x, 0)
        r1, c1 = min(y + h, size), min(x + w, size)
        if r1 <= r0 or c1 <= c0:
            continue
        c = cov[r0 - y : r1 - y, c0 - x : c1 - x, None]
        patch = canvas[r0:r1, c0:c1]
        patch += c * (color - patch)


def text_width(word: str, height: float, size: int) -> float:
    """Width of ``word`` as a canvas fraction when rendered with em ``height`` on a ``size`` canvas."""
    layout = text_layout(Text(word, 0.5, 0.5, height), size)
    px = max(round(height * size), 6)
    last, x_last, _ = layout[-1]
    return (x_last + glyph_coverage(last, px).shape[1] - layout[0][1]) / size


################################################################################################################
# Placement
################################################################################################################

GAP = 0.07  # canvas fraction between object boxes: >= 2 px at 32 px, so components never touch
MARGIN = 0.03  # canvas fraction kept clear at the border

# Box side (canvas fraction) by number of objects: the smallest object is 0.2 * 32 = 6.4 px at 32 px.
SIZE_RANGE: dict[int, tuple[float, float]] = {1: (0.32, 0.55), 2: (0.25, 0.4), 3: (0.2, 0.3), 4: (0.2, 0.28)}


def _separated(a: Obj, b: Obj, gap: float) -> bool:
    d = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) >= d or abs(a.cy - b.cy) >= d


def place(
    items: list[tuple[str, str]],
    rng: np.random.Generator,
    *,
    allow_overlap: bool = False,
    accept: Callable[[list[Obj]], bool] | None = None,
    max_tries: int = 200,
) -> tuple[Obj, ...]:
    """Place (shape, color) items at random sizes and positions, without overlaps unless ``allow_overlap``.

    ``accept(objects)`` may veto a layout (position prompts use it to demand a clear relation). Layouts are
    drawn whole and retried, shrinking the size range a little each time, so crowded scenes still terminate.
    """
    n = len(items)
    if not 1 <= n <= 4:
        raise ValueError(f"a scene holds 1 to 4 objects, got {n}")
    lo, hi = SIZE_RANGE[n]
    for attempt in range(max_tries):
        shrink = 1.0 - 0.5 * attempt / max_tries
        objs: list[Obj] = []
        for shape, color in items:
            for _ in range(50):
                s = float(rng.uniform(lo, lo + (hi - lo) * shrink))
                cx, cy = (float(v) for v in rng.uniform(MARGIN + s / 2, 1 - MARGIN - s / 2, size=2))
                o = Obj(shape, color, round(cx, 4), round(cy, 4), round(s, 4))
                if allow_overlap or all(_separated(o, p, GAP) for p in objs):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) == n and (accept is None or accept(objs)):
            return tuple(objs)
    raise RuntimeError(f"could not place {items} in {max_tries} tries; this is a bug in the size ranges")


def place_text(word: str, rng: np.random.Generator, size: int = 64) -> Text:
    """A word at a random height and position that fits the canvas with a small margin."""
    # Glyph widths round differently at each size: fit at 32 and 64 px (and at ``size``), so one scene fits both.
    sizes = sorted({32, 64, max(size, 32)})
    hi = 0.42 if len(word) <= 2 else 0.34
    h = float(rng.uniform(0.28, hi))
    while max(text_width(word, h, z) for z in sizes) > 0.88 and h > 0.2:
        h *= 0.95
    w = max(text_width(word, h, z) for z in sizes)
    cx = float(rng.uniform(0.5 - (0.94 - w) / 2, 0.5 + (0.94 - w) / 2)) if w < 0.94 else 0.5
    cy = float(rng.uniform(0.5 - (0.9 - h) / 2, 0.5 + (0.9 - h) / 2))
    return Text(word, round(cx, 4), round(cy, 4), round(h, 4))
