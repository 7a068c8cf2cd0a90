"""A weight-free, GenEval-style evaluator for the shapes world (Ghosh et al. 2023, with exact rules).

Detection needs no learned weights: (1) each pixel is explained as a mix of the background and one palette
colour (the colour whose mixing line it sits closest to) and belongs to that colour when its coverage is >= 1/2,
so anti-aliased and blurred edges neither vanish nor change colour; (2) per colour, an opening by reconstruction
removes thin edge rings and speckle without eroding small objects, then connected components; (3) each
component's shape is the template, fitted to the component's centroid and second moments and rendered with the
renderer's own coverage function, with the best soft IoU against the component's coverage, or "unknown" below
``MIN_IOU``. GenEval's rules then run on the (shape, colour, box) list: every include clause must hold ("at least
count", relations by box centres with a 0.1 margin) and no exclude clause may fire. The text track reads words
by template correlation against the same font's glyphs and is reported apart from the score.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from t2i.data.captions import CATEGORIES, TEXT_CATEGORY, Spec, relation_holds, relation_holds_boxes
from t2i.data.shapes import (
    BACKGROUND,
    COLORS,
    SHAPES,
    TEXT_COLOR,
    Scene,
    glyph_coverage,
    place,
    place_text,
    shape_coverage,
    shape_inside,
)

FG_THRESH = 100.0  # RGB distance of a full-coverage colour from the background is >= 111 (prefilter at half)
RESIDUAL_THRESH = 60.0  # farther than this from every background-colour mixing line: not an object pixel
MIN_IOU = 0.55  # best template IoU below this: the component is "unknown"
MIN_AREA = 8 / 32**2  # fraction of the canvas: 8 px at 32 px; the smallest object (6.4 px box) covers >= 18
INK_THRESH = 0.35  # text: ink coverage above which a pixel belongs to a glyph

ImageLike = Any  # a PIL image, or an (H, W, 3) / (3, H, W) uint8 or [-1, 1] float array or tensor
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
# Images in, uint8 arrays out
################################################################################################################


def as_uint8(image: ImageLike) -> np.ndarray:
    """A PIL image, or an array / tensor (H, W, 3) or (3, H, W), uint8 or float in [-1, 1] -> uint8 (H, W, 3)."""
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
        # Float images follow the diffusion convention: [-1, 1].
        a = np.clip(np.rint((a.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return a


def as_uint8_batch(images: Sequence[ImageLike] | Any) -> list[np.ndarray]:
    """A list of images, or a batched array / tensor (B, H, W, 3) or (B, 3, H, W) -> list of uint8 (H, W, 3)."""
    if hasattr(images, "ndim") and images.ndim != 4:
        raise ValueError(f"expected a batch (B, H, W, 3) or (B, 3, H, W), got shape {tuple(images.shape)}")
    return [as_uint8(x) for x in images]  # iterating a batch or a list both yield single images


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


################################################################################################################
# Text: glyph segmentation and template correlation
################################################################################################################

_TEMPLATE = 20  # side of the normalised glyph grid
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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


################################################################################################################
# GenEval rules
################################################################################################################


def _matches(clause, d: Detection) -> bool:
    return d.shape == clause.shape and (clause.color is None or d.color == clause.color)


def check(spec: Spec, detections: Sequence[Detection]) -> bool:
    """GenEval's rule: every include clause holds (count, colour, relation) and no exclude clause fires."""
    for clause in spec.include:
        found = [d for d in detections if _matches(clause, d)]
        if len(found) < clause.count:
            return False
        if clause.relation is not None:
            targets = [d for d in detections if _matches(spec.include[clause.target], d)]
            if not any(relation_holds_boxes(a.box, b.box, clause.relation) for a in found for b in targets if a != b):
                return False
    return not any(sum(_matches(c, d) for d in detections) >= c.count for c in spec.exclude)


