"""The world's pixel format: ``as_uint8`` reads uint8 as it is and floats in [0, 1], in either channel layout, and
rounds floats exactly as the PNG writer does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i.io.png import to_pil
from t2i.shapes.world import as_uint8, as_uint8_batch


def test_uint8_passes_through_in_either_layout():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(as_uint8(img), img)
    assert np.array_equal(as_uint8(img.transpose(2, 0, 1)), img)  # (3, H, W)
    assert np.array_equal(as_uint8(torch.from_numpy(img)), img)


def test_floats_are_zero_one_and_round_like_the_png_writer():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 32, 32, generator=g) * 1.2 - 0.1  # a little outside [0, 1] too: clipped, not wrapped
    x[0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 254.5 / 255])  # the ends and two rounding midpoints
    got = as_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    assert np.array_equal(got, np.asarray(to_pil(x)))  # a tensor scores exactly as the PNG written from it
    assert got[0, 0, 0] == 0 and got[0, 1, 0] == 255
    assert np.array_equal(as_uint8(x.numpy().transpose(1, 2, 0)), got)  # numpy (H, W, 3) floats alike


def test_batches_and_bad_shapes():
    batch = torch.rand(4, 3, 32, 32)
    out = as_uint8_batch(batch)
    assert len(out) == 4 and all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in out)
    with pytest.raises(ValueError, match="expected a batch"):
        as_uint8_batch(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="3 colour channels"):
        as_uint8(np.zeros((32, 32, 4), np.uint8))
