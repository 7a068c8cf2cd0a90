"""RePaint (Lugmayr et al. 2022): inpainting with any sampler of an ordinary diffusion model, no retraining.

After every step of an ordinary sampler the known region is pasted back, noised to the new time with the path's
own ``add_noise``; then the step is undone by sampling the forward transition ``q(x_t | x_s)`` (``ddpm``'s
``forward_transition``) and redone, ``resample - 1`` times, so the generated region can harmonise with the pasted
one. The last step lands on t = 0 and pastes the clean known region, so it comes back exactly.

Any registered sampler can take the steps; each is run for one grid interval at a time, so multistep solvers act
as their first-order selves. With ``sample_ddpm`` every step is the DDPM posterior of ``ddpm.ddpm_step``, learned
variance included (``step_args={"variance": "learned"}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from t2i.nn.noise import NoiseSource, randn_like

from .ddpm import forward_transition
from .parameterization import DenoiseFn
from .paths import NoisePath
from .samplers import sample_ddpm


@torch.no_grad()
def sample_repaint(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    *,
    known: Tensor,
    mask: Tensor,
    resample: int = 5,
    step: Callable[..., Tensor] = sample_ddpm,
    step_args: dict | None = None,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    noise: NoiseSource = None,
    paste_noise: NoiseSource | Tensor = None,
    progress: bool = False,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1): sample ``x`` from ``ts[0]`` to ``ts[-1]`` keeping ``known`` where
    ``mask`` is 1.

    Args:
        denoise, x, ts, path, extra_args: as for every sampler (``x`` is the start at ``ts[0]``).
        known: the clean data of the known region, shaped like ``x`` (in the space the sampler works in).
        mask: 1 where ``known`` is kept, 0 where it is generated; broadcastable against ``x``.
        resample: passes per step (1 is plain pasting, the paper uses 10 for its best results).
        step: the sampler that takes each single step (a ``sample_*`` function); ``step_args`` its options.
        callback: called once per step with the step sampler's dict, ``"i"`` the step's index on ``ts``.
        noise: the step sampler's noise; ``paste_noise``: the noise that re-noises the known region and the
            jumps back. Per-sample ``Seeds``, a Generator, or None for the global RNG; or a tensor shaped like
            ``x``: the same noise at every step (the starting noise, as diffusers' and A1111's latent inpainting
            use it), which allows no resampling.
    """
    if resample < 1:
        raise ValueError(f"resample must be at least 1, got {resample}")
    fixed = paste_noise if isinstance(paste_noise, Tensor) else None
    if fixed is not None and resample > 1:
        raise ValueError("a fixed paste_noise tensor cannot drive RePaint's jumps back; use resample=1 or Seeds")
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    extra_args, step_args = extra_args or {}, step_args or {}
    known, mask = known.to(x.device).float(), mask.to(x.device).float()
    for i in trange(len(ts) - 1, disable=not progress, desc="repaint", leave=False):
        t, t_next = float(ts[i]), float(ts[i + 1])
        for r in range(resample):
            report = None if callback is None or r > 0 else (lambda d, i=i: callback({**d, "i": i}))
            x_next = step(
                denoise, x, ts[i : i + 2], path, extra_args=extra_args, noise=noise, callback=report, **step_args
            )
            if t_next > 0:
                t_vec = ts[i + 1].expand(len(x)).to(x.device)
                eps = fixed.to(known) if fixed is not None else randn_like(known, paste_noise)
                known_next = path.add_noise(known, eps, t_vec)
            else:
                known_next = known
            x_next = mask * known_next + (1 - mask) * x_next
            if r == resample - 1 or t_next == 0:
                break
            # jump back to t: x_t ~ q(x_t | x_{t_next})
            scale, var = forward_transition(
                float(path.alpha(t)), float(path.sigma(t)), float(path.alpha(t_next)), float(path.sigma(t_next))
            )
            x = scale * x_next + math.sqrt(max(var, 0.0)) * randn_like(x_next, paste_noise)
        x = x_next
    return x
