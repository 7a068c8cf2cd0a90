"""Captions for the shapes world: a small paraphrase grammar, counterfactual rewrites, the train stream and the
fixed splits, and the word vocabulary a shapes CLIP is built over.

Splits (version ``SPLIT_VERSION``):
- ``train``: an infinite seeded stream; it never shows a ``HELDOUT_PAIRS`` colour x shape pair in any image and
  never captions a ``HELDOUT_RELATIONS`` arrangement.
- ``eval``: ``EVAL_PER_CATEGORY`` fixed (spec, seed) entries per category, in-distribution.
- ``heldout``: ``EVAL_PER_CATEGORY`` entries per colour-bearing category, each using a held-out pair or relation.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from t2i.errors import unknown_choice
from t2i.shapes.scenes import random_spec
from t2i.shapes.specs import ALL_CATEGORIES, HELDOUT_CATEGORIES, HELDOUT_PAIRS, TEXT_CATEGORY, Prompt, Spec, uses_pair
from t2i.shapes.world import COLORS, PLURALS, SHAPES

if TYPE_CHECKING:
    from t2i.models.clip import WordTokenizer

# Bump when anything changes what a split contains (the grammar here, the sampler and the held-out sets of
# t2i.shapes.scenes and t2i.shapes.specs); tests pin the eval/heldout lists by hash.
SPLIT_VERSION = "shapes-v1"
EVAL_PER_CATEGORY = 120

NUMBERS: dict[int, tuple[str, ...]] = {
    2: ("two", "2", "a pair of"),
    3: ("three", "3"),
    4: ("four", "4"),
}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


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
    raise unknown_choice("category", spec.category, ALL_CATEGORIES)


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
# The train stream
################################################################################################################


def sample_prompt(
    rng: np.random.Generator,
    *,
    weights: dict[str, float] | None = None,
    split: str = "train",
    index: int = 0,
    relations: tuple[str, ...] | None = None,
) -> Prompt:
    """One training prompt: a category drawn by ``weights`` (default: uniform over the seven), spec and caption;
    ``relations`` limits the position prompts' relations (``random_spec``)."""
    weights = weights or {c: 1.0 for c in ALL_CATEGORIES}
    unknown = set(weights) - set(ALL_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)} in weights; use {', '.join(ALL_CATEGORIES)}")
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"category weights must be >= 0 with a positive sum, got {weights}")
    category = names[int(rng.choice(len(names), p=p / p.sum()))]
    spec = random_spec(category, rng, relations=relations)
    return Prompt(caption_for(spec, rng), spec, seed=int(rng.integers(2**31)), split=split, index=index)


def train_prompt(seed: int, index: int, *, weights: dict[str, float] | None = None,
                 relations: tuple[str, ...] | None = None) -> Prompt:  # fmt: skip
    """Item ``index`` of the train stream of base ``seed``: independent of every other index, so any worker or
    shard can render it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    return sample_prompt(rng, weights=weights, split="train", index=index, relations=relations)


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


################################################################################################################
# The vocabulary of a shapes CLIP
################################################################################################################


def shapes_tokenizer(context_length: int = 24, n: int = 4000) -> WordTokenizer:
    """A WordTokenizer over the shapes caption grammar: the first ``n`` train captions plus the eval/heldout lists.

    Deterministic, so a CLIP run that stored only its ``ClipConfig`` gets the same vocabulary back when it loads.
    """
    from t2i.models.clip import WordTokenizer  # on use: the rest of the shapes world needs numpy, not torch

    texts = [train_prompt(0, i).caption for i in range(n)]
    texts += [p.caption for split in ("eval", "heldout") for p in split_prompts(split)]
    return WordTokenizer.build(texts, context_length=context_length)
