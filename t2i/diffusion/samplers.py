"""Samplers: pure functions over the x0-denoiser contract, valid on every noise path.

Every sampler has the signature ``sample_*(denoise, x, ts, path, *, extra_args, callback, noise, progress)``
(k-diffusion's, with the path passed explicitly): ``x`` is the starting state at time ``ts[0]``, ``ts`` a
descending grid (usually ``path.timesteps(n)``, ending at 0 for a clean sample), ``denoise(x, t, **extra_args)``
returns x0_hat. They are written against ``alpha(t), sigma(t)`` (as diffusers' DPM-Solver is), never against
VE sigmas, because sigma/alpha is infinite at the start of a flow path.

Two coordinate systems appear:
- exponential integrators (DDIM, DDPM, DPM-Solver++) work in ``x`` with ``lambda = log(alpha/sigma)``;
- Euler-type solvers work in rectified-flow coordinates ``y = x/(alpha+sigma)``, ``s = sigma/(alpha+sigma)``,
  in which every path is ``y = (1-s) x0 + s eps`` and the probability-flow ODE is ``dy/ds = (y - x0_hat)/s``.
  On rectified flow this is the plain ``x + dt v`` step; on a VP path first-order Euler equals DDIM(eta=0).

Stochastic samplers draw one ``randn_like`` per step from ``noise`` (per-sample ``Seeds``, a Generator, or the
global RNG), and none on a final step to sigma=0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import trange

from t2i.errors import check_choice
from t2i.nn.noise import NoiseSource, randn_like

from .ddpm import DDPM_VARIANCES, ddpm_step
from .parameterization import DenoiseFn, split_variance
from .paths import NoisePath


class _Grid:
    """The sampling grid with alpha/sigma per point as Python floats (float64 math, no host syncs per step)."""

    def __init__(self, ts: Tensor, path: NoisePath):
        ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
        if ts.ndim != 1 or len(ts) < 2:
            raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
        if (ts[1:] > ts[:-1]).any() or ts.min() < 0 or ts.max() > 1:
            raise ValueError("ts must be non-increasing and lie in [0, 1]; build it with path.timesteps(steps)")
        self.ts = ts
        # t = 0 means clean data on every path; pin it so solvers take their exact final step there
        self.alphas = torch.where(ts == 0, 1.0, path.alpha(ts)).tolist()
        self.sigmas = torch.where(ts == 0, 0.0, path.sigma(ts)).tolist()
        self.n = len(ts) - 1

    def t(self, i: int, x: Tensor) -> Tensor:
        return self.ts[i].to(x.device).expand(x.shape[0])

    def flow_coords(self, i: int) -> tuple[float, float]:
        """(scale, s): y = x / scale and the flow time s = sigma / (alpha + sigma)."""
        scale = self.alphas[i] + self.sigmas[i]
        return scale, self.sigmas[i] / scale


def _exp_neg_h(a: float, s: float, a_next: float, s_next: float) -> float:
    """exp(-h) with h = lambda_next - lambda = log(alpha_next sigma / (sigma_next alpha)); 0 when alpha = 0."""
    return (a * s_next) / (s * a_next)


def _second_order(x0: Tensor, old_x0: Tensor, r: float) -> Tensor:
    """DPM-Solver++(2M)'s multistep estimate from the last two denoised values; ``r = h_last / h``."""
    return (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0


def _steps(grid: _Grid, progress: bool, desc: str):
    return trange(grid.n, disable=not progress, desc=desc, leave=False)


def _call(callback, x, i, grid, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "t": float(grid.ts[i]), "denoised": denoised})


