"""Training objectives: per-sample denoising losses for every parameterisation, flow matching included.

One class covers eps / v / x0 prediction on VP paths (Ho et al. 2020; Salimans & Ho 2022) and flow matching on
rectified flow (Lipman et al. 2023; Liu et al. 2022; Esser et al. 2024): they differ only in the path, the target
and the time density. Losses come back per sample, shape ``[B]``, so the training loop can reduce them, bin them
by t, or weight them without a host sync.

Weightings (all as functions of snr = alpha^2 / sigma^2):
- ``p2`` (Choi et al. 2022): 1 / (k + snr)^gamma, defined on the eps loss;
- ``min_snr`` (Hang et al. 2023): min(snr, gamma), expressed in each parameterisation's own units;
- ``sigma_sqrt`` and ``cosmap``: the SD3 flow-matching weightings (Esser et al. 2024; diffusers' training_utils).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i.errors import check_choice, unknown_choice

from .parameterization import PREDICTIONS, prediction_target
from .paths import NoisePath, append_dims
from .timesteps import LogitNormalTime, UniformTime

WEIGHTINGS = (None, "p2", "min_snr", "sigma_sqrt", "cosmap")
LOSS_TYPES = ("l2", "l1", "huber")


def _x0_error_factor(prediction: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """c such that an error e in the network output is an error c * e in the implied x0."""
    if prediction == "eps":
        return sigma / alpha
    if prediction == "v":
        return sigma / (alpha**2 + sigma**2)
    if prediction == "flow":
        return sigma / (alpha + sigma)
    return torch.ones_like(alpha)


def loss_weight(
    weighting: str | None, prediction: str, alpha: Tensor, sigma: Tensor, *, gamma: float = 5.0, k: float = 1.0
) -> Tensor:
    """Per-sample loss weight for ``weighting`` (see module docstring); ``gamma``/``k`` are p2's or min-SNR's."""
    if weighting is None:
        return torch.ones_like(alpha)
    snr = alpha**2 / sigma**2
    if weighting == "p2":
        if prediction != "eps":
            raise ValueError("p2 weighting is defined for eps prediction; use min_snr for other parameterisations")
        return 1.0 / (k + snr) ** gamma
    if weighting == "min_snr":
        return snr.clamp(max=gamma) * _x0_error_factor(prediction, alpha, sigma) ** 2
    if weighting == "sigma_sqrt":
        return sigma**-2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise unknown_choice("weighting", weighting, WEIGHTINGS)


@dataclass
class DenoisingObjective:
    """``loss = weight(t) * dist(net(x_t, t), target)``, averaged per sample.

    Args:
        path: the noise path.
        prediction: "eps", "v", "x0" or "flow".
        time_sampler: density of training times (uniform by default); times are snapped with ``path.quantize``
            so discrete paths train on their own lattice.
        weighting: None, "p2", "min_snr", "sigma_sqrt" or "cosmap".
        loss_type: "l2", "l1" or "huber" (delta ``huber_delta``).
        gamma, k: parameters of p2 and min-SNR weighting.
        shift_times: apply the path's timestep shift to sampled times (SD3 at high resolution).
    """

    path: NoisePath
    prediction: str = "eps"
    time_sampler: Callable[..., Tensor] = field(default_factory=UniformTime)
    weighting: str | None = None
    loss_type: str = "l2"
    huber_delta: float = 1.0
    gamma: float = 5.0
    k: float = 1.0
    shift_times: bool = False

    def __post_init__(self):
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)

    def sample_time(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        t = self.time_sampler(n, generator=generator)
        if self.shift_times:
            if not hasattr(self.path, "shift_time"):
                raise ValueError(f"shift_times=True needs a path with a timestep shift, got {self.path!r}")
            t = self.path.shift_time(t)
        # never train exactly at t = 0 where sigma = 0 and the task is trivial (and some weights are infinite)
        t = self.path.quantize(t.double()).clamp(min=1e-5)
        return t.to(device)

    def loss_from_prediction(self, pred: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Per-sample loss ``[B]`` of a network output ``pred`` for ``x_t = alpha(t) x0 + sigma(t) eps``."""
        a = append_dims(self.path.alpha(t), x0.ndim).to(device=x0.device, dtype=torch.float32)
        s = append_dims(self.path.sigma(t), x0.ndim).to(device=x0.device, dtype=torch.float32)
        target = prediction_target(self.prediction, x0.float(), eps.float(), a, s)
        pred = pred.float()
        if self.loss_type == "l2":
            dist = (pred - target) ** 2
        elif self.loss_type == "l1":
            dist = (pred - target).abs()
        else:
            dist = F.huber_loss(pred, target, reduction="none", delta=self.huber_delta)
        per_sample = dist.flatten(1).mean(1)
        w = loss_weight(self.weighting, self.prediction, a.flatten(), s.flatten(), gamma=self.gamma, k=self.k)
        return per_sample * w

    def __call__(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        *,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        **cond,
    ) -> Tensor:
        """Noise ``x0``, run ``net(x_t, model_time, **cond)``, return per-sample losses ``[B]``."""
        if t is None:
            t = self.sample_time(x0.shape[0], generator)
        t = torch.as_tensor(t, dtype=torch.float64).to(x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        x_t = self.path.add_noise(x0, eps, t)
        pred = net(x_t, self.path.model_time(t).float(), **cond)
        return self.loss_from_prediction(pred, x0, eps, t)


def flow_matching_objective(
    path: NoisePath,
    *,
    time_sampler: Callable[..., Tensor] | None = None,
    weighting: str | None = None,
    loss_type: str = "l2",
) -> DenoisingObjective:
    """Rectified-flow matching, velocity target eps - x0, logit-normal(0, 1) times by default (SD3)."""
    return DenoisingObjective(
        path, "flow", time_sampler or LogitNormalTime(0.0, 1.0), weighting=weighting, loss_type=loss_type
    )
