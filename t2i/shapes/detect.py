"""Object detection in the shapes world, with no learned weights.

(1) Each pixel is explained as a mix of the background and one palette colour (the colour whose mixing line it
sits closest to) and belongs to that colour when its coverage is >= 1/2, so anti-aliased and blurred edges neither
vanish nor change colour; (2) per colour, an opening by reconstruction removes thin edge rings and speckle without
eroding small objects, then connected components; (3) each component's shape is the template, fitted to the
component's centroid and second moments and rendered with the renderer's own coverage function, with the best soft
IoU against the component's coverage, or "unknown" below ``MIN_IOU``. GenEval's rules then judge the (shape,
colour, box) list (``t2i.shapes.scoring``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from t2i.shapes.world import BACKGROUND, COLORS, SHAPES, ImageLike, as_uint8, shape_coverage, shape_inside

FG_THRESH = 100.0  # RGB distance of a full-coverage colour from the background is >= 111 (prefilter at half)
RESIDUAL_THRESH = 60.0  # farther than this from every background-colour mixing line: not an object pixel
MIN_IOU = 0.55  # best template IoU below this: the component is "unknown"
MIN_AREA = 8 / 32**2  # fraction of the canvas: 8 px at 32 px; the smallest object (6.4 px box) covers >= 18

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (K, 3)
_BG = np.asarray(BACKGROUND, dtype=np.float32)
_DIRS = _PALETTE - _BG  # (K, 3) from the background to each colour
_DIRS_SQ = (_DIRS**2).sum(1)  # (K,)
_PLUS = ndimage.generate_binary_structure(2, 1)  # plus-shaped: a 2-px cross arm at 32 px survives erosion


@dataclass(frozen=True)
class Detection:
    """A detected object: box centre and size as canvas fractions."""

    shape: str  # one of SHAPES, or "unknown"
    color: str
    cx: float
    cy: float
    w: float
    h: float
    iou: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx, self.cy, self.w, self.h)


################################################################################################################
# Detection
################################################################################################################


def palette_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (H, W): the colour whose coverage is >= 1/2, -1 for background and misfits.

    An anti-aliased or blurred edge pixel is a mix ``bg + a * (c - bg)`` of the background and one colour c. For
    each colour the coverage ``a`` is the projection onto ``c - bg`` and the residual is the distance to that line;
    a pixel takes the colour with the smallest residual, and counts as that object's when a >= 1/2, which is the
    same threshold the shape templates use. Plain nearest-colour assignment instead gives a red edge to pink.
    """
    x = image.astype(np.float32).reshape(-1, 3) - _BG  # (N, 3)
    fg = (x**2).sum(1) > FG_THRESH**2 / 4  # cheap prefilter: pixels too close to the background to reach a = 1/2
    labels = np.full(x.shape[0], -1, dtype=np.int8)
    if fg.any():
        px = x[fg]
        a = np.clip(px @ _DIRS.T / _DIRS_SQ, 0.0, 1.0)  # (N, K) coverage of each colour
        # |px - a d|^2 = |px|^2 - 2 a px.d + a^2 |d|^2, per colour
        res = (px**2).sum(1, keepdims=True) - 2 * a * (px @ _DIRS.T) + a**2 * _DIRS_SQ  # (N, K)
        k = res.argmin(1)
        rows = np.arange(len(k))
        ok = (a[rows, k] >= 0.5) & (res[rows, k] < RESIDUAL_THRESH**2)
        labels[fg] = np.where(ok, k, -1)
    return labels.reshape(image.shape[:2])


@lru_cache(maxsize=1)
def _shape_moments() -> dict[str, tuple[float, float, float, float]]:
    """Per shape, in its unit box: centroid (u, v) and standard deviations (u, v) of the filled area."""
    n = 512
    g = (np.arange(n) + 0.5) / n
    out = {}
    for shape in SHAPES:
        m = shape_inside(shape, g[None, :], g[:, None]).astype(np.float64)
        w = m / m.sum()
        mu, mv = (w.sum(0) * g).sum(), (w.sum(1) * g).sum()
        su = np.sqrt((w.sum(0) * (g - mu) ** 2).sum())
        sv = np.sqrt((w.sum(1) * (g - mv) ** 2).sum())
        out[shape] = (float(mu), float(mv), float(su), float(sv))
    return out


