"""Exponential moving average of model weights, by decay or by half-life, with warmup.

``decay`` is the classic per-update factor. ``half_life`` is EDM's (Karras et al. 2022, training_loop.py): a
half-life in training *samples*, so the per-update decay is ``0.5 ** (samples_per_update / half_life)`` and the
average is the same whatever the batch size. Warmup keeps early averages from being dominated by the random
initialisation: with decay it caps the factor at ``(1 + n) / (10 + n)`` after n updates (the rule of
tensorflow's ExponentialMovingAverage with num_updates), with half-life it caps the half-life at the number of
samples seen so far (EDM's ``ema_rampup``, ratio 1).

The update is ``ema = lerp(ema, model, 1 - decay)`` on floating-point parameters; buffers are copied (as
k-diffusion's ``ema_update`` does), so BatchNorm statistics and other non-trainable state follow the model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_decay(
    num_updates: int,
    *,
    decay: float = 0.999,
    half_life: float | None = None,
    samples_per_update: int = 1,
    warmup: bool = True,
) -> float:
    """The decay used for update number ``num_updates`` (0-based) under the rules in the module docstring."""
    if half_life is not None:
        hl = half_life
        if warmup:
            hl = min(hl, (num_updates + 1) * samples_per_update)
        return 0.5 ** (samples_per_update / hl)
    if warmup:
        return min(decay, (1 + num_updates) / (10 + num_updates))
    return decay


class EMA(nn.Module):
    """An EMA copy of ``model``: call ``update(model)`` after each optimiser step, use ``.module`` for sampling."""

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.999,
        half_life: float | None = None,
        samples_per_update: int = 1,
        warmup: bool = True,
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        if half_life is not None and half_life <= 0:
            raise ValueError(f"EMA half_life must be a positive number of samples, got {half_life}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.half_life = decay, half_life
        self.samples_per_update, self.warmup = samples_per_update, warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        return ema_decay(
            self.num_updates,
            decay=self.decay,
            half_life=self.half_life,
            samples_per_update=self.samples_per_update,
            warmup=self.warmup,
        )

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the average toward ``model``; returns the decay that was used."""
        d = self.current_decay()
        model_params = dict(model.named_parameters())
        for name, ema_p in self.module.named_parameters():
            p = model_params[name]
            if hasattr(p, "full_tensor"):
                # an FSDP-sharded parameter (DTensor): every rank gathers it, in the same order, and keeps a full
                # average; simple and exact, at the cost of one all-gather per update (amortise with update_every)
                p = p.full_tensor()
            if ema_p.dtype.is_floating_point:
                ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - d)
            else:
                ema_p.copy_(p)
        model_buffers = dict(model.named_buffers())
        for name, ema_b in self.module.named_buffers():
            ema_b.copy_(model_buffers[name])
        self.num_updates += 1
        return d

    def extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

    def weights(self) -> dict[str, Tensor]:
        return self.module.state_dict()
