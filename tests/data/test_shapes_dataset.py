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