# -- exponential integrators -----------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    eta: float = 0.0,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) on any path; eta=0 is deterministic, eta=1 is DDPM's posterior."""
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    for i in _steps(grid, progress, "ddim"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        a, s, a_n, s_n = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        eps = (x - a * x0) / s
        if eta > 0 and s_n > 0:
            # std of the generalised DDPM posterior, eta * sigma_n * sqrt(1 - exp(-2h)), capped at sigma_n
            std = min(eta * s_n * math.sqrt(max(0.0, 1 - _exp_neg_h(a, s, a_n, s_n) ** 2)), s_n)
            x = a_n * x0 + math.sqrt(s_n**2 - std**2) * eps + std * randn_like(x, noise)
        else:
            x = a_n * x0 + s_n * eps
    return x


@torch.no_grad()
def sample_ddpm(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    variance: str = "small",
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """DDPM ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Eqs. 6-7), any grid.

    ``variance="small"`` uses the posterior variance (beta tilde), ``"large"`` the forward-step variance (beta),
    ``"learned"`` the network's own interpolation between the two (Nichol & Dhariwal 2021, Eq. 15): the denoiser
    is then called with ``return_variance=True`` and returns ``(x0_hat, v)``. The step is ``ddpm.ddpm_step``.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}")
    grid, extra_args = _Grid(ts, path), extra_args or {}
    ask = {"return_variance": True} if variance == "learned" else {}
    x = x.float()
    for i in _steps(grid, progress, "ddpm"):
        x0, v = split_variance(denoise(x, grid.t(i, x), **ask, **extra_args))
        if ask and v is None:
            raise ValueError(
                "variance='learned' needs a denoiser of a learned-variance network: called with "
                "return_variance=True it must return (x0_hat, v); use 'small' or 'large' otherwise"
            )
        _call(callback, x, i, grid, x0)
        a_t, s_t, a_s, s_s = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        x = ddpm_step(x, x0, a_t, s_t, a_s, s_s, variance=variance if v is None else v, noise=noise)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in lambda, data prediction."""
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    old_x0, h_last = None, None
    for i in _steps(grid, progress, "dpmpp_2m"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        a, s, a_n, s_n = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        if s_n == 0:
            x = a_n * x0  # a final step to clean data is first order (lower_order_final)
            continue
        e = _exp_neg_h(a, s, a_n, s_n)
        h = -math.log(e) if e > 0 else math.inf
        d = x0
        if old_x0 is not None and math.isfinite(h_last) and math.isfinite(h):
            d = _second_order(x0, old_x0, h_last / h)
        x = (s_n / s) * x + a_n * (1 - e) * d
        old_x0, h_last = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_ve(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) in the variance-exploding form, ``lambda = -log sigma``, with no alpha term.

    This is the update the official sd3.5 reference applies to its flow models (k-diffusion's sampler on the flow
    sigmas): ``x <- (sigma'/sigma) x + (1 - sigma'/sigma) D``, D the 2M-corrected denoised estimate. On a flow path
    it is not the probability-flow solver of ``dpmpp_2m`` (which uses ``lambda = log(alpha/sigma)``; they differ by
    0.23 relative at 8 steps), but it reproduces the reference's images; the ``sd3.5-large-ref`` preset uses it.
    """
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    old_x0, h_last = None, None
    for i in _steps(grid, progress, "dpmpp_2m_ve"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        s, s_n = grid.sigmas[i], grid.sigmas[i + 1]
        if s_n == 0:
            x = x0  # lambda = inf: the step lands on the denoised estimate
            continue
        h = math.log(s / s_n)
        d = x0 if old_x0 is None else _second_order(x0, old_x0, h_last / h)
        x = (s_n / s) * x + (1 - s_n / s) * d
        old_x0, h_last = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    eta: float = 1.0,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, Sec. 5; midpoint variant): stochastic, second order in lambda."""
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    old_x0, h_last = None, None
    for i in _steps(grid, progress, "dpmpp_2m_sde"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        a, s, a_n, s_n = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        if s_n == 0:
            x = a_n * x0
            continue
        e = _exp_neg_h(a, s, a_n, s_n)  # exp(-h)
        h = -math.log(e) if e > 0 else math.inf
        e_eta = e**eta  # exp(-eta h)
        x = (s_n / s) * e_eta * x + a_n * (1 - e * e_eta) * x0
        if old_x0 is not None and math.isfinite(h_last) and math.isfinite(h):
            r = h_last / h
            x = x + a_n * 0.5 * (1 - e * e_eta) / r * (x0 - old_x0)
        if eta > 0:
            x = x + s_n * math.sqrt(max(0.0, 1 - e_eta**2)) * randn_like(x, noise)
        old_x0, h_last = x0, h
    return x


# -- Euler-type solvers in rectified-flow coordinates -----------------------------------------------------------


@torch.no_grad()
def sample_euler(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE dy/ds = (y - x0_hat)/s (Karras et al. 2022, Alg. 1, 1st order)."""
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    for i in _steps(grid, progress, "euler"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        (scale, s), (scale_n, s_n) = grid.flow_coords(i), grid.flow_coords(i + 1)
        y = x / scale
        y = y + (s_n - s) * (y - x0) / s
        x = y * scale_n
    return x


@torch.no_grad()
def sample_heun(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1) in flow coordinates; Euler on a final step to 0."""
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    for i in _steps(grid, progress, "heun"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        (scale, s), (scale_n, s_n) = grid.flow_coords(i), grid.flow_coords(i + 1)
        y = x / scale
        d = (y - x0) / s
        y_next = y + (s_n - s) * d
        if s_n > 0:
            x0_next = denoise(y_next * scale_n, grid.t(i + 1, x), **extra_args)
            d_next = (y_next - x0_next) / s_n
            y_next = y + (s_n - s) * 0.5 * (d + d_next)
        x = y_next * scale_n
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    eta: float = 1.0,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral (k-diffusion): an Euler step down to s_down, then fresh noise back up to s_next.

    In flow coordinates renoising from s_down to s_next is ``y <- y (1-s_next)/(1-s_down) + std z``. The split
    follows the DDPM posterior scaled by eta, so eta=1 gives the same distribution as DDPM and DDIM(eta=1).
    """
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    for i in _steps(grid, progress, "euler_ancestral"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        a, sg, a_n, sg_n = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        (scale, s), (scale_n, s_n) = grid.flow_coords(i), grid.flow_coords(i + 1)
        y = x / scale
        if sg_n == 0 or eta == 0:
            x = (y + (s_n - s) * (y - x0) / s) * scale_n
            continue
        # noise std added in x-space, then the deterministic part's noise level exp(-lambda_down) = sigma/alpha
        std = min(eta * sg_n * math.sqrt(max(0.0, 1 - _exp_neg_h(a, sg, a_n, sg_n) ** 2)), sg_n)
        ratio_down = math.sqrt(sg_n**2 - std**2) / a_n
        s_down = ratio_down / (1 + ratio_down)
        y_down = y + (s_down - s) * (y - x0) / s
        renoise = (1 - s_n) / (1 - s_down)
        y_std = math.sqrt(max(0.0, s_n**2 - (renoise * s_down) ** 2))
        x = (renoise * y_down + y_std * randn_like(x, noise)) * scale_n
    return x


@torch.no_grad()
def sample_consistency(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    progress: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM): jump to x0, re-noise with fresh noise to the
    next time, repeat. Made for few-step students whose denoiser maps any x_t straight to the end of its ODE path;
    one denoiser call per step."""
    grid, extra_args = _Grid(ts, path), extra_args or {}
    x = x.float()
    for i in _steps(grid, progress, "consistency"):
        x0 = denoise(x, grid.t(i, x), **extra_args)
        _call(callback, x, i, grid, x0)
        a_n, s_n = grid.alphas[i + 1], grid.sigmas[i + 1]
        x = a_n * x0 + s_n * randn_like(x, noise) if s_n > 0 else x0
    return x


# -- registry ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable[..., Tensor]
    stochastic: bool
    order: int  # order of accuracy of the deterministic solver (for stochastic ones, of their ODE limit)
    description: str

    def nfe(self, ts: Tensor) -> int:
        """Denoiser calls the sampler makes on grid ``ts``."""
        n = len(ts) - 1
        if self.fn is sample_heun:
            return 2 * n - int(float(ts[-1]) == 0.0)
        return n


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, True, 1, "DDPM ancestral sampling (Ho et al. 2020)"),
    "ddim": SamplerInfo(sample_ddim, False, 1, "DDIM, eta=0 deterministic (Song et al. 2021)"),
    "euler": SamplerInfo(sample_euler, False, 1, "Euler on the probability-flow ODE (= x + dt v on flows)"),
    "euler_ancestral": SamplerInfo(sample_euler_ancestral, True, 1, "Euler ancestral (k-diffusion)"),
    "heun": SamplerInfo(sample_heun, False, 2, "Heun 2nd order (Karras et al. 2022); 2 calls per step"),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, False, 2, "DPM-Solver++(2M) (Lu et al. 2022)"),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, True, 2, "DPM-Solver++(2M) SDE (Lu et al. 2022)"),
    "dpmpp_2m_ve": SamplerInfo(
        sample_dpmpp_2m_ve, False, 2, "DPM-Solver++(2M) in VE form, as the sd3.5 reference applies it to flow models"
    ),
    "consistency": SamplerInfo(sample_consistency, True, 1, "multistep consistency sampling, for distilled students"),
}


def check_sampler(name: str, what: str = "sampler") -> str:
    """``name`` if a sampler is registered under it, else an error naming the nearest one and listing them all."""
    check_choice(what, name, SAMPLERS)
    return name


def check_sampling_setting(key: str, value, what: str | None = None):
    """``value`` if it is a valid sampling setting ``key``: ``steps`` or ``candidates`` a whole number >= 1,
    ``guidance`` a finite number >= 0, ``sampler`` a registered sampler's name. Otherwise a ValueError that calls the
    setting ``what`` (default: ``key``), so each front end names it as its user wrote it (a field, a CLI flag)."""
    what = what or key
    if key in ("steps", "candidates"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    elif key == "guidance":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} must be a finite number >= 0 (1 disables it), got {value!r}")
    elif key == "sampler":
        check_sampler(value, what)
    else:
        raise ValueError(f"{key!r} is not a sampling setting (steps, candidates, guidance, sampler)")
    return value


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered as ``name``, with an error listing the valid names."""
    return SAMPLERS[check_sampler(name)].fn


def sample(name: str, denoise: DenoiseFn, x: Tensor, ts: Tensor, path: NoisePath, **kwargs) -> Tensor:
    """Run the sampler registered as ``name``."""
    return get_sampler(name)(denoise, x, ts, path, **kwargs)
