"""Training the SD3-style KL autoencoder (model ``sd3_vae``) from scratch.

Rombach et al. 2022 train the KL autoencoder with a reconstruction loss, a small KL penalty towards N(0, I) and
(for photographs) LPIPS and a patch GAN. t2i's default models live in the shapes world, flat colours on a plain
background, where the perceptual terms buy little: the loss here is per-pixel L1 (or L2) on a *posterior sample*
(so the decoder learns to tolerate the noise the MMDiT's latents will carry) plus ``kl_weight`` times the KL per
latent element. Both are means, so ``kl_weight`` does not depend on image or latent size.

The posterior noise of each sample comes from a generator seeded by its draw index, as in every t2i task, so the
loss stream does not depend on the batch split or a resume.

``latent_format_from_data`` measures the scale/shift that put a trained VAE's latents at unit variance around
zero, the way SD3's 1.5305 / 0.0609 were measured for its VAE; the SD3 task calls it when a config gives none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from t2i.data.transforms import sample_generator
from t2i.models.vae import LatentFormat

from ..distributed import unwrap
from . import Task

POSTERIOR_STREAM = 1


@dataclass
class VAETaskConfig:
    recon_loss: str = "l1"  # l1 | l2
    kl_weight: float = 1e-5  # weight of the per-element KL against the per-pixel reconstruction loss


class VAETask(Task):
    """Reconstruction of a posterior sample + a KL penalty; sample grids show inputs over reconstructions."""

    params_cls = VAETaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.params.recon_loss not in ("l1", "l2"):
            raise ValueError(f"task.params.recon_loss must be l1 or l2, got {self.params.recon_loss!r}")
        if self.params.kl_weight < 0:
            raise ValueError(f"task.params.kl_weight must be >= 0, got {self.params.kl_weight}")
        self._last: Tensor | None = None

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        net = unwrap(model)
        device = next(model.parameters()).device
        x = batch["image"].to(device=device, dtype=torch.float32)
        self._last = x[:16].detach()
        mean, logvar = net.encoder(x).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        gens = [sample_generator(self.cfg.run.seed, int(d), POSTERIOR_STREAM) for d in batch["id"]]
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
        recon = net.decoder(mean + torch.exp(0.5 * logvar) * eps).float()
        err = (recon - x).abs() if self.params.recon_loss == "l1" else (recon - x) ** 2
        kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar)
        return err.flatten(1).mean(1) + self.params.kl_weight * kl.flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, model, n, *, seed, device, steps=None):
        """Posterior-mean reconstructions of the last training images (top half of the grid: inputs)."""
        if self._last is None:
            return None
        net = unwrap(model)
        x = self._last[: max(1, n // 2)].to(device)
        was = net.training
        net.eval()
        try:
            recon = net.decode(net.encode(x, sample=False)).float()
        finally:
            net.train(was)
        return torch.cat([x, recon]).clamp(-1, 1)


@torch.no_grad()
def latent_format_from_data(vae: nn.Module, images: Tensor, *, batch_size: int = 64) -> LatentFormat:
    """``LatentFormat`` whose ``process_in`` maps the VAE's posterior means of ``images`` to mean 0, std 1."""
    means = [vae.moments(images[i : i + batch_size])[0] for i in range(0, len(images), batch_size)]
    z = torch.cat(means).double()
    shift, std = z.mean().item(), z.std().item()
    if not std > 0:
        raise ValueError("the VAE's latents have zero spread on these images; is it trained?")
    return LatentFormat(scale=round(1.0 / std, 4), shift=round(shift, 4))
