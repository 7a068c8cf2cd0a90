"""Guidance as wrappers: each takes an x0-denoiser and returns one, so they compose and samplers stay unaware.

- classifier-free guidance (Ho & Salimans 2022) with cond and uncond in one batched forward pass, optional
  guidance rescale (Lin et al. 2024, Sec. 3.4), a guidance interval (Kynkaanniemi et al. 2024) and skip-layer
  guidance (SD3.5): an extra conditional pass with some layers skipped, ``+ slg_scale (x0_cond - x0_skip)``;
  the network decides what skipping a layer means, it only receives ``skip_layers=...``;
- static and dynamic thresholding of x0 (Saharia et al. 2022, Imagen).

All guidance works on the x0 prediction. On the linear combinations used here that is the same as guiding
eps, v or the flow velocity, because each is affine in x0 with the same coefficients for both branches.
A learned variance (``return_variance=True``, see ``parameterization``) passes through every wrapper; guidance
keeps the conditional branch's, as the guided mean is a correction of the conditional model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .parameterization import DenoiseFn, join_variance, split_variance
from .paths import append_dims


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SD3.5's skip-layer guidance: ``scale`` times (cond - cond with ``layers`` skipped), for t in ``interval``.

    The sd3.5 reference states its interval as a fraction of the steps (0.01-0.2); ``step_interval_to_time``
    converts that to times on a given grid.
    """

    scale: float = 2.5
    layers: tuple[int, ...] = (7, 8, 9)
    interval: tuple[float, float] = (0.0, 1.0)


def step_interval_to_time(ts: Tensor, start: float, end: float) -> tuple[float, float]:
    """Times of the steps ``i`` with ``start*n < i < end*n`` on grid ``ts`` (n steps), as a (low, high) interval.

    This reproduces the step-fraction windows of the sd3.5 reference and diffusers. An empty window gives (2, 2),
    which no time reaches.
    """
    n = len(ts) - 1
    chosen = [float(ts[i]) for i in range(n) if start * n < i < end * n]
    if not chosen:
        return (2.0, 2.0)
    return (min(chosen), max(chosen))


def check_guidance_interval(interval, name: str = "guidance_interval") -> tuple[float, float]:
    """``interval`` as a (low, high) pair of noise levels (path times, 1 = pure noise) with 0 <= low < high <= 1,
    else a ValueError naming the setting (``name``): the guidance intervals of samplers and distillation teachers,
    and a distillation teacher's skip-layer guidance window."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two noise levels [low, high] in [0, 1], got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= low < high <= 1 (1 = pure noise), got {interval!r}")
    return lo, hi


def _in_interval(t: Tensor, interval: tuple[float, float] | None) -> Tensor:
    if interval is None:
        return torch.ones_like(t, dtype=torch.bool)
    lo, hi = interval
    return (t >= lo) & (t <= hi)


def _cat_cond(cond: dict, uncond: dict) -> dict:
    missing = set(uncond) - set(cond)
    if missing:
        raise ValueError(f"uncond has keys {sorted(missing)} that the conditional inputs lack")
    out = {}
    for k, v in cond.items():
        if k in uncond:
            u = uncond[k]
            if not (isinstance(v, Tensor) and isinstance(u, Tensor)):
                raise ValueError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors to batch them")
            if u.shape[0] != v.shape[0]:
                if u.shape[0] != 1:
                    raise ValueError(f"uncond[{k!r}] has batch {u.shape[0]}; expected {v.shape[0]} or 1")
                u = u.expand(v.shape[0], *u.shape[1:])
            out[k] = torch.cat([v, u.to(v)])
        elif isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] > 0:
            out[k] = torch.cat([v, v])  # shared between branches (e.g. a low-res image), duplicated for batching
        else:
            out[k] = v
    return out


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, Alg. 2): match the guided per-sample std to the conditional one."""
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided * ratio + (1 - phi) * guided


def classifier_free_guidance(
    denoise: DenoiseFn,
    scale: float,
    uncond: dict,
    *,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    skip_layers: SkipLayerGuidance | None = None,
) -> DenoiseFn:
    """Classifier-free guidance: ``x0_u + scale (x0_c - x0_u)``, cond and uncond in one forward pass.

    Args:
        denoise: the x0-denoiser.
        scale: guidance scale w; 1 returns ``denoise`` itself (no extra compute) unless SLG is on.
        uncond: the unconditional inputs, e.g. ``{"context": null_ctx}``, replacing the same-named conditional
            ones; tensors given in cond only are shared by both branches. Batch 1 broadcasts.
        rescale: phi of guidance rescale, 0 to disable.
        interval: guide only for t in [low, high]; elsewhere the conditional prediction is used (and no
            unconditional pass is run when no sample of the batch is inside it).
        skip_layers: optional skip-layer guidance.
    """
    if scale == 1.0 and skip_layers is None:
        return denoise
    if rescale < 0 or rescale > 1:
        raise ValueError(f"guidance rescale phi must lie in [0, 1], got {rescale}")

    def guided(x: Tensor, t: Tensor, **cond) -> Tensor | tuple[Tensor, Tensor]:
        active = _in_interval(t, interval)
        if scale == 1.0 or not bool(active.any()):
            out, var = split_variance(denoise(x, t, **cond))
            x0_c = out
        else:
            both, var = split_variance(denoise(torch.cat([x, x]), torch.cat([t, t]), **_cat_cond(cond, uncond)))
            x0_c, x0_u = both.chunk(2)
            var = None if var is None else var[: len(x)]  # the conditional branch's learned variance
            out = x0_u + scale * (x0_c - x0_u)
            if rescale > 0:
                out = rescale_guidance(out, x0_c, rescale)
            out = torch.where(append_dims(active, x.ndim), out, x0_c)
        if skip_layers is not None and skip_layers.scale != 0:
            slg_active = _in_interval(t, skip_layers.interval)
            if bool(slg_active.any()):
                x0_skip = split_variance(denoise(x, t, skip_layers=tuple(skip_layers.layers), **cond))[0]
                out = out + append_dims(slg_active, x.ndim) * skip_layers.scale * (x0_c - x0_skip)
        return join_variance(out, var)

    return guided


def static_threshold(denoise: DenoiseFn, max_value: float = 1.0) -> DenoiseFn:
    """Imagen's static thresholding: clamp x0 to [-max_value, max_value], the data range of a pixel-space model."""

    def clamped(x: Tensor, t: Tensor, **cond) -> Tensor | tuple[Tensor, Tensor]:
        x0, var = split_variance(denoise(x, t, **cond))
        return join_variance(x0.clamp(-max_value, max_value), var)

    return clamped


def dynamic_threshold(denoise: DenoiseFn, percentile: float = 0.995, max_value: float = 1.0) -> DenoiseFn:
    """Imagen's dynamic thresholding: clip x0 to the per-sample ``percentile`` of |x0| (at least ``max_value``),
    then divide by it, so saturated pixels are pushed inward instead of clipped flat."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must lie in (0, 1], got {percentile}")

    def thresholded(x: Tensor, t: Tensor, **cond) -> Tensor | tuple[Tensor, Tensor]:
        x0, var = split_variance(denoise(x, t, **cond))
        s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp_min(max_value)
        s = append_dims(s, x0.ndim).to(x0)
        return join_variance(x0.clamp(-s, s) / s * max_value, var)

    return thresholded
