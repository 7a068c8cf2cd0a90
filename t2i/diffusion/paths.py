"""Noise paths: how a noisy x_t is formed from data x0 and Gaussian noise eps.

Every path here is ``x_t = alpha(t) * x0 + sigma(t) * eps`` with time ``t`` running from 0 (clean data,
``alpha=1, sigma=0``) to 1 (noise). Samplers and objectives only ever ask a path for ``alpha(t)``, ``sigma(t)``
and a step grid, so one sampler serves both the variance-preserving paths of DDPM/unCLIP (Ho et al. 2020,
Nichol & Dhariwal 2021) and the rectified flow of SD3 (Liu et al. 2022; Esser et al. 2024).

What the network sees as its timestep input is a separate question (``model_time``): a discrete VP model is
conditioned on its integer step index, an SD3 model on ``1000 * t``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from t2i.errors import check_choice, unknown_choice

VP_SCHEDULES = ("linear", "cosine", "sigmoid")
VP_SPACINGS = ("trailing", "leading", "linspace")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample ``[B]`` tensor broadcasts against a ``[B, ...]`` one."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of rank {x.ndim} to rank {ndim}")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def _as_time(t: Tensor | float) -> Tensor:
    # Schedule math is done in float64: alpha and sigma near t=0 and t=1 lose digits in float32.
    return torch.as_tensor(t, dtype=torch.float64)


class NoisePath(ABC):
    """``x_t = alpha(t) x0 + sigma(t) eps`` for t in [0, 1]; alpha(0)=1, sigma(0)=0."""

    #: scale from path time to the network's timestep input (``model_time``)
    time_scale: float = 1000.0

    @abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def timesteps(self, steps: int, **kwargs) -> Tensor:
        """A descending float64 grid of ``steps + 1`` times from the start of sampling down to 0."""

    def model_time(self, t: Tensor) -> Tensor:
        """The timestep value the network is conditioned on."""
        return t * self.time_scale

    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda(t) = log(alpha / sigma), the half log signal-to-noise ratio (Lu et al. 2022)."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def quantize(self, t: Tensor) -> Tensor:
        """Snap training times onto the times the network was trained at (identity for continuous paths)."""
        return t

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t for per-sample times ``t`` of shape ``[B]`` (or a scalar)."""
        t = _as_time(t).to(x0.device)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        a = append_dims(self.alpha(t), x0.ndim).to(x0.dtype)
        s = append_dims(self.sigma(t), x0.ndim).to(x0.dtype)
        return a * x0 + s * eps


