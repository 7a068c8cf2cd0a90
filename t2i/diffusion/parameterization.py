"""Parameterisations: wrappers that turn a raw network into an x0-denoiser ``denoise(x, t, **cond) -> x0_hat``.

Samplers only ever see that contract (Karras et al. 2022; k-diffusion's ``Denoiser``), so they never learn
whether the network predicts eps (Ho et al. 2020), v (Salimans & Ho 2022), x0 (the unCLIP prior) or the flow
velocity ``eps - x0`` (Liu et al. 2022; SD3). The conversion is done in float32 around the network, whatever
precision the network itself runs in (as EDM's preconditioner does).

``prediction_target`` and ``x0_from_prediction`` are the two halves of each parameterisation, shared by the
wrappers and the training objectives so that the two can never disagree.

A network that also learns its variance (iDDPM: ``net(x, t, return_variance=True) -> (prediction, v)``) is asked
for it by ``sample_ddpm(variance="learned")``: it calls ``denoise(x, t, return_variance=True, **cond)`` and gets
``(x0_hat, v)`` back. Every wrapper in the core passes that keyword down and the ``v`` back up unchanged (guidance
keeps the conditional branch's), transforming only x0_hat; ``split_variance`` is how they tell the two apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from t2i.errors import check_choice

from .paths import NoisePath, append_dims

PREDICTIONS = ("eps", "v", "x0", "flow")

#: the contract every sampler consumes: ``denoise(x, t, **cond) -> x0_hat`` with ``t`` of shape ``[B]``
DenoiseFn = Callable[..., Tensor]


def split_variance(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(x0_hat, learned v or None) of a denoiser's output, which is a pair only under ``return_variance=True``."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def join_variance(x0: Tensor, v: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """The inverse of ``split_variance``: what a wrapper returns after transforming x0_hat."""
    return x0 if v is None else (x0, v)


def _check_prediction(prediction: str) -> None:
    check_choice("prediction", prediction, PREDICTIONS)


def prediction_target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network of this parameterisation should output for ``x_t = alpha x0 + sigma eps``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0  # Salimans & Ho 2022, Eq. 4 (generalised beyond alpha^2 + sigma^2 = 1)
    return eps - x0  # flow velocity d x_t / dt on the path (1 - t) x0 + t eps


def x0_from_prediction(prediction: str, pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Invert ``prediction_target``: the x0 estimate implied by a network output at ``x_t = x``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return (x - sigma * pred) / alpha  # undefined where alpha = 0: eps-models cannot start from pure noise
    if prediction == "x0":
        return pred
    if prediction == "v":
        return (alpha * x - sigma * pred) / (alpha**2 + sigma**2)
    # x - sigma (eps - x0) = (alpha + sigma) x0 on any path; on rectified flow alpha + sigma = 1: x0 = x - t v
    return (x - sigma * pred) / (alpha + sigma)


class Denoiser(nn.Module):
    """Wrap ``net(x, model_time, **cond)`` predicting ``prediction`` into an x0-denoiser on ``path``.

    Args:
        net: the raw network; it receives ``x`` unchanged and ``path.model_time(t)`` as its timestep.
        path: the noise path the network was trained on.
        prediction: one of "eps", "v", "x0", "flow".
    """

    def __init__(self, net: nn.Module | Callable[..., Tensor], path: NoisePath, prediction: str):
        super().__init__()
        _check_prediction(prediction)
        self.net = net
        self.path = path
        self.prediction = prediction

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, path={self.path!r}"

    def coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t), sigma(t) as float32 tensors broadcastable against ``x``."""
        a = append_dims(self.path.alpha(t), x.ndim).to(device=x.device, dtype=torch.float32)
        s = append_dims(self.path.sigma(t), x.ndim).to(device=x.device, dtype=torch.float32)
        return a, s

    def forward(
        self, x: Tensor, t: Tensor, *, return_variance: bool = False, **cond
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x0_hat; with ``return_variance=True``, ``(x0_hat, v)`` from a network that learns its variance."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        model_t = self.path.model_time(t).to(device=x.device, dtype=torch.float32)
        ask = {"return_variance": True} if return_variance else {}
        pred, v = split_variance(self.net(x, model_t, **ask, **cond))
        a, s = self.coefficients(t, x)
        return join_variance(x0_from_prediction(self.prediction, pred.float(), x.float(), a, s), v)


class EpsDenoiser(Denoiser):
    """x0-denoiser for a network predicting the noise eps."""

    def __init__(self, net, path: NoisePath):
        super().__init__(net, path, "eps")


class VDenoiser(Denoiser):
    """x0-denoiser for a network predicting v = alpha eps - sigma x0."""

    def __init__(self, net, path: NoisePath):
        super().__init__(net, path, "v")


class X0Denoiser(Denoiser):
    """x0-denoiser for a network predicting x0 directly (e.g. the unCLIP prior)."""

    def __init__(self, net, path: NoisePath):
        super().__init__(net, path, "x0")


class FlowDenoiser(Denoiser):
    """x0-denoiser for a network predicting the flow velocity eps - x0 (SD3): x0 = x - t v on rectified flow."""

    def __init__(self, net, path: NoisePath):
        super().__init__(net, path, "flow")
