"""Image transforms for training: decode, resize the short side, crop (random or centre), random flip.

Randomness comes from an explicit ``torch.Generator`` per sample, never from global state: the training loop seeds
it from the sample's position in the data stream, so augmentations replay exactly on resume and do not depend on
which process or worker loads the sample. Images come out as float32 ``(C, H, W)`` in [-1, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def pil_to_tensor(img: Image.Image, channels: int = 3) -> Tensor:
    """PIL image -> float32 ``(C, H, W)`` in [-1, 1]; converts mode to RGB (3 channels) or L (1 channel)."""
    if channels not in (1, 3):
        raise ValueError(f"images can be decoded to 1 or 3 channels, not {channels}")
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (C, H, W) in [0, 255]
    return x / 127.5 - 1.0


def decode_image(data: bytes, channels: int = 3) -> Tensor:
    """Encoded image bytes (PNG, JPEG, ...) -> ``(C, H, W)`` in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as img:
        return pil_to_tensor(img, channels)


def resize_short_side(x: Tensor, size: int) -> Tensor:
    """Resize so the shorter side is ``size`` (antialiased bilinear; a no-op when it already is)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(x[None], size=new, mode="bilinear", antialias=True, align_corners=False)[0]


def crop(x: Tensor, size: int, *, random: bool, generator: torch.Generator | None = None) -> Tensor:
    """A ``size`` x ``size`` crop: uniformly placed when ``random``, else centred."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} image; resize it first")
    if random:
        top = int(torch.randint(0, h - size + 1, (), generator=generator))
        left = int(torch.randint(0, w - size + 1, (), generator=generator))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side to ``size``, crop to a square (random or centre), flip horizontally with p=0.5."""

    size: int
    random_crop: bool = False
    random_flip: bool = False

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = resize_short_side(x, self.size)
        x = crop(x, self.size, random=self.random_crop, generator=generator)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return x.contiguous()


def sample_seed(seed: int, draw: int, stream: int = 0) -> int:
    """The seed of ``sample_generator(seed, draw, stream)``: for a sampler's per-sample noise (``t2i.nn.Seeds``)."""
    # large odd multipliers spread consecutive draws and seeds apart; mask to torch's 63-bit seed range
    key = seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + draw
    return key & 0x7FFF_FFFF_FFFF_FFFF


def sample_generator(seed: int, draw: int, stream: int = 0) -> torch.Generator:
    """The generator for the sample at stream position ``draw`` of a run seeded ``seed``.

    ``stream`` separates independent uses of the same sample (0: augmentation, 1: diffusion noise, ...).
    """
    return torch.Generator().manual_seed(sample_seed(seed, draw, stream))
