"""What a shapes caption claims: categories, the held-out pairs and relations, specs, prompts and GenEval's
relation rule.

Every caption comes with a ``Spec``, the structured claim it makes, in GenEval's own form (Ghosh et al. 2023):
``include`` clauses (shape, optional colour, "at least count", optional relation to another clause) and
``exclude`` clauses ("fewer than count"). The evaluator checks images against the Spec and never parses text.
The grammar that words a Spec and the fixed splits live in ``t2i.shapes.captions``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from t2i.errors import unknown_choice
from t2i.shapes.world import Obj, Scene

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
TEXT_CATEGORY = "text"  # the text-rendering track, reported apart from the GenEval-style score
ALL_CATEGORIES: tuple[str, ...] = (*CATEGORIES, TEXT_CATEGORY)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "eval", "heldout")

# One pair per shape, each colour at most once: enough to measure colour-shape binding without starving any shape.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "circle"), ("orange", "square"), ("blue", "triangle"), ("pink", "diamond"), ("green", "cross")}
)
# Arrangements (A, relation, B) in canonical form (relation "left of" or "above"); the mirrored phrasing
# ("B right of A") is the same arrangement and is held out with it.
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {("triangle", "above", "circle"), ("square", "left of", "diamond"), ("cross", "above", "square")}
)
HELDOUT_CATEGORIES: tuple[str, ...] = ("counting", "colors", "position", "color_attribution")

# 2- to 4-letter words for the text track.
WORDS: tuple[str, ...] = (
    "AM", "AN", "AS", "AT", "BE", "BY", "DO", "GO", "HE", "HI", "IF", "IN", "IS", "IT", "ME", "MY", "NO",
    "OF", "OK", "ON", "OR", "SO", "TO", "UP", "US", "WE", "ACE", "ART", "BAG", "BAT", "BED", "BOX", "BUS",
    "CAN", "CAP", "CAR", "CAT", "COW", "CUP", "DAY", "DOG", "EAR", "EGG", "EYE", "FAN", "FIG", "FOX", "GUM",
    "HAT", "HEN", "ICE", "INK", "JAM", "JAR", "KEY", "KIT", "LEG", "LOG", "MAP", "MIX", "MUD", "NET", "NUT",
    "OAK", "OWL", "PAN", "PEN", "PIG", "POT", "RAT", "RED", "SEA", "SKY", "SUN", "TAX", "TEA", "TOP", "TOY",
    "VAN", "WAX", "WEB", "YAK", "ZIP", "ZOO", "BIRD", "BLUE", "BOAT", "BOOK", "CAKE", "COAT", "DUCK", "FISH",
    "FROG", "GATE", "GOLD", "HAND", "JAZZ", "KITE", "LAMP", "LEAF", "LION", "MOON", "NEST", "PARK", "QUIZ",
    "RAIN", "ROAD", "ROSE", "SHIP", "SNOW", "STAR", "TREE", "WAVE", "WOLF", "YARD", "ZERO",
)  # fmt: skip


################################################################################################################
# Specs
################################################################################################################


@dataclass(frozen=True)
class Clause:
    """``count`` or more objects of ``shape`` (of ``color`` if given); with ``relation``, one of them stands in
    that relation to an object matching include clause ``target``."""

    shape: str
    count: int = 1
    color: str | None = None
    relation: str | None = None
    target: int | None = None


@dataclass(frozen=True)
class Spec:
    """What a caption claims: GenEval's include / exclude clauses, or a ``word`` for the text track."""

    category: str
    include: tuple[Clause, ...] = ()
    exclude: tuple[Clause, ...] = ()
    word: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"] = [{k: v for k, v in c.items() if v is not None} for c in d["include"]]
        d["exclude"] = [{k: v for k, v in c.items() if v is not None} for c in d["exclude"]]
        if self.word is None:
            del d["word"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        if d.get("category") not in ALL_CATEGORIES:
            raise ValueError(f"spec category {d.get('category')!r} is not one of {', '.join(ALL_CATEGORIES)}")
        return cls(
            category=d["category"],
            include=tuple(Clause(**c) for c in d.get("include", ())),
            exclude=tuple(Clause(**c) for c in d.get("exclude", ())),
            word=d.get("word"),
        )


@dataclass(frozen=True)
class Prompt:
    """A caption, the spec it asserts, and the seed that lays out its ground-truth scene."""

    caption: str
    spec: Spec
    seed: int
    split: str = "train"
    index: int = 0

    def to_dict(self) -> dict:
        return {
            "caption": self.caption,
            "spec": self.spec.to_dict(),
            "seed": self.seed,
            "split": self.split,
            "index": self.index,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Prompt:
        return cls(d["caption"], Spec.from_dict(d["spec"]), int(d["seed"]), d.get("split", "train"), d.get("index", 0))


def canonical_relation(a: str, relation: str, b: str) -> tuple[str, str, str]:
    """(A, rel, B) with rel in {"left of", "above"}: "A right of B" is the arrangement "B left of A"."""
    if relation == "right of":
        return (b, "left of", a)
    if relation == "below":
        return (b, "above", a)
    return (a, relation, b)


def relation_holds(a: Obj, b: Obj, relation: str, margin: float = 0.1) -> bool:
    """GenEval's rule: the centre offset A - B, shrunk by margin * (dim_A + dim_B) per axis, points that way.

    Works on any boxes given as (cx, cy, w, h)-like objects with ``cx``, ``cy``, ``size`` in the same units.
    """
    return relation_holds_boxes((a.cx, a.cy, a.size, a.size), (b.cx, b.cy, b.size, b.size), relation, margin)


def relation_holds_boxes(a: tuple, b: tuple, relation: str, margin: float = 0.1) -> bool:
    """``relation_holds`` on (cx, cy, w, h) boxes."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    sx, sy = margin * (a[2] + b[2]), margin * (a[3] + b[3])
    dx = np.sign(dx) * max(abs(dx) - sx, 0.0)
    dy = np.sign(dy) * max(abs(dy) - sy, 0.0)
    norm = float(np.hypot(dx, dy))
    if norm < 1e-9:  # centres within the margin on both axes: no relation (and no float round-off verdict)
        return False
    dx, dy = dx / norm, dy / norm
    if relation == "left of":
        return dx < -0.5
    if relation == "right of":
        return dx > 0.5
    if relation == "above":
        return dy < -0.5
    if relation == "below":
        return dy > 0.5
    raise unknown_choice("relation", relation, RELATIONS)


################################################################################################################
# Which pairs and arrangements a claim uses
################################################################################################################


def uses_pair(spec: Spec, pair: tuple[str, str]) -> bool:
    """Whether one of the spec's include clauses names this (colour, shape) pair."""
    return any((c.color, c.shape) == tuple(pair) for c in spec.include)


def uses_heldout(spec: Spec, scene: Scene | None = None) -> bool:
    """Whether a spec (or the scene drawn for it) touches a held-out pair or arrangement."""
    for c in spec.include:
        if c.color and (c.color, c.shape) in HELDOUT_PAIRS:
            return True
    if spec.category == "position":
        b, a = spec.include
        if canonical_relation(a.shape, a.relation, b.shape) in HELDOUT_RELATIONS:
            return True
    return scene is not None and any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects)