class VPPath(NoisePath):
    """Variance-preserving path, alpha^2 + sigma^2 = 1, with linear, cosine or sigmoid noise schedules.

    With ``num_train_timesteps=T`` the path is the discrete DDPM chain: its betas are clipped to ``max_beta`` so
    any T (10 included) gives a valid chain, the network sees the 0-based step index ``t*T - 1``, and times between
    lattice points interpolate log(alpha_bar) linearly. With ``num_train_timesteps=None`` it is the continuous-time
    path (Song et al. 2021; Kingma et al. 2021), log-SNR clipped at -20 so that alpha never reaches exactly 0.

    Args:
        schedule: "linear" (Ho et al. 2020), "cosine" (Nichol & Dhariwal 2021) or "sigmoid" (Jabri et al. 2022).
        num_train_timesteps: T for a discrete chain, or None for continuous time.
        beta_start, beta_end: linear schedule endpoints, for T=1000 (rescaled by 1000/T for other T).
        cosine_s: offset of the cosine schedule.
        sigmoid_start, sigmoid_end, sigmoid_tau: the sigmoid schedule's range and temperature.
        max_beta: clip for discrete betas.
    """

    def __init__(
        self,
        schedule: str = "linear",
        num_train_timesteps: int | None = 1000,
        *,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
        max_beta: float = 0.999,
        min_log_snr: float = -20.0,
    ):
        check_choice("VP schedule", schedule, VP_SCHEDULES)
        if num_train_timesteps is not None and num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1 or None, got {num_train_timesteps}")
        if not 0.0 < max_beta < 1.0:
            raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
        self.schedule = schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.cosine_s = cosine_s
        self.sigmoid_start, self.sigmoid_end, self.sigmoid_tau = sigmoid_start, sigmoid_end, sigmoid_tau
        self.max_beta = max_beta
        self.min_log_snr = min_log_snr
        if num_train_timesteps is not None:
            self.betas = self._discrete_betas(num_train_timesteps)
            log_ab = torch.cumsum(torch.log1p(-self.betas), 0)
            # lattice t_k = k/T (k = 0..T) and log alpha_bar there; k = 0 is clean data
            self._log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab])

    def __repr__(self) -> str:
        return f"VPPath(schedule={self.schedule!r}, num_train_timesteps={self.num_train_timesteps})"

    # -- schedules ------------------------------------------------------------------------------------------------

    def _continuous_log_alpha_bar(self, t: Tensor) -> Tensor:
        if self.schedule == "linear":
            # VP-SDE with beta(t) linear from 1000*beta_start to 1000*beta_end (Song et al. 2021, Eq. 33)
            b0, b1 = 1000 * self.beta_start, 1000 * self.beta_end
            return -(b0 * t + 0.5 * (b1 - b0) * t**2)
        if self.schedule == "cosine":
            s = self.cosine_s
            f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            return torch.log(f.clamp_min(1e-300)) - 2 * math.log(math.cos(s / (1 + s) * math.pi / 2))
        v_start = torch.sigmoid(torch.tensor(self.sigmoid_start / self.sigmoid_tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(self.sigmoid_end / self.sigmoid_tau, dtype=torch.float64))
        u = torch.sigmoid((t * (self.sigmoid_end - self.sigmoid_start) + self.sigmoid_start) / self.sigmoid_tau)
        return torch.log(((v_end - u) / (v_end - v_start)).clamp_min(1e-300))

    def _discrete_betas(self, T: int) -> Tensor:
        if self.schedule == "linear":
            scale = 1000 / T  # keeps the total noise of the T=1000 schedule (Nichol & Dhariwal 2021)
            betas = torch.linspace(scale * self.beta_start, scale * self.beta_end, T, dtype=torch.float64)
        else:
            log_ab = self._continuous_log_alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T)
            betas = -torch.expm1(log_ab[1:] - log_ab[:-1])
        return betas.clamp(0.0, self.max_beta)

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar at step indices 0..T-1 (DDPM notation), for discrete paths."""
        if self.num_train_timesteps is None:
            raise ValueError("alphas_cumprod exists only for a discrete path (num_train_timesteps=T)")
        return self._log_alpha_bar[1:].exp()

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        if self.num_train_timesteps is None:
            # t = 0 is clean data exactly (rounding in the schedule formulas would leave sigma ~ 1e-9 there)
            log_ab = torch.where(t == 0, torch.zeros_like(t), self._continuous_log_alpha_bar(t))
            # clip the log-SNR from below: log_snr = log_ab - log(1 - ab) >= min_log_snr
            return torch.maximum(log_ab, -torch.nn.functional.softplus(torch.tensor(-self.min_log_snr)))
        T = self.num_train_timesteps
        pos = (t.clamp(0, 1) * T).to(torch.float64)
        lo = pos.floor().clamp(max=T - 1).long()
        w = pos - lo
        table = self._log_alpha_bar.to(t.device)
        return table[lo] * (1 - w) + table[lo + 1] * w

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def model_time(self, t: Tensor) -> Tensor:
        if self.num_train_timesteps is None:
            return t * self.time_scale
        return t * self.num_train_timesteps - 1  # 0-based DDPM step index

    def quantize(self, t: Tensor) -> Tensor:
        if self.num_train_timesteps is None:
            return t
        T = self.num_train_timesteps
        return (t * T).ceil().clamp(1, T) / T

    def timesteps(self, steps: int, *, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
        """Sampling grid of ``steps`` model evaluations, descending, plus a final 0.

        Discrete spacings follow Lin et al. (2024, Table 2): "trailing" always starts at the last training step
        (t=1), "leading" (plus ``steps_offset``, 1 in Stable Diffusion configs) and "linspace" are the older
        DDIM/PNDM conventions; all three equal diffusers' ``timestep_spacing`` of the same name. Continuous paths
        use a uniform grid.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        T = self.num_train_timesteps
        if T is None:
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if steps > T:
            raise ValueError(f"{steps} steps requested but this path has only {T} training steps; use steps <= {T}")
        if spacing == "trailing":
            k = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64))
        elif spacing == "leading":
            k = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0) + steps_offset + 1
        elif spacing == "linspace":
            k = torch.round(torch.linspace(0, T - 1, steps, dtype=torch.float64)).flip(0) + 1
        else:
            raise unknown_choice("spacing", spacing, VP_SPACINGS)
        return torch.cat([k / T, torch.zeros(1, dtype=torch.float64)])


class RectifiedFlow(NoisePath):
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2022), with SD3's timestep shift.

    The shift ``s·t / (1 + (s-1)·t)`` (Esser et al. 2024, Eq. 23) moves sampling steps toward high noise; SD3/3.5
    use s=3. With ``num_train_timesteps=T`` the grid is the one the sd3.5 reference and diffusers use: ``steps``
    points evenly spaced from 1 down to shift(1/T), each shifted, then 0. (Both references take the smallest
    *shifted* training sigma as the lower end and shift it again; the published SD3 sigmas depend on that.)
    """

    def __init__(self, shift: float = 1.0, num_train_timesteps: int | None = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps

    def __repr__(self) -> str:
        return f"RectifiedFlow(shift={self.shift}, num_train_timesteps={self.num_train_timesteps})"

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _as_time(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_time(t).clone()

    def shift_time(self, t: Tensor | float) -> Tensor:
        """SD3's timestep shift s·t / (1 + (s - 1)·t)."""
        t = _as_time(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timesteps(self, steps: int) -> Tensor:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.num_train_timesteps is None:
            u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
        else:
            u_min = float(self.shift_time(1.0 / self.num_train_timesteps))
            u = torch.linspace(1.0, u_min, steps, dtype=torch.float64)
        return torch.cat([self.shift_time(u), torch.zeros(1, dtype=torch.float64)])