def letter_accuracy(word: str, read: str) -> float:
    """Fraction of letters read correctly at their position (missing or extra letters count as wrong)."""
    n = max(len(word), len(read))
    return sum(a == b for a, b in zip(word, read, strict=False)) / n if n else 1.0


################################################################################################################
# Reports
################################################################################################################


@dataclass
class Result:
    """The verdict on one image."""

    category: str
    caption: str
    passed: bool
    found: str  # what the detector saw: "red circle, blue square" or the word read
    letters: float | None = None  # text track only: per-letter accuracy
    file: str | None = None


@dataclass
class Report:
    """Per-category accuracy, GenEval's overall score (mean over categories) and the text track, apart."""

    results: list[Result]
    size: int
    extra: dict = field(default_factory=dict)  # e.g. the distribution metric: {"fd_probe": ..., "kid_probe": ...}

    def accuracy(self) -> dict[str, float]:
        acc: dict[str, list[bool]] = {}
        for r in self.results:
            acc.setdefault(r.category, []).append(r.passed)
        return {c: float(np.mean(acc[c])) for c in (*CATEGORIES, TEXT_CATEGORY) if c in acc}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.category] = out.get(r.category, 0) + 1
        return out

    @property
    def overall(self) -> float | None:
        """Mean accuracy over the GenEval categories present (the text track is not part of it)."""
        acc = [v for c, v in self.accuracy().items() if c in CATEGORIES]
        return float(np.mean(acc)) if acc else None

    @property
    def text_letters(self) -> float | None:
        vals = [r.letters for r in self.results if r.letters is not None]
        return float(np.mean(vals)) if vals else None

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "n_images": len(self.results),
            "accuracy": self.accuracy(),
            "counts": self.counts(),
            "overall": self.overall,
            "text_word_accuracy": self.accuracy().get(TEXT_CATEGORY),
            "text_letter_accuracy": self.text_letters,
            **self.extra,
            "results": [r.__dict__ for r in self.results],
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self) -> str:
        acc, n = self.accuracy(), self.counts()
        lines = [f"{'category':<20}{'n':>6}{'accuracy':>10}", "-" * 36]
        for c, v in acc.items():
            if c in CATEGORIES:
                lines.append(f"{c:<20}{n[c]:>6}{v:>10.3f}")
        if self.overall is not None:
            lines.append("-" * 36)
            lines.append(f"{'overall (GenEval)':<20}{sum(n.get(c, 0) for c in CATEGORIES):>6}{self.overall:>10.3f}")
        if TEXT_CATEGORY in acc:
            lines.append(f"{'text: words':<20}{n[TEXT_CATEGORY]:>6}{acc[TEXT_CATEGORY]:>10.3f}")
            lines.append(f"{'text: letters':<20}{n[TEXT_CATEGORY]:>6}{self.text_letters:>10.3f}")
        for k, v in self.extra.items():
            lines.append(f"{k:<26}{v:>10.3f}" if isinstance(v, float) else f"{k:<26}{v!s:>10}")
        return "\n".join(lines)


def score_image(spec: Spec, image: ImageLike, caption: str = "", file: str | None = None) -> Result:
    """Judge one image against its spec."""
    if spec.category == TEXT_CATEGORY:
        word = read_word(image)
        return Result(spec.category, caption, word == spec.word, word, letter_accuracy(spec.word, word), file)
    dets = detect(image)
    found = ", ".join(f"{d.color} {d.shape}" for d in dets)
    return Result(spec.category, caption, check(spec, dets), found, None, file)


def evaluate_images(
    images: Sequence[ImageLike],
    specs: Sequence[Spec],
    captions: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
) -> Report:
    """Score images (PIL, uint8 arrays or [-1, 1] tensors) against their specs."""
    if len(images) != len(specs):
        raise ValueError(f"got {len(images)} images for {len(specs)} specs; pass one spec per image")
    captions = captions or [""] * len(specs)
    files = files or [None] * len(specs)
    arrays = [as_uint8(im) for im in images]
    sizes = {a.shape[0] for a in arrays}
    results = [score_image(s, a, c, f) for s, a, c, f in zip(specs, arrays, captions, files, strict=True)]
    return Report(results, size=max(sizes) if sizes else 0)


