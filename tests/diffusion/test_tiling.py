"""Tiled denoising: tiles cover the image, blending is exact for local denoisers, and a whole tile is untouched."""

from __future__ import annotations

import itertools

import pytest
import torch

from t2i.diffusion import TiledDenoiser
from t2i.diffusion.tiling import tile_starts, tile_weights


@pytest.mark.parametrize(("size", "tile", "overlap"), [(64, 64, 8), (100, 32, 8), (1024, 256, 32), (40, 32, 4)])
def test_tiles_cover_the_image_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s : s + min(tile, size)] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))
    assert tile_weights(tile, overlap).min() > 0 and tile_weights(tile, overlap).max() == 1


def test_a_pointwise_denoiser_is_unchanged_by_tiling():
    """Every pixel's blend weights sum to one, so a denoiser without spatial context gives the same result tiled,
    spatial conditioning (cropped) and global conditioning (whole) included, learned variance too."""

    def denoise(x, t, *, lowres, scale, return_variance=False):
        x0 = 0.5 * x + lowres * scale[:, None, None, None] + t[:, None, None, None]
        return (x0, x.abs()) if return_variance else x0

    g = torch.Generator().manual_seed(0)
    x, low = torch.randn(2, 3, 70, 50, generator=g), torch.randn(2, 3, 70, 50, generator=g)
    cond = {"lowres": low, "scale": torch.tensor([1.0, 2.0])}
    t = torch.tensor([0.3, 0.7])
    tiled = TiledDenoiser(denoise, tile=24, overlap=6)
    torch.testing.assert_close(tiled(x, t, **cond), denoise(x, t, **cond), rtol=0, atol=1e-6)
    got, want = tiled(x, t, **cond, return_variance=True), denoise(x, t, **cond, return_variance=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_small_images_take_one_call_and_bad_tiles_are_refused():
    calls = []

    def denoise(x, t):
        calls.append(x.shape)
        return x

    TiledDenoiser(denoise, tile=32)(torch.zeros(1, 3, 32, 32), torch.zeros(1))
    assert calls == [(1, 3, 32, 32)]
    TiledDenoiser(denoise, tile=32, overlap=8)(torch.zeros(1, 3, 64, 48), torch.zeros(1))
    assert len(calls) == 1 + 3 * 2 and all(s[-2:] == (32, 32) for s in calls[1:])
    for tile, overlap in ((4, 0), (32, 16), (32, -1)):
        with pytest.raises(ValueError, match="tile must be"):
            TiledDenoiser(denoise, tile=tile, overlap=overlap)
