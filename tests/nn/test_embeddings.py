"""The shared sinusoidal timestep embedding: formula, odd widths, and that every network uses this one helper."""

from __future__ import annotations

import math

import torch

from t2i.nn.embeddings import timestep_embedding


def test_matches_the_formula_in_float64():
    t = torch.tensor([0.0, 1.0, 12.5, 999.0])
    emb = timestep_embedding(t, 8, max_period=100.0)
    freqs = [100.0 ** (-i / 4) for i in range(4)]
    ref = torch.tensor(
        [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()], dtype=torch.float64
    )
    assert emb.dtype == torch.float32 and emb.shape == (4, 8)
    torch.testing.assert_close(emb.double(), ref, atol=1e-4, rtol=0)  # fp32 rounding of t * f at t ~ 1000


def test_odd_width_pads_one_zero_column_and_default_width_is_256():
    t = torch.tensor([3.0, 7.0])
    odd = timestep_embedding(t, 9)
    assert odd.shape == (2, 9) and (odd[:, -1] == 0).all()
    torch.testing.assert_close(odd[:, :8], timestep_embedding(t, 8), rtol=0, atol=0)
    assert timestep_embedding(t).shape == (2, 256)
    assert timestep_embedding(t.half(), 16).dtype == torch.float32  # always float32, whatever t is


def test_every_network_uses_the_shared_helper():
    from t2i.models import mmdit, prior, toy, unet

    for module in (mmdit, prior, toy, unet):
        assert module.timestep_embedding is timestep_embedding, module.__name__
