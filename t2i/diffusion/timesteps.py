"""Training-time densities over t in (0, 1): where along the path each training example is noised.

- ``uniform``: DDPM and most VP training;
- ``logit_normal(m, s)``: t = sigmoid(N(m, s^2)) (Esser et al. 2024, Sec. 3.1; SD3 uses m=0, s=1);
- ``mode(scale)``: the heavy-middle density of Esser et al. 2024, Eq. 20 (scale=0 is uniform);
- ``cosmap``: t = 1 - 1 / (tan(pi u / 2) + 1) (Esser et al. 2024, Eq. 21).

Each sampler is a callable ``(n, generator=None, device=None) -> t`` of shape ``[n]`` in float32, drawn on the
CPU from ``generator`` so that training is reproducible on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from t2i.errors import check_choice


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class UniformTime:
    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return _uniform(n, generator).float().to(device)


@dataclass(frozen=True)
class LogitNormalTime:
    mean: float = 0.0
    std: float = 1.0

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64) * self.std + self.mean
        return torch.sigmoid(z).float().to(device)


@dataclass(frozen=True)
class ModeTime:
    scale: float = 1.29

    def __post_init__(self):
        # t must stay monotone in u for this to be a density: requires -1 <= scale <= 2/(pi - 2)
        if not -1.0 <= self.scale <= 2 / (math.pi - 2):
            raise ValueError(f"mode scale must lie in [-1, {2 / (math.pi - 2):.3f}], got {self.scale}")

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        u = _uniform(n, generator)
        t = 1 - u - self.scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return t.float().to(device)


@dataclass(frozen=True)
class CosMapTime:
    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        u = _uniform(n, generator)
        return (1 - 1 / (torch.tan(math.pi * u / 2) + 1)).float().to(device)


TIME_SAMPLERS = {"uniform": UniformTime, "logit_normal": LogitNormalTime, "mode": ModeTime, "cosmap": CosMapTime}


def make_time_sampler(name: str, **kwargs):
    """Build a time density by name, e.g. ``make_time_sampler("logit_normal", mean=0.0, std=1.0)``."""
    check_choice("time sampler", name, TIME_SAMPLERS)
    return TIME_SAMPLERS[name](**kwargs)
