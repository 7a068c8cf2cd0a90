"""Captions, specs and splits: determinism by seed, JSON round trips, pinned splits and paraphrases, held-out pairs
kept out of train, the focus stream and counterfactual rewrites."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from t2i.data.dataset import ShapesDataset
from t2i.shapes.captions import EVAL_PER_CATEGORY, split_digest, split_prompts, train_prompt
from t2i.shapes.scenes import ground_truth
from t2i.shapes.specs import (
    ALL_CATEGORIES,
    HELDOUT_CATEGORIES,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    Prompt,
    Spec,
    canonical_relation,
    uses_heldout,
)
from t2i.shapes.world import COLORS, PLURALS, SHAPES, Scene

# Pinned digests of the fixed splits: if the grammar, the sampler or numpy's streams change what a split contains,
# these fail, and the fix is to bump SPLIT_VERSION (results on different split versions are not comparable).
EVAL_DIGEST = "371a35fd19424c6614a810d5153e1bd0739c96b96ba0a74a17a45063a0f9cd9b"
HELDOUT_DIGEST = "3daa7cc16acf976aa716d80dd2b7014d11a6364472215214cf8de72be9be9b86"


def test_generation_is_deterministic_by_seed():
    a, b = train_prompt(3, 17), train_prompt(3, 17)
    assert a == b
    assert np.array_equal(ground_truth(a, 32).image, ground_truth(b, 32).image)
    others = [train_prompt(3, i) for i in range(18, 30)] + [train_prompt(4, 17)]
    assert all(o.seed != a.seed for o in others)
    ds = ShapesDataset("train", 32, seed=3)
    assert torch.equal(ds[17]["image"], ds[17]["image"])
    assert ds[17]["caption"] == a.caption


@pytest.mark.parametrize("split", ["eval", "heldout"])
def test_prompts_and_scenes_round_trip_through_json(split):
    for p in split_prompts(split):
        s = ground_truth(p, 32)
        assert Prompt.from_dict(json.loads(json.dumps(p.to_dict()))) == p
        assert Scene.from_json(s.scene.to_json()) == s.scene
        assert Spec.from_dict(p.spec.to_dict()) == p.spec


def test_fixed_splits_are_pinned():
    assert split_digest("eval") == EVAL_DIGEST
    assert split_digest("heldout") == HELDOUT_DIGEST


def test_split_sizes_and_paraphrases():
    counts = Counter(p.spec.category for p in split_prompts("eval"))
    assert counts == dict.fromkeys(ALL_CATEGORIES, EVAL_PER_CATEGORY)
    assert EVAL_PER_CATEGORY >= 100
    held = Counter(p.spec.category for p in split_prompts("heldout"))
    assert held == dict.fromkeys(HELDOUT_CATEGORIES, EVAL_PER_CATEGORY)
    captions = [p.caption for p in split_prompts("eval")]
    for phrase in (" 2 ", "two ", "a pair of", " left of ", " right of ", " above ", " below ", 'the word "'):
        assert any(phrase in f" {c} " for c in captions), phrase
    # Several templates per category: captions differ even with the object words blanked out.
    vocab = {*SHAPES, *PLURALS.values(), *COLORS, "a", "an", "2", "3", "4", "two", "three", "four", "pair", "of"}
    for cat in ALL_CATEGORIES:
        skeletons = {
            " ".join("_" if w in vocab else w for w in p.caption.split('"')[0].split())
            for p in split_prompts("eval")
            if p.spec.category == cat
        }
        assert len(skeletons) >= 2, (cat, skeletons)


def test_heldout_pairs_never_appear_in_train():
    seen_pairs, seen_relations = set(), set()
    for i in range(3000):
        p = train_prompt(0, i)
        s = ground_truth(p, 32)
        assert not uses_heldout(p.spec, s.scene), (i, p.caption)
        seen_pairs |= {(o.color, o.shape) for o in s.scene.objects}
        if p.spec.category == "position":
            b, a = p.spec.include
            seen_relations.add(canonical_relation(a.shape, a.relation, b.shape))
    allowed = {(c, s) for c in COLORS for s in SHAPES} - HELDOUT_PAIRS
    assert seen_pairs == allowed  # the stream covers every other pair, so the check above is not vacuous
    assert not seen_relations & HELDOUT_RELATIONS
    assert len(seen_relations) > 20
    # ... and every heldout entry does use one, while no eval entry does.
    assert all(uses_heldout(p.spec) for p in split_prompts("heldout"))
    assert not any(uses_heldout(p.spec, ground_truth(p, 32).scene) for p in split_prompts("eval"))


def test_focus_stream_names_its_pair_in_every_prompt_and_image():
    from t2i.data.dataset import ShapesDataset
    from t2i.shapes.captions import focus_prompt
    from t2i.shapes.specs import HELDOUT_CATEGORIES, uses_pair

    ds = ShapesDataset("train", 32, seed=3, length=40, focus=("purple", "circle"))
    cats = set()
    for i in range(40):
        p = ds.prompt(i)
        assert uses_pair(p.spec, ("purple", "circle")) and p.spec.category in HELDOUT_CATEGORIES
        cats.add(p.spec.category)
        assert any((o.color, o.shape) == ("purple", "circle") for o in ds.sample(i).scene.objects)
    assert cats == set(HELDOUT_CATEGORIES)
    assert focus_prompt(3, 5, ("purple", "circle")) == ds.prompt(5)  # item i depends only on (seed, i)
    with pytest.raises(ValueError, match="unknown pair"):
        focus_prompt(0, 0, ("white", "circle"))
    with pytest.raises(ValueError, match="split='train'"):
        ShapesDataset("eval", 32, focus=("purple", "circle"))


def test_counterfactual_captions_keep_the_words_and_change_the_meaning():
    from collections import Counter

    from t2i.shapes.captions import counterfactual_captions, train_prompt

    assert counterfactual_captions("a red circle to the left of a blue square") == [
        "a red circle to the right of a blue square",  # the relation reversed
        "a blue circle to the left of a red square",  # the colours swapped
        "a red square to the left of a blue circle",  # the shapes swapped
    ]
    assert counterfactual_captions("an orange circle and a red cross") == [
        "a red circle and an orange cross",  # articles follow the swapped colours
        "an orange cross and a red circle",
    ]
    assert counterfactual_captions("just a pair of circles") == ["just three circles"]
    # nothing to rewrite, or a rewrite that would mean the same
    for same in ("a red circle", "a circle next to a cross", "a red circle and a red cross", 'the word "CAT"'):
        assert counterfactual_captions(same) == []
    ignore = {"a", "an", "two", "three", "four", "2", "3", "4", "pair", "of"}
    for i in range(300):
        p = train_prompt(0, i)
        for rewrite in counterfactual_captions(p.caption):
            assert rewrite != p.caption
            if p.spec.category != "counting":  # a reordering: the same words, articles aside
                words = lambda s: Counter(w for w in s.split() if w not in ignore)  # noqa: E731
                assert words(rewrite) == words(p.caption) or p.spec.category == "position"
