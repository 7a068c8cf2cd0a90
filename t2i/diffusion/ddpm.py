"""DDPM's Gaussian transitions between two grid points s < t of any noise path, written once.

- the forward transition ``q(x_t | x_s) = N(a_ts x_s, v_ts)``, with ``a_ts = alpha_t / alpha_s`` and
  ``v_ts = sigma_t^2 - a_ts^2 sigma_s^2`` (as Kingma et al. 2021 write it for Variational Diffusion Models);
  RePaint's jump back to a noisier time samples it;
- the posterior ``q(x_s | x_t, x0)`` (Ho et al. 2020, Eqs. 6-7, on any grid): mean
  ``(a_ts sigma_s^2 / sigma_t^2) x_t + (alpha_s v_ts / sigma_t^2) x0`` and variance ``v_ts sigma_s^2 / sigma_t^2``
  ("small", beta tilde), or the forward variance ``v_ts`` ("large", beta), or the network's learned log-linear
  interpolation between the two (Nichol & Dhariwal 2021, Eq. 15). ``sample_ddpm`` takes one such step per grid
  interval; so does RePaint when ``sample_ddpm`` takes its steps.

All coefficients are Python floats (float64 math, as the samplers' grids hold them); tensors keep their dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from t2i.nn.noise import NoiseSource, randn_like

#: the variances ``ddpm_step`` accepts by name; a tensor is the learned interpolation v in [0, 1]
DDPM_VARIANCES = ("small", "large", "learned")


def forward_transition(a_t: float, s_t: float, a_s: float, s_s: float) -> tuple[float, float]:
    """(mean scale ``a_ts``, variance ``v_ts``) of ``q(x_t | x_s)`` for the times t > s with these alpha, sigma."""
    a_ts = a_t / a_s
    return a_ts, s_t**2 - a_ts**2 * s_s**2


def ddpm_step(
    x: Tensor,
    x0: Tensor,
    a_t: float,
    s_t: float,
    a_s: float,
    s_s: float,
    *,
    variance: str | Tensor = "small",
    noise: NoiseSource = None,
) -> Tensor:
    """One ancestral step from ``x`` at time t to time s < t, sampling the posterior ``q(x_s | x_t, x0)``.

    Args:
        x, x0: the current state and the denoiser's estimate of the clean data.
        a_t, s_t, a_s, s_s: alpha and sigma at t and at s (``s_s = 0``: the step lands on the mean, no noise).
        variance: "small" (posterior, beta tilde), "large" (forward, beta) or a tensor ``v`` shaped like ``x``
            with values in [0, 1], the learned ``exp(v log beta + (1 - v) log beta_tilde)`` of iDDPM.
        noise: per-sample ``Seeds``, a Generator, or None for the global RNG; one draw per step.
    """
    a_ts, v_ts = forward_transition(a_t, s_t, a_s, s_s)
    mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * v_ts / s_t**2) * x0
    if s_s <= 0:
        return mean
    small = v_ts * s_s**2 / s_t**2
    if isinstance(variance, Tensor):
        v = variance.float()
        log_var = v * math.log(v_ts) + (1 - v) * math.log(small)
        return mean + torch.exp(0.5 * log_var) * randn_like(x, noise)
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small', 'large' or a tensor of learned v, got {variance!r}")
    var = small if variance == "small" else v_ts
    return mean + math.sqrt(max(var, 0.0)) * randn_like(x, noise)
