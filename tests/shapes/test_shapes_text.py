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