def _classify(alpha: np.ndarray) -> tuple[str, float, tuple[float, float, float, float]]:
    """Best shape for a component's soft coverage ``alpha`` (h, w), with its fitted box (x0, y0, bw, bh) in px.

    Each hypothesis gets the box that reproduces the component's centroid and second moments; its rendered
    coverage is then compared with ``alpha`` by soft IoU (sum of minima over sum of maxima). Matching sub-pixel
    boxes and soft coverage is what keeps 6-px diamonds, crosses and circles apart at 32 px, where thresholded
    masks fitted to integer bounding boxes confuse them.
    """
    h, w = alpha.shape
    mass = alpha.sum()
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    pu, pv = alpha.sum(0) / mass, alpha.sum(1) / mass
    cx, cy = (pu * xs).sum(), (pv * ys).sum()
    sx = np.sqrt(max((pu * (xs - cx) ** 2).sum() - 1 / 12, 1e-3))  # minus the variance of a pixel's own width
    sy = np.sqrt(max((pv * (ys - cy) ** 2).sum() - 1 / 12, 1e-3))
    best, best_iou, best_box = "unknown", 0.0, (0.0, 0.0, float(w), float(h))
    for shape, (mu, mv, su, sv) in _shape_moments().items():
        bw, bh = sx / su, sy / sv
        x0, y0 = cx - mu * bw, cy - mv * bh
        t = shape_coverage(shape, x0, y0, bw, bh, w, h)
        iou = float(np.minimum(t, alpha).sum() / np.maximum(t, alpha).sum())
        if iou > best_iou:
            best, best_iou, best_box = shape, iou, (x0, y0, bw, bh)
    return (best if best_iou >= MIN_IOU else "unknown"), best_iou, best_box


def detect(image: ImageLike) -> list[Detection]:
    """Objects in one image: palette segmentation, opening by reconstruction, components, template fit."""
    img = as_uint8(image)
    H, W = img.shape[:2]
    labels = palette_labels(img)
    x = img.astype(np.float32) - _BG
    min_area = max(round(MIN_AREA * H * W), 4)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(_PALETTE_NAMES))
    out: list[Detection] = []
    for k in np.flatnonzero(counts >= min_area):
        mask = labels == k
        # Opening by reconstruction: erosion kills 1-px edge rings and speckle; propagation restores every
        # component that kept a seed to its full extent, so small triangles keep their tips (a plain opening
        # would round them off and break the template match).
        seeds = ndimage.binary_erosion(mask, _PLUS)
        if not seeds.any():
            continue
        mask = ndimage.binary_propagation(seeds, _PLUS, mask=mask)
        # Soft coverage of colour k; pixels claimed by another colour count as empty.
        alpha = np.clip(x @ _DIRS[k] / _DIRS_SQ[k], 0.0, 1.0) * ((labels == k) | (labels == -1))
        comp, _n = ndimage.label(mask)
        grown = ndimage.grey_dilation(comp, size=(3, 3))  # one ring of edge pixels around each component
        for i, sl in enumerate(ndimage.find_objects(comp), 1):
            if np.count_nonzero(comp[sl] == i) < min_area:
                continue
            r0, r1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, H)
            c0, c1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, W)
            a = alpha[r0:r1, c0:c1] * (grown[r0:r1, c0:c1] == i)
            shape, iou, (bx, by, bw, bh) = _classify(a)
            out.append(
                Detection(
                    shape, _PALETTE_NAMES[k], (c0 + bx + bw / 2) / W, (r0 + by + bh / 2) / H, bw / W, bh / H, iou
                )
            )
    return out
