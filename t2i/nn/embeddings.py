"""Sinusoidal timestep embedding (Vaswani et al. 2017, in the ADM / DiT variant), shared by every t2i network.

One helper, not one per model, because the Unet, the prior, the MMDiT and the toy nets must agree with their
references bit for bit: the MMDiT is compared against diffusers, the Unet and prior against their references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """``[cos(t f), sin(t f)]`` with ``f_i = max_period^(-i/half)`` for (fractional) timesteps ``t`` (B,), in float32.

    Cosines come first, as in ADM, DiT and SD3; an odd ``dim`` gets one zero column at the end. The default width
    256 is DiT's and SD3's frequency embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))  # (B, dim)
