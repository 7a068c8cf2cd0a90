"""What the shapes world holds: palette, shapes, scenes, where objects may go, and the pixel format of its images.

A world simple enough that a tiny model learns it on a CPU and a program can check every image exactly, modelled
on GenEval (Ghosh et al. 2023). Scenes are resolution independent (centres and sizes are fractions of the canvas),
so one scene renders at 32, 64 or any size >= 32 px (``t2i.shapes.scenes.render``). Every image the benchmark
judges, rendered or generated, is first brought to one pixel format by ``as_uint8``: uint8 (H, W, 3) RGB.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from t2i.errors import unknown_choice

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
    raise unknown_choice("shape", shape, SHAPES)


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


################################################################################################################
# Images in, uint8 arrays out
################################################################################################################

ImageLike = Any  # a PIL image, or an (H, W, 3) / (3, H, W) uint8 array, or a float array or tensor in [0, 1]


def as_uint8(image: ImageLike) -> np.ndarray:
    """A PIL image, or an array / tensor (H, W, 3) or (3, H, W), uint8 or float in [0, 1] -> uint8 (H, W, 3)."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch
        image = image.detach().cpu().float().numpy() if image.is_floating_point() else image.cpu().numpy()
    a = np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"expected one image (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {a.shape}")
    if a.dtype != np.uint8:
        # Float images follow the public API's convention, [0, 1] (what generators return), and are rounded as
        # t2i.io.png.to_pil rounds them: a tensor scores exactly as the PNG written from it.
        a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return a


def as_uint8_batch(images: Sequence[ImageLike] | Any) -> list[np.ndarray]:
    """A list of images, or a batched array / tensor (B, H, W, 3) or (B, 3, H, W) -> list of uint8 (H, W, 3)."""
    if hasattr(images, "ndim") and images.ndim != 4:
        raise ValueError(f"expected a batch (B, H, W, 3) or (B, 3, H, W), got shape {tuple(images.shape)}")
    return [as_uint8(x) for x in images]  # iterating a batch or a list both yield single images