def save_grid(
    path: str | Path, images: Sequence[ImageLike], results: Sequence[Result], *, per_category: int = 8
) -> None:
    """A PNG grid: one row per category, up to ``per_category`` samples, framed green (pass) or red (fail)."""
    from PIL import Image, ImageDraw

    from t2i.data.shapes import font

    rows: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if len(rows.setdefault(r.category, [])) < per_category:
            rows[r.category].append(i)
    side = max(as_uint8(images[0]).shape[0], 64)
    cell, label_w = side + 6, 120
    grid = Image.new("RGB", (label_w + per_category * cell, max(len(rows), 1) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    f = font(12)
    for y, (cat, idx) in enumerate(rows.items()):
        draw.text((4, y * cell + cell // 2 - 6), cat, fill=(0, 0, 0), font=f)
        for x, i in enumerate(idx):
            im = Image.fromarray(as_uint8(images[i])).resize((side, side), Image.NEAREST)
            x0, y0 = label_w + x * cell, y * cell
            color = (20, 160, 40) if results[i].passed else (220, 20, 20)
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color)
            grid.paste(im, (x0 + 3, y0 + 3))
    grid.save(path)


def evaluate_folder(
    folder: str | Path, *, features: bool = False, grid: str | Path | None = None, json_path: str | Path | None = None
) -> Report:
    """Score a folder in the format of ``t2i.data.dataset`` (``metadata.jsonl`` + images)."""
    from PIL import Image

    from t2i.data.dataset import read_metadata

    folder = Path(folder)
    records = read_metadata(folder)
    images = [np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in records]
    shapes_ = {im.shape for im in images}
    if len(shapes_) != 1 or next(iter(shapes_))[0] != next(iter(shapes_))[1]:
        raise ValueError(f"all images in {folder} must be square and of one size, found {sorted(shapes_)}")
    specs = [Spec.from_dict(r["spec"]) for r in records]
    report = evaluate_images(images, specs, [r.get("caption", "") for r in records], [r["file"] for r in records])
    if features:
        report.extra.update(distribution_metric(images, records))
    if grid is not None:
        save_grid(grid, images, report.results)
    if json_path is not None:
        report.save_json(json_path)
    return report


def distribution_metric(images: Sequence[ImageLike], records: Sequence[dict]) -> dict[str, float]:
    """FD and KID in the shipped probe's feature space, against fresh ground truth for the same prompts.

    The reference renders each prompt with another seed, so ground truth scores near the metric's noise floor
    rather than an exact (and meaningless) zero.
    """
    from t2i.data.captions import Prompt
    from t2i.data.dataset import ground_truth
    from t2i.eval.features import frechet_distance, kid, probe_features

    size = as_uint8(images[0]).shape[0]
    ref = []
    for r in records:
        seed = int(r.get("seed", len(ref))) + REFERENCE_SEED_OFFSET
        ref.append(ground_truth(Prompt(r.get("caption", ""), Spec.from_dict(r["spec"]), seed), size).image)
    fa, fb = probe_features(images), probe_features(ref)
    return {"fd_probe": frechet_distance(fa, fb), "kid_probe": kid(fa, fb)}


REFERENCE_SEED_OFFSET = 1 << 40


def evaluate_generator(
    fn: Callable[[list[str], list[int]], object],
    *,
    split: str = "eval",
    size: int = 32,
    per_prompt: int = 1,
    batch_size: int = 64,
    categories: Sequence[str] | None = None,
    per_category: int | None = None,
    where: Callable[[Any], bool] | None = None,
    features: bool = False,
    grid: str | Path | None = None,
) -> Report:
    """Score a generator ``fn(prompts, seeds) -> list of PIL images | uint8 (B, H, W, 3) | float (B, 3, H, W)``.

    Each prompt of the split is sampled ``per_prompt`` times with seeds ``prompt.seed + k``; ``per_category``
    keeps only the first prompts of each category (a fixed subset, for quick sweeps); ``where(prompt)`` filters.
    """
    from t2i.data.captions import split_prompts

    prompts = [p for p in split_prompts(split) if categories is None or p.spec.category in categories]
    if where is not None:  # any other filter on the Prompt, e.g. the prompts naming one colour-shape pair
        prompts = [p for p in prompts if where(p)]
    if per_category is not None:
        seen: dict[str, int] = {}
        keep = []
        for p in prompts:
            seen[p.spec.category] = seen.get(p.spec.category, 0) + 1
            if seen[p.spec.category] <= per_category:
                keep.append(p)
        prompts = keep
    if not prompts:
        raise ValueError(f"no prompts in split {split!r} for categories {categories}")
    jobs = [(p, p.seed + k) for p in prompts for k in range(per_prompt)]
    images: list[np.ndarray] = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        out = as_uint8_batch(fn([p.caption for p, _ in chunk], [s for _, s in chunk]))
        if len(out) != len(chunk):
            raise ValueError(f"the generator returned {len(out)} images for {len(chunk)} prompts")
        images.extend(out)
    if any(im.shape[0] != size for im in images):
        raise ValueError(f"the generator must return {size}x{size} images, got {images[0].shape[:2]}")
    specs = [p.spec for p, _ in jobs]
    report = evaluate_images(images, specs, [p.caption for p, _ in jobs])
    if features:
        report.extra.update(distribution_metric(images, [p.to_dict() for p, _ in jobs]))
    if grid is not None:
        save_grid(grid, images, report.results)
    return report


################################################################################################################
# Calibration: scenes that must fail
################################################################################################################


def failure_scene(spec: Spec, rng: np.random.Generator) -> Scene:
    """A ground-truth-quality scene showing each category's failure mode for ``spec``.

    single_object: another shape; two_objects: one of the two replaced; counting: one object too few or too many;
    colors: another colour; position: the two objects with their relation reversed; color_attribution: the
    colours swapped; text: one letter changed. An evaluator must fail every one of them.
    """
    inc = spec.include

    def other(options, *avoid):
        pool = [o for o in options if o not in avoid]
        return pool[int(rng.integers(len(pool)))]

    def color_of(c):
        return c.color or other(COLORS)

    cat = spec.category
    if cat == TEXT_CATEGORY:
        i = int(rng.integers(len(spec.word)))
        word = spec.word[:i] + other(LETTERS, spec.word[i]) + spec.word[i + 1 :]
        return Scene(text=place_text(word, rng))
    if cat == "single_object":
        return Scene(place([(other(SHAPES, inc[0].shape), color_of(inc[0]))], rng))
    if cat == "two_objects":
        keep, drop = (inc[0], inc[1]) if rng.random() < 0.5 else (inc[1], inc[0])
        third = other(SHAPES, keep.shape, drop.shape)
        return Scene(place([(keep.shape, color_of(keep)), (third, other(COLORS))], rng))
    if cat == "counting":
        c = inc[0]
        n = c.count - 1 if c.count == 4 or rng.random() < 0.5 else c.count + 1
        return Scene(place([(c.shape, color_of(c))] * n, rng))
    if cat == "colors":
        c = inc[0]
        return Scene(place([(c.shape, other(COLORS, c.color))], rng))
    if cat == "position":
        b, a = inc
        items = [(b.shape, b.color), (a.shape, a.color)]
        objs = place(items, rng, accept=lambda o: relation_holds(o[0], o[1], a.relation, margin=0.25))
        return Scene(objs)
    if cat == "color_attribution":
        a, b = inc
        return Scene(place([(a.shape, b.color), (b.shape, a.color)], rng))
    raise ValueError(f"unknown category {cat!r}")
