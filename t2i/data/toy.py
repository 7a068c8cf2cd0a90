"""A procedural class-conditional image dataset small enough to learn in seconds on a CPU.

Class k is a soft disc of colour k on a dark background, at a random position and radius; sample i is drawn from
its own generator seeded by (seed, i), so the dataset needs no files and item i is the same in every process.
It exists for smoke configs, tests and benchmarks of the training stack; ``t2i.shapes`` is the real
procedural world.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset


def _palette(num_classes: int, channels: int) -> Tensor:
    """Evenly spaced hues (RGB) or evenly spaced grey levels (1 channel), in [-1, 1]."""
    k = torch.arange(num_classes, dtype=torch.float32)
    if channels == 1:
        return (0.2 + 0.8 * (k + 1) / num_classes)[:, None] * 2 - 1
    hue = 2 * math.pi * k / num_classes
    rgb = torch.stack([torch.cos(hue), torch.cos(hue - 2 * math.pi / 3), torch.cos(hue + 2 * math.pi / 3)], 1)
    rgb = 0.5 + 0.5 * rgb  # [0, 1]
    if channels > 3:
        rgb = torch.cat([rgb, rgb.mean(1, keepdim=True).expand(-1, channels - 3)], 1)
    return rgb[:, :channels] * 2 - 1


class ToyBlobs(Dataset):
    """``num_samples`` images ``(C, size, size)`` in [-1, 1] with labels in [0, num_classes).

    Items are dicts ``{"image": Tensor, "label": int, "caption": str}``.
    """

    def __init__(
        self,
        num_samples: int = 512,
        size: int = 16,
        channels: int = 3,
        num_classes: int = 4,
        seed: int = 0,
        random_flip: bool = False,
    ):
        if num_samples < 1 or size < 4 or channels < 1 or num_classes < 1:
            raise ValueError(
                f"ToyBlobs needs num_samples >= 1, size >= 4, channels >= 1 and num_classes >= 1; got "
                f"{num_samples}, {size}, {channels}, {num_classes}"
            )
        self.num_samples, self.size, self.channels = num_samples, size, channels
        self.num_classes, self.seed, self.random_flip = num_classes, seed, random_flip
        self.palette = _palette(num_classes, channels)
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    def get(self, i: int, generator: torch.Generator | None = None) -> dict:
        """Item ``i``, flipped horizontally with p=0.5 (drawn from ``generator``) when ``random_flip`` is on."""
        item = self[i]
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            item["image"] = item["image"].flip(-1)
        return item

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        cx, cy = (0.25 + 0.5 * torch.rand(2, generator=g)).tolist()
        r = float(0.15 + 0.15 * torch.rand((), generator=g))
        d = torch.sqrt((self._xx - cx) ** 2 + (self._yy - cy) ** 2)
        mask = torch.sigmoid((r - d) * self.size * 2)  # soft edge about a pixel wide
        background = torch.full((self.channels, 1, 1), -0.8)
        image = background + mask[None] * (self.palette[label][:, None, None] - background)
        return {"image": image, "label": label, "caption": f"a disc of colour {label}"}
