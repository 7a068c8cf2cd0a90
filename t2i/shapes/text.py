"""The text track: words drawn with Pillow's bundled font, and read back by template correlation.

Drawing and reading share one glyph path (``glyph_coverage``), so the reader's templates are the renderer's own
glyphs: a ground-truth word reads back exactly at 32 and 64 px. The track is reported apart from the GenEval-style
score (``t2i.shapes.scoring``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import ImageFont

from t2i.shapes.world import BACKGROUND, COLORS, SUPERSAMPLE, TEXT_COLOR, ImageLike, Text, as_uint8

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

################################################################################################################
# Drawing
################################################################################################################


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


def draw_text(canvas: np.ndarray, text: Text, size: int) -> None:
    """Composite ``text`` onto a float (size, size, 3) ``canvas`` in place."""
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


TEXT_LAYOUTS = ("random", "centred")


def _max_height(word: str) -> float:
    return 0.42 if len(word) <= 2 else 0.34


def _fit_height(word: str, h: float, size: int) -> tuple[float, float]:
    """(height, width) as canvas fractions: ``h`` shrunk until ``word`` spans at most 88% of the canvas."""
    # Glyph widths round differently at each size: fit at 32 and 64 px (and at ``size``), so one scene fits both.
    sizes = sorted({32, 64, max(size, 32)})
    while max(text_width(word, h, z) for z in sizes) > 0.88 and h > 0.2:
        h *= 0.95
    return h, max(text_width(word, h, z) for z in sizes)


def place_text(word: str, rng: np.random.Generator, size: int = 64) -> Text:
    """A word at a random height and position that fits the canvas with a small margin."""
    h, w = _fit_height(word, float(rng.uniform(0.28, _max_height(word))), size)
    cx = float(rng.uniform(0.5 - (0.94 - w) / 2, 0.5 + (0.94 - w) / 2)) if w < 0.94 else 0.5
    cy = float(rng.uniform(0.5 - (0.9 - h) / 2, 0.5 + (0.9 - h) / 2))
    return Text(word, round(cx, 4), round(cy, 4), round(h, 4))


def centred_text(word: str, size: int = 64) -> Text:
    """``word`` in the canvas centre at the top of ``place_text``'s height range (shrunk to fit as it shrinks
    there): one layout per word.

    A training-data lever, not a split: where a word goes is the model's choice (the reader finds it anywhere),
    and with one layout per word each image token always holds the same part of the same letter, so the model
    learns letters' strokes instead of first working out where a randomly placed word starts.
    """
    return Text(word, 0.5, 0.5, round(_fit_height(word, _max_height(word), size)[0], 4))


################################################################################################################
# Reading: glyph segmentation and template correlation
################################################################################################################

INK_THRESH = 0.35  # ink coverage above which a pixel belongs to a glyph
_TEMPLATE = 20  # side of the normalised glyph grid
_BG = np.asarray(BACKGROUND, dtype=np.float32)


def _normalise(g: np.ndarray) -> np.ndarray:
    """A glyph crop scaled (aspect kept) into the centre of a T x T grid, zero-mean and unit-norm, flattened."""
    from PIL import Image

    h, w = g.shape
    scale = _TEMPLATE / max(h, w)
    nh, nw = max(round(h * scale), 1), max(round(w * scale), 1)
    small = np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR))
    out = np.zeros((_TEMPLATE, _TEMPLATE), np.float32)
    r0, c0 = (_TEMPLATE - nh) // 2, (_TEMPLATE - nw) // 2
    out[r0 : r0 + nh, c0 : c0 + nw] = small
    v = out.ravel() - out.mean()
    return v / (np.linalg.norm(v) + 1e-6)


@lru_cache(maxsize=64)
def _glyph_bank(px: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised templates (26, T*T) and log aspect ratios (26,) of the letters at a ``px`` em.

    Templates go through the renderer's own path (composite on the background, round to uint8, measure ink), so
    a ground-truth glyph and its template crop identically: at 7-px ems an edge pixel right at the crop
    threshold, rounded one way in the image and the other in the template, would shift the crop by a column
    and make an L read as a K.
    """
    tmpl, aspect = [], []
    for ch in LETTERS:
        cov = glyph_coverage(ch, px)[..., None]
        img = np.rint(_BG + cov * (np.asarray(COLORS[TEXT_COLOR], np.float32) - _BG)).astype(np.uint8)
        g = _crop(ink(img))
        tmpl.append(_normalise(g))
        aspect.append(np.log(g.shape[1] / g.shape[0]))
    return np.stack(tmpl), np.asarray(aspect)


def _crop(a: np.ndarray) -> np.ndarray:
    """The bounding box of the ink (coverage > INK_THRESH)."""
    rows, cols = np.nonzero(a > INK_THRESH)
    return a[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


@lru_cache(maxsize=1)
def _cap_ratio() -> float:
    return _crop(glyph_coverage("H", 64)).shape[0] / 64


def ink(image: ImageLike) -> np.ndarray:
    """Text ink coverage (H, W) in [0, 1]: how far each pixel went from the background towards the text colour."""
    x = as_uint8(image).astype(np.float32)
    c = np.asarray(COLORS[TEXT_COLOR], np.float32)
    d = c - _BG
    return np.clip(((x - _BG) @ d) / (d @ d), 0.0, 1.0)


def read_word(image: ImageLike) -> str:
    """The letters of a rendered word, left to right ("" when nothing legible is there)."""
    a = ink(image)
    mask = a > INK_THRESH
    H = a.shape[0]
    cols = np.flatnonzero(mask.any(0))
    if len(cols) == 0:
        return ""
    # Split on empty columns: the renderer keeps >= 1 px between glyphs.
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    glyphs = []
    for r in runs:
        sub = mask[:, r[0] : r[-1] + 1]
        rows = np.flatnonzero(sub.any(1))
        if sub.sum() < max(3, H * H // 1024 * 3) or rows[-1] - rows[0] < H * 0.08:
            continue  # speckle, not a glyph
        glyphs.append(a[rows[0] : rows[-1] + 1, r[0] : r[-1] + 1])
    if not glyphs:
        return ""
    # The em size follows from the glyph heights (capitals share the cap height, round ones overshoot a little);
    # rounding at small sizes makes it uncertain by a pixel or two, so the best-fitting em among neighbours wins.
    est = round(np.median([g.shape[0] for g in glyphs]) / _cap_ratio())
    vecs = np.stack([_normalise(g) for g in glyphs])  # (G, T*T)
    logs = np.log(np.asarray([g.shape[1] / g.shape[0] for g in glyphs]))[:, None]  # (G, 1)
    best_total, best_scores = -np.inf, None
    for px in range(max(est - 2, 6), est + 3):
        bank, aspect = _glyph_bank(px)
        scores = vecs @ bank.T - 0.5 * np.abs(aspect[None] - logs)  # (G, 26)
        total = scores.max(1).sum()
        if total > best_total:
            best_total, best_scores = total, scores
    out = [LETTERS[int(sc.argmax())] if sc.max() > 0.5 else "?" for sc in best_scores]
    return "".join(out)


def letter_accuracy(word: str, read: str) -> float:
    """Fraction of letters read correctly at their position (missing or extra letters count as wrong)."""
    n = max(len(word), len(read))
    return sum(a == b for a, b in zip(word, read, strict=False)) / n if n else 1.0
