"""From a claim to pixels: random specs, the ground-truth scene of a prompt, scenes that must fail, and the renderer.

``ground_truth(prompt, size)`` is the image a perfect model draws for a prompt: the layout is deterministic in the
prompt's seed and resolution independent, so one prompt has one scene at 32 and at 64 px. ``failure_scene`` draws
each category's failure mode at ground-truth quality, which calibrates the evaluator: it must fail every one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from t2i.errors import unknown_choice
from t2i.shapes.detect import Detection
from t2i.shapes.specs import (
    ALL_CATEGORIES,
    HELDOUT_CATEGORIES,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    RELATIONS,
    TEXT_CATEGORY,
    WORDS,
    Clause,
    Prompt,
    Spec,
    canonical_relation,
    relation_holds,
)
from t2i.shapes.text import LETTERS, TEXT_LAYOUTS, centred_text, draw_text, place_text
from t2i.shapes.world import BACKGROUND, COLORS, SHAPES, Scene, check_size, place, shape_coverage

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
        draw_text(canvas, scene.text, size)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


################################################################################################################
# A spec, its scene and its ground-truth image
################################################################################################################


def _pairs(heldout: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELDOUT_PAIRS) == heldout]


def random_spec(category: str, rng: np.random.Generator, *, heldout: bool = False,
                relations: Sequence[str] | None = None) -> Spec:  # fmt: skip
    """A random spec of ``category``. With ``heldout`` it uses at least one held-out pair or relation, else none.

    ``relations`` limits the position prompts to these relations (a curriculum: ``("left of", "above")`` first),
    redrawing among them; the default draws stay exactly those of the fixed splits."""
    if heldout and category not in HELDOUT_CATEGORIES:
        raise ValueError(f"{category} names no colour, so it has no held-out form; use one of {HELDOUT_CATEGORIES}")
    allowed = _pairs(False)

    def pair(pool=allowed):
        return pool[int(rng.integers(len(pool)))]

    def shapes(k):
        return [SHAPES[i] for i in rng.permutation(len(SHAPES))[:k]]

    if category == TEXT_CATEGORY:
        return Spec(category, word=WORDS[int(rng.integers(len(WORDS)))])
    if category == "single_object":
        return Spec(category, (Clause(shapes(1)[0]),))
    if category == "two_objects":
        a, b = shapes(2)
        return Spec(category, (Clause(a), Clause(b)))
    if category == "counting":
        n = int(rng.integers(2, 5))
        if heldout:
            color, shape = pair(_pairs(True))
        elif rng.random() < 0.5:
            color, shape = pair()
        else:
            color, shape = None, shapes(1)[0]
        return Spec(category, (Clause(shape, n, color),), (Clause(shape, n + 1, color),))
    if category == "colors":
        color, shape = pair(_pairs(True) if heldout else allowed)
        return Spec(category, (Clause(shape, 1, color),))
    if category == "position":
        for _ in range(1000):
            (ca, sa), (cb, sb) = pair(), pair()
            if heldout and rng.random() < 0.5:
                (ca, sa), (cb, sb) = pair(_pairs(True)), pair()
            rel = RELATIONS[int(rng.integers(4))]
            if relations is not None and rel not in relations:
                rel = relations[int(rng.integers(len(relations)))]
            held = canonical_relation(sa, rel, sb) in HELDOUT_RELATIONS
            uses_held = held or (ca, sa) in HELDOUT_PAIRS
            if (ca, sa) != (cb, sb) and uses_held == heldout:
                return Spec(category, (Clause(sb, 1, cb), Clause(sa, 1, ca, rel, 0)))
        raise RuntimeError("could not draw a position spec")
    if category == "color_attribution":
        for _ in range(1000):
            sa, sb = shapes(2)
            ca, cb = (list(COLORS)[i] for i in rng.permutation(len(COLORS))[:2])
            uses_held = (ca, sa) in HELDOUT_PAIRS or (cb, sb) in HELDOUT_PAIRS
            if uses_held == heldout:
                return Spec(category, (Clause(sa, 1, ca), Clause(sb, 1, cb)))
        raise RuntimeError("could not draw a color attribution spec")
    raise unknown_choice("category", category, ALL_CATEGORIES)


def _free_color(shape: str, rng: np.random.Generator) -> str:
    # Uncoloured clauses still render in some colour; it must not be a held-out pair or train would show it.
    options = [c for c in COLORS if (c, shape) not in HELDOUT_PAIRS]
    return options[int(rng.integers(len(options)))]


def scene_for(spec: Spec, rng: np.random.Generator, *, size: int = 64, text_layout: str = "random") -> Scene:
    """A ground-truth scene for ``spec``: exactly the objects it names, laid out at random.

    ``text_layout="centred"`` draws a word scene in its one canonical layout (``centred_text``) instead.
    """
    if text_layout not in TEXT_LAYOUTS:
        raise unknown_choice("text_layout", text_layout, TEXT_LAYOUTS)
    if spec.category == TEXT_CATEGORY:
        if text_layout == "centred":
            return Scene(text=centred_text(spec.word, size))
        return Scene(text=place_text(spec.word, rng, size))
    inc = spec.include
    if spec.category == "counting":
        c = inc[0]
        items = [(c.shape, c.color or _free_color(c.shape, rng)) for _ in range(c.count)]
        return Scene(place(items, rng))
    items = [(c.shape, c.color or _free_color(c.shape, rng)) for c in inc]
    if spec.category == "position":
        rel = inc[1].relation
        # The layout must satisfy the relation with a clear margin (0.25 rather than GenEval's 0.1), so mild blur
        # or a slightly shifted detection box cannot flip a ground-truth image.
        objs = place(items, rng, accept=lambda o: relation_holds(o[1], o[0], rel, margin=0.25))
        return Scene(objs)
    return Scene(place(items, rng))


@dataclass(frozen=True)
class Sample:
    """A prompt, its ground-truth scene and the rendered uint8 (H, W, 3) image."""

    prompt: Prompt
    scene: Scene
    image: np.ndarray

    def record(self, file: str | None = None) -> dict:
        """The metadata line of this sample (what a folder's ``metadata.jsonl`` and the shards' ``.json`` hold)."""
        d = self.prompt.to_dict()
        d["category"] = self.prompt.spec.category
        d["scene"] = self.scene.to_dict()
        if file is not None:
            d = {"file": file, **d}
        return d


def shape_maps(scene: Scene, grid: int) -> np.ndarray:
    """(len(SHAPES), grid, grid) float32: the fraction of each cell of a grid x grid split of the canvas that each
    shape covers: the shape-by-place target of a decoder's shape map (``UnetConfig.image_shape_map_channels``) and a
    caption encoder's (``CaptionEncoderConfig.shape_channels``).
    Overlaps keep the larger coverage per shape; the word of a text scene is not a shape."""
    out = np.zeros((len(SHAPES), grid, grid), np.float32)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box()
        cov = shape_coverage(o.shape, x0 * grid, y0 * grid, (x1 - x0) * grid, (y1 - y0) * grid, grid, grid)
        k = SHAPES.index(o.shape)
        out[k] = np.maximum(out[k], cov)
    return out


def ground_truth(prompt: Prompt, size: int = 32, *, text_layout: str = "random") -> Sample:
    """Lay out and render the ground-truth image of ``prompt`` (deterministic in its seed)."""
    scene = scene_for(prompt.spec, np.random.default_rng(prompt.seed), size=size, text_layout=text_layout)
    return Sample(prompt, scene, render(scene, size))


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


################################################################################################################
# Hard negatives: the same objects, another meaning
################################################################################################################


def _as_detections(scene: Scene) -> list[Detection]:
    return [Detection(o.shape, o.color, o.cx, o.cy, o.size, o.size, 1.0) for o in scene.objects]


def counterfactual_scenes(spec: Spec, scene: Scene) -> list[Scene]:
    """Scenes made of ``scene``'s own objects that ``spec`` no longer holds for: the scene mirrored across its
    relation's axis (the sides swapped), the two colours or the two shapes swapped between the objects, or the last
    object left out (a lost object, a count one short). The image-side counterpart of
    ``counterfactual_captions``: a contrastive image tower that must rank the true scene above these has to encode
    where each object is, which colour goes with which shape and how many there are, which a pooled embedding
    otherwise barely does. Each candidate is kept only if GenEval's rule (``scoring.check`` on the scene's exact
    boxes) fails on it; a word scene has none."""
    from t2i.shapes.scoring import check  # scoring imports this module

    objs = scene.objects
    if spec.category == TEXT_CATEGORY or scene.text is not None or not objs:
        return []
    out: list[Scene] = []
    relations = {c.relation for c in spec.include if c.relation is not None}
    if relations & {"left of", "right of"}:
        out.append(Scene(tuple(replace(o, cx=1.0 - o.cx) for o in objs)))
    if relations & {"above", "below"}:
        out.append(Scene(tuple(replace(o, cy=1.0 - o.cy) for o in objs)))
    for field in ("color", "shape"):
        values = sorted({getattr(o, field) for o in objs})
        if len(values) == 2:
            swap = {values[0]: values[1], values[1]: values[0]}
            out.append(Scene(tuple(replace(o, **{field: swap[getattr(o, field)]}) for o in objs)))
    if len(objs) > 1:
        out.append(Scene(objs[:-1]))
    return [s for s in out if not check(spec, _as_detections(s))]
