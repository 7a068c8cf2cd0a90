"""The text track: a rendered ground-truth word reads back exactly; a blank canvas reads as nothing."""

from __future__ import annotations

import numpy as np

from t2i.shapes.captions import split_prompts
from t2i.shapes.scenes import ground_truth
from t2i.shapes.text import read_word
from t2i.shapes.world import BACKGROUND


def test_text_reader():
    for p in split_prompts("eval"):
        if p.spec.category == "text":
            assert read_word(ground_truth(p, 64).image) == p.spec.word
            break
    assert read_word(np.full((64, 64, 3), BACKGROUND, np.uint8)) == ""


def test_centred_text_is_one_readable_layout_per_word_within_place_texts_range():
    from t2i.shapes.captions import train_prompt
    from t2i.shapes.specs import WORDS
    from t2i.shapes.text import centred_text, place_text, text_width

    rng = np.random.default_rng(0)
    for word in ("AM", "CAT", "JAZZ", "WOLF"):
        t = centred_text(word)
        assert (t.cx, t.cy) == (0.5, 0.5) and centred_text(word, 32) == centred_text(word, 64) == t
        # within one 5% shrink step of the tallest random placement, and it fits the canvas at both benchmark sizes
        assert t.height >= 0.95 * max(place_text(word, rng).height for _ in range(50))
        assert max(text_width(word, t.height, z) for z in (32, 64)) <= 0.88
    # the train stream with text_layout="centred": the same words, each in its one layout, read back exactly
    for i in range(40):
        p = train_prompt(5, i, weights={"text": 1.0})
        gt = ground_truth(p, 64, text_layout="centred")
        assert gt.scene.text == centred_text(p.spec.word) and read_word(gt.image) == p.spec.word
    assert {train_prompt(5, i, weights={"text": 1.0}).spec.word for i in range(40)} <= set(WORDS)
