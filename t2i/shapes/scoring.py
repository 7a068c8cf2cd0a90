"""Judging images against prompts: GenEval's rules, per-image verdicts, the report, and the entry points that score
a folder or a generator.

GenEval's rules (Ghosh et al. 2023, with exact rules) run on the detector's (shape, colour, box) list: every
include clause must hold ("at least count", relations by box centres with a 0.1 margin) and no exclude clause may
fire. The text track is judged by the word read back (``t2i.shapes.text``) and reported apart from the score.
Images come as PIL images, uint8 arrays or float arrays / tensors in [0, 1] (``t2i.shapes.world.as_uint8``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from t2i.shapes.captions import split_prompts
from t2i.shapes.detect import Detection, detect
from t2i.shapes.folders import read_metadata
from t2i.shapes.scenes import ground_truth
from t2i.shapes.specs import CATEGORIES, TEXT_CATEGORY, Prompt, Spec, relation_holds_boxes
from t2i.shapes.text import letter_accuracy, read_word
from t2i.shapes.world import ImageLike, as_uint8, as_uint8_batch

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


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
LAYOUTS = ("holds", "reversed", "other", "missing")


def _candidates(clause, detections: Sequence[Detection]) -> list[Detection]:
    """The objects that match the clause, or failing that the objects of its colour (the shape drawn wrong)."""
    return [d for d in detections if _matches(clause, d)] or [d for d in detections if d.color == clause.color]


def layout_outcome(spec: Spec, detections: Sequence[Detection]) -> str | None:
    """Where a relation prompt's two objects ended up (None for prompts without a relation), judged on the objects
    that match each clause, or on those of its colour where none does.

    "holds": some pair of the two objects stands as asked and none the opposite way; "reversed": the opposite way
    only, which is what a model does that puts the objects on the right axis but cannot tell which of them the
    sentence puts first; "other": both or neither (side by side for "above", the wrong axis); "missing": an object
    is absent in both shape and colour. A model that ignores the relation word scores "holds" and "reversed" about
    equally. GenEval's verdict (``check``) also asks for the right shapes, so it can be lower than "holds".
    """
    clause = next((c for c in spec.include if c.relation is not None), None)
    if clause is None or clause.relation not in _OPPOSITE:
        return None
    target = spec.include[clause.target]
    a, b = _candidates(clause, detections), _candidates(target, detections)
    if not a or not b:
        return "missing"
    pairs = [(x.box, y.box) for x in a for y in b if x != y]
    asked = any(relation_holds_boxes(x, y, clause.relation) for x, y in pairs)
    opposite = any(relation_holds_boxes(x, y, _OPPOSITE[clause.relation]) for x, y in pairs)
    return "holds" if asked and not opposite else "reversed" if opposite and not asked else "other"


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
    layout: str | None = None  # relation prompts only: ``layout_outcome``


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

    def layouts(self) -> dict[str, int]:
        """How often the relation prompts' objects stood as asked, reversed, otherwise, or were missing."""
        found = [r.layout for r in self.results if r.layout is not None]
        return {k: found.count(k) for k in LAYOUTS} if found else {}

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
            "layouts": self.layouts(),
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
        if layouts := self.layouts():
            lines.append("position layout: " + ", ".join(f"{k} {v}" for k, v in layouts.items()))
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
    return Result(spec.category, caption, check(spec, dets), found, None, file, layout_outcome(spec, dets))


def evaluate_images(
    images: Sequence[ImageLike],
    specs: Sequence[Spec],
    captions: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
) -> Report:
    """Score images (PIL, uint8 arrays or [0, 1] floats) against their specs."""
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
    from PIL import Image

    from t2i.io.png import contact_sheet

    rows: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if len(rows.setdefault(r.category, [])) < per_category:
            rows[r.category].append(i)
    cells: list[Image.Image | None] = []
    frames: list[tuple[int, int, int] | None] = []
    for idx in rows.values():
        for k in range(per_category):
            i = idx[k] if k < len(idx) else None
            cells.append(None if i is None else Image.fromarray(as_uint8(images[i])))
            frames.append(None if i is None else (20, 160, 40) if results[i].passed else (220, 20, 20))
    side = max(as_uint8(images[0]).shape[0], 64)
    contact_sheet(cells, cell=side, columns=per_category, pad=6, frames=frames, row_labels=list(rows)).save(path)


def evaluate_folder(
    folder: str | Path, *, features: bool = False, grid: str | Path | None = None, json_path: str | Path | None = None
) -> Report:
    """Score a folder in the format of ``t2i.shapes.folders`` (``metadata.jsonl`` + images)."""
    from PIL import Image

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
    from t2i.shapes.probe import frechet_distance, kid, probe_features  # on use: the probe needs torch

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

    Float images are read in [0, 1], what ``Generator.generate`` returns, so its output scores as it is.
    Each prompt of the split is sampled ``per_prompt`` times with seeds ``prompt.seed + k``; ``per_category``
    keeps only the first prompts of each category (a fixed subset, for quick sweeps); ``where(prompt)`` filters.
    """
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
