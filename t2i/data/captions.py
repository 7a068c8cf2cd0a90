"""Captions for the shapes world: GenEval's categories, a small paraphrase grammar and the fixed splits.

Every caption comes with a ``Spec``, the structured claim it makes, in GenEval's own form (Ghosh et al. 2023):
``include`` clauses (shape, optional colour, "at least count", optional relation to another clause) and
``exclude`` clauses ("fewer than count"). The evaluator checks images against the Spec and never parses text.

Splits (version ``SPLIT_VERSION``):
- ``train``: an infinite seeded stream; it never shows a ``HELDOUT_PAIRS`` colour x shape pair in any image and
  never captions a ``HELDOUT_RELATIONS`` arrangement.
- ``eval``: ``EVAL_PER_CATEGORY`` fixed (spec, seed) entries per category, in-distribution.
- ``heldout``: ``EVAL_PER_CATEGORY`` entries per colour-bearing category, each using a held-out pair or relation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from t2i.data.shapes import COLORS, PLURALS, SHAPES, Obj, Scene, place, place_text

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
TEXT_CATEGORY = "text"  # the text-rendering track, reported apart from the GenEval-style score
ALL_CATEGORIES: tuple[str, ...] = (*CATEGORIES, TEXT_CATEGORY)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "eval", "heldout")

# Bump when anything below changes what a split contains; tests pin the eval/heldout lists by hash.
SPLIT_VERSION = "shapes-v1"
EVAL_PER_CATEGORY = 120

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

NUMBERS: dict[int, tuple[str, ...]] = {
    2: ("two", "2", "a pair of"),
    3: ("three", "3"),
    4: ("four", "4"),
}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


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
    raise ValueError(f"unknown relation {relation!r}; use one of {', '.join(RELATIONS)}")


################################################################################################################
# Grammar: spec -> caption
################################################################################################################


def _obj(color: str | None, shape: str) -> str:
    return _a(f"{color} {shape}" if color else shape)


def caption_for(spec: Spec, rng: np.random.Generator) -> str:
    """A caption for ``spec``, choosing among a few paraphrase templates."""

    def pick(options):
        return options[int(rng.integers(len(options)))]

    inc = spec.include
    if spec.category == TEXT_CATEGORY:
        return pick(('the word "{w}"', 'the text "{w}"', 'a sign that says "{w}"')).format(w=spec.word)
    if spec.category == "single_object":
        s = inc[0].shape
        return pick((f"a {s}", f"one {s}", f"a single {s}", f"a picture of a {s}"))
    if spec.category == "two_objects":
        a, b = inc[0].shape, inc[1].shape
        return pick((f"a {a} and a {b}", f"a {a} next to a {b}", f"a {a} with a {b}"))
    if spec.category == "counting":
        c = inc[0]
        n = pick(NUMBERS[c.count])
        noun = f"{c.color} {PLURALS[c.shape]}" if c.color else PLURALS[c.shape]
        exactly = "just" if n.startswith("a ") else "exactly"  # "just a pair of", not "exactly a pair of"
        return pick((f"{n} {noun}", f"{exactly} {n} {noun}", f"an image with {n} {noun}"))
    if spec.category == "colors":
        c = inc[0]
        return pick((_obj(c.color, c.shape), f"{_a(c.shape)} that is {c.color}", f"one {c.color} {c.shape}"))
    if spec.category == "position":
        b, a = inc[0], inc[1]
        phrase = {
            "left of": ("to the left of", "left of", "on the left of"),
            "right of": ("to the right of", "right of", "on the right of"),
            "above": ("above", "over"),
            "below": ("below", "under", "beneath"),
        }[a.relation]
        return f"{_obj(a.color, a.shape)} {pick(phrase)} {_obj(b.color, b.shape)}"
    if spec.category == "color_attribution":
        a, b = inc
        return pick(
            (
                f"{_obj(a.color, a.shape)} and {_obj(b.color, b.shape)}",
                f"{_a(a.shape)} that is {a.color} and {_a(b.shape)} that is {b.color}",
            )
        )
    raise ValueError(f"unknown category {spec.category!r}; use one of {', '.join(ALL_CATEGORIES)}")


# Hard negatives for contrastive training: the same words, a different meaning. A CLIP trained on in-batch negatives
# alone can tell captions apart by their bag of words (other colours, other shapes), so it never has to learn which
# way a relation points or which colour goes with which shape. Each rewrite below keeps every word's vocabulary and
# fixes the articles, so the negative differs from a real caption only in what it means.
_REVERSED = {"left": "right", "right": "left", "above": "below", "over": "under", "below": "above",
             "under": "over", "beneath": "above"}  # fmt: skip
_OTHER_COUNT = {"two": "three", "2": "3", "three": "four", "3": "4", "four": "three", "4": "3"}


def _fix_articles(words: list[str]) -> list[str]:
    return [("an" if words[i + 1][0] in "aeiou" else "a") if w in ("a", "an") and i + 1 < len(words) else w
            for i, w in enumerate(words)]  # fmt: skip


def counterfactual_captions(caption: str) -> list[str]:
    """Captions that share ``caption``'s words but not its meaning: the relation reversed ("left" <-> "right",
    "above" <-> "below"), the two colours or the two shapes swapped (when colours or a relation bind them), or the
    count changed. Empty when the caption has none of these (one object, two objects without colours, a word)."""
    words = caption.replace("a pair of", "two").split(" ")
    out = []
    if any(w in _REVERSED for w in words):
        out.append([_REVERSED.get(w, w) for w in words])
    relation, two_colors = bool(out), len({w for w in words if w in COLORS}) == 2
    for vocab in (COLORS, SHAPES):  # two shapes without two colours or a relation read the same either way round
        at = [i for i, w in enumerate(words) if w in vocab]
        if len(at) == 2 and words[at[0]] != words[at[1]] and (relation or two_colors):
            swapped = list(words)
            swapped[at[0]], swapped[at[1]] = words[at[1]], words[at[0]]
            out.append(swapped)
    if any(w in PLURALS.values() for w in words) and any(w in _OTHER_COUNT for w in words):
        out.append([_OTHER_COUNT.get(w, w) for w in words])
    return [" ".join(_fix_articles(w)) for w in out]


################################################################################################################
# Sampling: random spec, and the scene for a spec
################################################################################################################


def _pairs(heldout: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELDOUT_PAIRS) == heldout]


def random_spec(category: str, rng: np.random.Generator, *, heldout: bool = False) -> Spec:
    """A random spec of ``category``. With ``heldout`` it uses at least one held-out pair or relation, else none."""
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
    raise ValueError(f"unknown category {category!r}; use one of {', '.join(ALL_CATEGORIES)}")


def _free_color(shape: str, rng: np.random.Generator) -> str:
    # Uncoloured clauses still render in some colour; it must not be a held-out pair or train would show it.
    options = [c for c in COLORS if (c, shape) not in HELDOUT_PAIRS]
    return options[int(rng.integers(len(options)))]


def scene_for(spec: Spec, rng: np.random.Generator, *, size: int = 64) -> Scene:
    """A ground-truth scene for ``spec``: exactly the objects it names, laid out at random."""
    if spec.category == TEXT_CATEGORY:
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


def sample_prompt(
    rng: np.random.Generator, *, weights: dict[str, float] | None = None, split: str = "train", index: int = 0
) -> Prompt:
    """One training prompt: a category drawn by ``weights`` (default: uniform over the seven), spec and caption."""
    weights = weights or {c: 1.0 for c in ALL_CATEGORIES}
    unknown = set(weights) - set(ALL_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)} in weights; use {', '.join(ALL_CATEGORIES)}")
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"category weights must be >= 0 with a positive sum, got {weights}")
    category = names[int(rng.choice(len(names), p=p / p.sum()))]
    spec = random_spec(category, rng)
    return Prompt(caption_for(spec, rng), spec, seed=int(rng.integers(2**31)), split=split, index=index)


################################################################################################################
# Fixed splits
################################################################################################################


def _split_rng(split: str, category: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{SPLIT_VERSION}/{split}/{category}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@lru_cache(maxsize=4)
def split_prompts(split: str) -> tuple[Prompt, ...]:
    """The fixed prompt list of ``eval`` (all seven categories) or ``heldout`` (the colour-bearing four)."""
    if split not in ("eval", "heldout"):
        raise ValueError(f"split {split!r} has no fixed prompt list; use 'eval' or 'heldout' ('train' is a stream)")
    categories = ALL_CATEGORIES if split == "eval" else HELDOUT_CATEGORIES
    out: list[Prompt] = []
    for category in categories:
        rng = _split_rng(split, category)
        for _ in range(EVAL_PER_CATEGORY):
            spec = random_spec(category, rng, heldout=split == "heldout")
            caption = caption_for(spec, rng)
            # Seeds are offset per split so eval and heldout scenes never share a layout stream with train's
            # default seeds (which are drawn below 2**31).
            seed = (1 << 32) + (0 if split == "eval" else 1 << 20) + len(out)
            out.append(Prompt(caption, spec, seed, split, len(out)))
    return tuple(out)


def split_digest(split: str) -> str:
    """sha256 of the split's JSON: tests pin it, so an accidental change to the grammar cannot go unnoticed."""
    blob = json.dumps([p.to_dict() for p in split_prompts(split)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_prompt(seed: int, index: int, *, weights: dict[str, float] | None = None) -> Prompt:
    """Item ``index`` of the train stream of base ``seed``: independent of every other index, so any worker or
    shard can render it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    return sample_prompt(rng, weights=weights, split="train", index=index)


def uses_pair(spec: Spec, pair: tuple[str, str]) -> bool:
    """Whether one of the spec's include clauses names this (colour, shape) pair."""
    return any((c.color, c.shape) == tuple(pair) for c in spec.include)


def focus_prompt(seed: int, index: int, pair: tuple[str, str]) -> Prompt:
    """Item ``index`` of a stream whose every prompt names the (colour, shape) ``pair`` (typically a held-out one,
    for fine-tuning on a new combination): a colour-bearing category, its held-out form when the pair is held out,
    redrawn until a clause uses the pair."""
    color, shape = pair
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown pair {pair!r}: colours are {', '.join(COLORS)}; shapes {', '.join(SHAPES)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0xF0C5]))
    held = tuple(pair) in HELDOUT_PAIRS
    for _ in range(10_000):
        category = HELDOUT_CATEGORIES[int(rng.integers(len(HELDOUT_CATEGORIES)))]
        spec = random_spec(category, rng, heldout=held)
        if uses_pair(spec, pair):
            return Prompt(caption_for(spec, rng), spec, seed=int(rng.integers(2**31)), split="train", index=index)
    raise RuntimeError(f"could not draw a prompt naming {pair}")


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
