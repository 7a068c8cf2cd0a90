"""Per-sample noise: sample k of a batch depends only on its own seed, never on batch size or position.

As in EDM's ``StackedRandomGenerator`` and the sd3.5 reference, each sample owns a CPU generator and its noise is
drawn in float32 on the CPU, then moved; so a seed gives the same image on any device and in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class Seeds:
    """A stack of per-sample random generators, one per seed.

    ``Seeds([7, 8]).randn((2, 4, 8, 8))`` draws sample 0 from seed 7 and sample 1 from seed 8; a stochastic
    sampler that calls ``randn_like`` once per step therefore gives sample k the same noise stream whatever else
    is in the batch.
    """

    def __init__(self, seeds: Sequence[int] | int):
        if isinstance(seeds, int):
            seeds = [seeds]
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("Seeds needs at least one seed")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be non-negative integers, got {seeds}")
        self.seeds = seeds
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def __repr__(self) -> str:
        return f"Seeds({self.seeds})"

    @classmethod
    def from_base(cls, seed: int, n: int) -> Seeds:
        """Seeds ``seed, seed+1, ..., seed+n-1``: image k of a request keeps its seed if n changes."""
        return cls(range(seed, seed + n))

    def randn(self, shape: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
        """Standard normal noise of ``shape``; ``shape[0]`` must equal the number of seeds."""
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"asked for a batch of {shape[0]} but these Seeds hold {len(self.generators)} seeds")
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in self.generators])
        return noise.to(device=device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, device=x.device, dtype=x.dtype)


NoiseSource = Seeds | torch.Generator | None


def randn_like(x: Tensor, noise: NoiseSource = None) -> Tensor:
    """Gaussian noise shaped like ``x`` from per-sample ``Seeds``, one ``torch.Generator``, or the global RNG."""
    if isinstance(noise, Seeds):
        return noise.randn_like(x)
    if isinstance(noise, torch.Generator):
        return torch.randn(x.shape, generator=noise, device=noise.device, dtype=torch.float32).to(x)
    return torch.randn_like(x)
