"""Closed-form denoisers for Gaussian-mixture data, the ground truth for testing and benchmarking samplers.

For data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) and x_t = alpha x0 + sigma eps, the posterior mean E[x0 | x_t] is
exact: component responsibilities from N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2), then per component
mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k). For a single Gaussian the probability-flow
ODE is linear and its exact solution is known too, which lets tests measure a solver's order of accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .paths import NoisePath


class GaussianMixture:
    """Diagonal Gaussian mixture in D dimensions with exact denoiser, sampler and PF-ODE (for K=1).

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K, D]`` or ``[K]`` per-component standard deviations.
        weights: ``[K]`` mixture weights (normalised here); uniform if omitted.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(self.means.shape)}")
        k, d = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds[:, None].expand(k, d).clone() if stds.ndim == 1 else stds
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples, float64 ``[n, D]``."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp] * z

    def component_of(self, x: Tensor) -> Tensor:
        """Most likely component of each clean sample ``[n, D] -> [n]``."""
        ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
        return self._log_resp(x.double().cpu(), ones, torch.zeros_like(ones))[0].argmax(1)

    def _log_resp(self, x: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        # x [B, D]; a, s [B, 1]  ->  log responsibilities [B, K] and per-component variances [B, K, D]
        var = a[:, :, None] ** 2 * self.stds[None] ** 2 + s[:, :, None] ** 2
        diff = x[:, None, :] - a[:, :, None] * self.means[None]
        log_p = -0.5 * ((diff**2) / var + torch.log(var)).sum(-1) + torch.log(self.weights)[None]
        return torch.log_softmax(log_p, dim=1), var

    def _posterior_mean(self, x: Tensor, a: float, s: float) -> Tensor:
        # all samples at one time: expand the Gaussian log-densities into matmuls, no [B, K, D] temporaries
        var = a**2 * self.stds**2 + s**2  # (K, D)
        inv = 1.0 / var
        log_p = (
            -0.5 * (x**2) @ inv.T
            + a * x @ (self.means * inv).T
            - 0.5 * (a**2 * self.means**2 * inv + torch.log(var)).sum(1)
            + torch.log(self.weights)
        )  # (B, K)
        r = torch.softmax(log_p, dim=1)
        gain = a * self.stds**2 * inv  # (K, D): E[x0 | x_t, k] = mu_k + gain_k (x - a mu_k)
        return r @ (self.means * (1 - a * gain)) + x * (r @ gain)

    def denoiser(self, path: NoisePath):
        """The exact x0-denoiser ``E[x0 | x_t]`` on ``path``; accepts ``[B, D]`` inputs and ``[B]`` times."""

        def denoise(x: Tensor, t: Tensor, **_) -> Tensor:
            t = torch.as_tensor(t, dtype=torch.float64).cpu()
            if t.ndim == 0:
                t = t.expand(x.shape[0])
            xd = x.detach().double().cpu()
            out = torch.empty_like(xd)
            for tv in torch.unique(t):  # samplers pass one time per batch; guidance may pass two
                sel = t == tv
                out[sel] = self._posterior_mean(xd[sel], float(path.alpha(tv)), float(path.sigma(tv)))
            return out.to(device=x.device, dtype=torch.float32)

        return denoise

    def ode_solution(self, x: Tensor, t_from: float, t_to: float, path: NoisePath) -> Tensor:
        """Exact probability-flow ODE transport of ``x`` from ``t_from`` to ``t_to`` (single Gaussian only)."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form ODE solution exists only for a single Gaussian (K=1)")
        mu, sd = self.means[0], self.stds[0]
        a0, s0 = path.alpha(t_from), path.sigma(t_from)
        a1, s1 = path.alpha(t_to), path.sigma(t_to)
        sd0 = torch.sqrt(a0**2 * sd**2 + s0**2)
        sd1 = torch.sqrt(a1**2 * sd**2 + s1**2)
        return (a1 * mu + (x.double() - a0 * mu) * sd1 / sd0).float()
