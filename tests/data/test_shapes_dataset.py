"""The shapes world as a torch Dataset: items and category weights, and the errors for a bad split or weights."""

from __future__ import annotations

import json

import pytest
import torch

from t2i.data.dataset import ShapesDataset
from t2i.shapes.captions import split_prompts


def test_bad_split_and_weights_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="unknown categories"):
        ShapesDataset("train", weights={"colour": 1.0})[0]
    with pytest.raises(ValueError, match="train stream"):
        ShapesDataset("eval", weights={"colors": 1.0})
    with pytest.raises(ValueError, match="unknown text_layout 'center'"):
        ShapesDataset("train", text_layout="center")
    with pytest.raises(ValueError, match="eval split's ground truth stays"):
        ShapesDataset("eval", text_layout="centred")


def test_dataset_items_and_weights():
    ds = ShapesDataset("train", 32, seed=1, weights={"position": 1.0})
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(8)), batch_size=4)
    batch = next(iter(loader))
    x = batch["image"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.8
    assert set(batch["category"]) == {"position"}
    meta = json.loads(batch["meta"][0])
    assert {"caption", "spec", "scene", "seed"} <= set(meta)
    ev = ShapesDataset("eval", 64)
    assert len(ev) == len(split_prompts("eval")) and ev[0]["image"].shape == (3, 64, 64)


def test_centred_text_layout_changes_only_the_train_streams_words():
    weights = {"text": 1.0, "position": 1.0}
    rand = ShapesDataset("train", 64, seed=3, weights=weights)
    cent = ShapesDataset("train", 64, seed=3, weights=weights, text_layout="centred")
    seen = set()
    for i in range(12):
        a, b = rand[i], cent[i]
        assert a["caption"] == b["caption"]  # the same prompts
        scene = json.loads(b["meta"])["scene"]
        if a["category"] == "text":
            assert (scene["text"]["cx"], scene["text"]["cy"]) == (0.5, 0.5)
        else:  # every other scene is drawn exactly as before
            assert torch.equal(a["image"], b["image"])
        seen.add(a["category"])
    assert seen == {"text", "position"}
