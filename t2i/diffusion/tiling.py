"""Tiled denoising: sample an image larger than one network pass can hold, in overlapping tiles, without seams.

The last stage of a 64 -> 256 -> 1024 cascade runs its Unet on 1024 x 1024 pixels; its activations grow with the
area, so one pass can need more memory than the machine has. ``TiledDenoiser`` wraps any denoiser: every call
splits the noisy image into overlapping tiles, denoises each with its crop of every spatial conditioning tensor (the
upsampled low-res image, the self-conditioning estimate), and blends the tiles' x0 estimates with weights that fall
off linearly across the overlap. The blend happens at every step, on the estimate the sampler steps with
(MultiDiffusion, Bar-Tal et al. 2023), so neighbouring tiles agree where they meet and no seam forms; the sampler's
own noise is drawn once for the whole image. Peak memory is one tile's activations (times the batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .parameterization import DenoiseFn, join_variance, split_variance


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` px that cover ``size`` px, neighbours overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def tile_weights(tile: int, overlap: int) -> Tensor:
    """(tile,) blending weights: 1 in the middle, a linear ramp across ``overlap`` px at both ends (never 0)."""
    i = torch.arange(tile, dtype=torch.float32)
    ramp = torch.minimum(i + 1, tile - i) / (overlap + 1)
    return ramp.clamp(max=1.0)


class TiledDenoiser:
    """``denoise`` applied in ``tile`` x ``tile`` tiles overlapping by ``overlap`` px (see the module docstring).

    Conditioning tensors shaped ``(B, C, H, W)`` like the image are cropped with it; all others (embeddings, text,
    times) go to every tile whole. An image no larger than one tile is denoised in one call, unchanged.
    """

    def __init__(self, denoise: DenoiseFn, tile: int, overlap: int = 8):
        if tile < 8 or not 0 <= overlap < tile // 2:
            raise ValueError(f"tile must be >= 8 px and overlap in [0, tile / 2), got tile {tile}, overlap {overlap}")
        self.denoise, self.tile, self.overlap = denoise, tile, overlap

    def __call__(self, x: Tensor, t: Tensor, **cond):
        h, w = x.shape[-2:]
        if h <= self.tile and w <= self.tile:
            return self.denoise(x, t, **cond)
        th, tw = min(self.tile, h), min(self.tile, w)
        wy = tile_weights(th, self.overlap).to(x)[:, None]
        wx = tile_weights(tw, self.overlap).to(x)[None, :]
        weight = wy * wx
        total = torch.zeros(x.shape[-2:], device=x.device, dtype=x.dtype)
        acc = var_acc = None
        for y0 in tile_starts(h, th, self.overlap):
            for x0 in tile_starts(w, tw, self.overlap):
                window = (..., slice(y0, y0 + th), slice(x0, x0 + tw))
                crop = {k: v[window] if _spatial(v, h, w) else v for k, v in cond.items()}
                x0_hat, var = split_variance(self.denoise(x[window], t, **crop))
                if acc is None:
                    acc = x0_hat.new_zeros(*x0_hat.shape[:-2], h, w)
                    var_acc = None if var is None else torch.zeros_like(acc)
                acc[window] += x0_hat * weight
                if var is not None:
                    var_acc[window] += var * weight
                total[y0 : y0 + th, x0 : x0 + tw] += weight
        return join_variance(acc / total, None if var_acc is None else var_acc / total)


def _spatial(v, h: int, w: int) -> bool:
    return isinstance(v, Tensor) and v.ndim == 4 and tuple(v.shape[-2:]) == (h, w)
