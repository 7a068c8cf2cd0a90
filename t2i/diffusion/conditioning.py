"""Conditioning a denoiser on more than the prompt: its own previous estimate, and a noised low-res image.

- ``SelfConditioning`` (Chen et al. 2023, "Analog Bits", sampling side): each call's x0 estimate is fed back as
  ``self_cond`` on the next call, as the unCLIP prior and the super-resolution Unets were trained to expect;
  ``self_conditioned_for_training`` is the training side (a gradient-free first pass on a random half);
- ``LowresAugment``: the low-res conditioning of a super-resolution stage (Ramesh et al. 2022, App. C): downsample,
  optionally blur, upsample, then noise to a level on its own noise path (Ho et al. 2022, "Cascaded Diffusion";
  Imagen's noise augmentation). One object serves training and sampling so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i.nn.noise import Seeds

from .parameterization import DenoiseFn, split_variance, x0_from_prediction
from .paths import NoisePath, VPPath, append_dims


class SelfConditioning:
    """Wrap ``denoise`` so each call receives the previous call's x0 estimate as ``self_cond`` (zeros at first).

    Stateful by design: make one per sampling run. Put it inside guidance, so that the conditional and the
    unconditional branch each see their own previous estimate, as in training; a change of batch shape (a sampler
    that skips the unconditional pass outside a guidance interval) restarts from zeros.
    """

    def __init__(self, denoise: DenoiseFn):
        self.denoise, self.last = denoise, None

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor | tuple[Tensor, Tensor]:
        prev = self.last if self.last is not None and self.last.shape == x.shape else torch.zeros_like(x)
        out = self.denoise(x, t, self_cond=prev, **cond)
        self.last = split_variance(out)[0].detach()
        return out


def self_conditioned_for_training(net, prediction: str, path: NoisePath, t: Tensor, use: Tensor):
    """The training side of ``SelfConditioning``: ``net`` with self-conditioning on the samples where ``use`` (B,)
    is True (Chen et al. 2023, usually half of them): a first, gradient-free pass gives an x0 estimate that the
    second pass receives as ``self_cond``; the others get zeros, as the first sampling step does."""

    def wrapped(x_t: Tensor, model_t: Tensor, *, return_variance: bool = False, **cond):
        sc = torch.zeros_like(x_t)
        if bool(use.any()):
            with torch.no_grad():
                pred = net(x_t, model_t, **cond)
                a = append_dims(path.alpha(t), x_t.ndim).to(x_t)
                s = append_dims(path.sigma(t), x_t.ndim).to(x_t)
                sc = torch.where(
                    append_dims(use, x_t.ndim), x0_from_prediction(prediction, pred.float(), x_t, a, s), sc
                )
        extra = {"return_variance": True} if return_variance else {}
        return net(x_t, model_t, self_cond=sc.to(x_t.dtype), **extra, **cond)

    return wrapped


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 3) -> Tensor:
    """Separable Gaussian blur of images (B, C, H, W) with reflect padding (no kornia dependency)."""
    if sigma <= 0:
        return x
    r = kernel_size // 2
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class LowresAugment:
    """Low-res conditioning of a super-resolution stage (unCLIP Sec. C; Imagen's noise augmentation).

    Training: downsample the target to ``lowres_size``, blur with probability ``blur_prob`` (sigma uniform in
    ``blur_sigma``), upsample back (bilinear), then noise it to a level ~ U[0, ``max_train_level``] on
    ``noise_path``; the level is passed to the Unet as ``lowres_t``. Sampling: no blur, level ``sample_level``.
    """

    lowres_size: int
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_kernel: int = 3
    max_train_level: float = 0.5
    sample_level: float = 0.2
    noise_path: NoisePath = field(default_factory=lambda: VPPath("cosine", None))

    def __post_init__(self):
        if not (0 <= self.sample_level <= 1 and 0 <= self.max_train_level <= 1 and 0 <= self.blur_prob <= 1):
            raise ValueError("sample_level, max_train_level and blur_prob must lie in [0, 1]")

    def downsample(self, images: Tensor) -> Tensor:
        return F.interpolate(images, size=self.lowres_size, mode="area")

    def upsample(self, lowres: Tensor, size: int) -> Tensor:
        return F.interpolate(lowres, size=size, mode="bilinear", align_corners=False, antialias=False)

    def _noise(self, x: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        a = append_dims(self.noise_path.alpha(level.double()), x.ndim).to(x)
        s = append_dims(self.noise_path.sigma(level.double()), x.ndim).to(x)
        return a * x + s * noise

    def train(self, images: Tensor, gens: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
        """(upsampled augmented low-res image, level (B,)) for targets ``images`` (B, C, H, W) in [-1, 1]."""
        size = images.shape[-1]
        low = self.downsample(images)
        u = torch.stack([torch.rand(3, generator=g) for g in gens])  # blur?, sigma, level
        blurred = []
        for i in range(len(low)):
            sigma = self.blur_sigma[0] + float(u[i, 1]) * (self.blur_sigma[1] - self.blur_sigma[0])
            do = float(u[i, 0]) < self.blur_prob
            blurred.append(gaussian_blur(low[i : i + 1], sigma, self.blur_kernel) if do else low[i : i + 1])
        up = self.upsample(torch.cat(blurred), size)
        level = (u[:, 2] * self.max_train_level).to(images.device)
        noise = torch.stack([torch.randn(up.shape[1:], generator=g) for g in gens]).to(up)
        return self._noise(up, level, noise), level.float()

    def sample(self, prev: Tensor, size: int, seeds: Seeds) -> tuple[Tensor, Tensor]:
        """Condition for sampling from the previous stage's output ``prev`` (B, C, h, w)."""
        up = self.upsample(prev.float(), size)
        level = torch.full((len(prev),), self.sample_level, device=prev.device)
        return self._noise(up, level, seeds.randn(up.shape, device=up.device)), level
