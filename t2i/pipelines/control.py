"""ControlNet controls for the SD3 pipeline: what one control is, when it acts, and how its image becomes latents.

A ``Control`` is a control image, its kind (canny / blur / depth / none, ``t2i.data.control``), a scale and a
window: the fraction of the sampling steps where it acts, ``start`` to ``end``. Step i of n acts when
``start <= i/n`` and ``(i+1)/n <= end``, diffusers' ``control_guidance_start/end`` rule; outside its window a
control adds nothing (its network does not even run). Several controls sum their residuals.

The window is handed to the network as an interval of model times, bounded half-way between grid points, so the
network needs no step counter and a sampler that evaluates between grid points still gets a defined answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from t2i.data.control import CONTROL_KINDS, ControlImageError, prepare_control_image, to_model_range
from t2i.models.controlnet import ActiveControl, ControlNet


@dataclass(frozen=True)
class Control:
    """One control of a generation.

    Args:
        image: a PIL image, a numpy array, or a ``(3, H, W)`` / ``(B, 3, H, W)`` tensor in [0, 1] (tensors are
            taken as already preprocessed); a list of PIL images gives one control image per generated image.
        kind: "canny", "blur", "depth" or "none" (``t2i.data.control``).
        scale: the strength of the residuals (1 as trained, 0 off).
        start, end: the fraction of the steps where the control acts.
        net: the ControlNet to use; None picks the pipeline's ControlNet for ``kind``.
    """

    image: Any
    kind: str = "canny"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    net: nn.Module | None = None

    def __post_init__(self):
        if self.kind not in CONTROL_KINDS:
            from t2i.errors import unknown_choice

            raise unknown_choice("control kind", self.kind, CONTROL_KINDS)
        if not (isinstance(self.scale, int | float) and abs(self.scale) < float("inf")):
            raise ControlImageError(f"the control scale must be a finite number, got {self.scale!r}")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ControlImageError(
                f"the control window must satisfy 0 <= start < end <= 1 (fractions of the steps), got "
                f"{self.start}:{self.end}"
            )


def active_steps(n: int, start: float, end: float) -> list[int]:
    """The steps of ``n`` where a control with window ``start..end`` acts (diffusers' rule)."""
    return [i for i in range(n) if not (i / n < start or (i + 1) / n > end)]


def window_interval(ts: Tensor, start: float, end: float, time_scale: float) -> tuple[float, float]:
    """The model-time interval ``[low, high]`` holding exactly the grid times of ``active_steps`` (an empty window
    gives an interval no time reaches)."""
    n = len(ts) - 1
    steps = active_steps(n, start, end)
    if not steps:
        return (float("inf"), float("inf"))
    first, last = steps[0], steps[-1]
    high = float("inf") if first == 0 else float(ts[first - 1] + ts[first]) / 2
    low = float(ts[last] + ts[last + 1]) / 2
    return (low * time_scale, high * time_scale)


def pick_controlnet(control: Control, controlnets: Sequence[ControlNet]) -> ControlNet:
    """``control.net``, else the one pipeline ControlNet made for ``control.kind`` (kind "none": the only one)."""
    if control.net is not None:
        return control.net
    if not controlnets:
        raise ValueError("a control needs a ControlNet: load one (t2i generate --controlnet PATH, or "
                         "SD3Pipeline(..., controlnets=[...])) or give Control(net=...)")  # fmt: skip
    matching = [n for n in controlnets if n.cfg.control_type == control.kind]
    if len(matching) == 1:
        return matching[0]
    if control.kind == "none" and len(controlnets) == 1:
        return controlnets[0]
    kinds = ", ".join(n.cfg.control_type for n in controlnets)
    if not matching:
        raise ValueError(f"no loaded ControlNet takes {control.kind!r} control images (loaded: {kinds}); load one "
                         "for that kind, or give the image preprocessed as kind 'none'")  # fmt: skip
    raise ValueError(f"several loaded ControlNets take {control.kind!r} images ({kinds}); pass Control(net=...)")


def control_images(control: Control, batch: int, height: int, width: int) -> Tensor:
    """The control's images in [0, 1], ``(batch, 3, H, W)`` (one image is shared by the batch)."""
    images = control.image if isinstance(control.image, list | tuple) else [control.image]
    if isinstance(control.image, Tensor) and control.image.ndim == 4:
        images = list(control.image.split(1))
    x = torch.cat([prepare_control_image(im, control.kind, height, width) for im in images])
    if x.shape[0] == 1:
        return x.expand(batch, -1, -1, -1)
    if x.shape[0] != batch:
        raise ControlImageError(f"{x.shape[0]} control images for {batch} generated images; give one or one each")
    return x


def encode_controls(controls: Sequence[Control], controlnets: Sequence[ControlNet], vae: nn.Module, batch: int,
                    height: int, width: int, noise, device) -> tuple[Tensor, list[ControlNet]]:  # fmt: skip
    """``(B, K, C, h, w)`` MMDiT-space latents of K controls (each image in its ControlNet's input range, encoded
    by posterior sampling as the reference does) and the ControlNet of each."""
    if vae is None:
        raise ValueError("controls need the pipeline's VAE to encode their images")
    nets, latents = [], []
    for control in controls:
        net = pick_controlnet(control, controlnets)
        x = to_model_range(control_images(control, batch, height, width), net.cfg.control_type, net.cfg.input_range)
        latents.append(vae.latent_format.process_in(vae.encode(x.to(device), noise=noise)))
        nets.append(net)
    return torch.stack(latents, dim=1), nets


def active_controls(controls: Sequence[Control], nets: Sequence[ControlNet], ts: Tensor,
                    time_scale: float) -> list[ActiveControl]:  # fmt: skip
    """The sampling-time view of the controls: network, scale and model-time window."""
    return [ActiveControl(net, float(c.scale), window_interval(ts, c.start, c.end, time_scale))
            for c, net in zip(controls, nets, strict=True)]  # fmt: skip


__all__ = ["Control", "active_controls", "active_steps", "encode_controls", "pick_controlnet", "window_interval"]
