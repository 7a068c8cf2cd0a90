"""VQ-GAN (Esser et al. 2021) as a latent space for any unCLIP decoder stage.

A convolutional encoder maps images to a ``latent_channels`` grid ``2**(len(dim_mults) - 1)`` times smaller; a
vector quantiser snaps each latent vector to its nearest codebook entry; a mirrored decoder maps codes back to
pixels. Diffusion runs on the *pre-quantisation* latents (``encode``) and ``decode`` quantises before decoding, as
DALLE2-pytorch does, so the diffusion model may land between codes and the codebook cleans it up.

Two codebook updates:

- ``ema`` (van den Oord et al. 2017, App. A.1): the codebook is an exponential moving average of the encoder
  outputs assigned to each code (no codebook gradient; more stable);
- ``straight_through``: the codebook is learned by gradient through the codebook loss ``||sg(z) - e||^2``.

Both use the straight-through estimator for the encoder and the commitment loss ``||z - sg(e)||^2``. Codebook usage
is tracked (an EMA of how often each code is picked) and reported as the used fraction and the perplexity; unused
codes are re-seeded from encoder outputs when ``restart_dead_codes`` is on.

The GAN part is optional and perceptual-loss free (no downloaded VGG weights): a PatchGAN discriminator
(Isola et al. 2017) lives inside the model when ``discriminator=True`` so one optimiser trains both; the training
task keeps their gradients apart (``t2i.train.tasks.unclip``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.errors import check_choice

from .base import SavableModel, make_config
from .unet import Downsample, PixelShuffleUpsample, ResBlock

QUANTIZERS = ("ema", "straight_through")


@dataclass(frozen=True)
class VQGANConfig:
    channels: int = 3
    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 2)  # one 2x downsample between levels: factor 2**(len - 1)
    num_res_blocks: int = 1
    groups: int = 8
    latent_channels: int = 4  # = codebook vector width
    codebook_size: int = 512
    quantizer: str = "ema"  # ema | straight_through
    ema_decay: float = 0.99
    commitment: float = 0.25  # beta of the commitment loss
    restart_dead_codes: bool = True  # re-seed codes unused for a while from current encoder outputs (EMA only)
    discriminator: bool = False  # include a PatchGAN discriminator for adversarial training
    disc_dim: int = 32
    disc_layers: int = 3

    def __post_init__(self):
        object.__setattr__(self, "dim_mults", tuple(self.dim_mults))  # YAML gives lists
        check_choice("quantizer", self.quantizer, QUANTIZERS)
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if any((self.dim * m) % self.groups for m in self.dim_mults):
            raise ValueError(f"every level width (dim * mult) must be divisible by groups={self.groups}")


PRESETS: dict[str, VQGANConfig] = {
    "tiny": VQGANConfig(dim=16, dim_mults=(1, 2), groups=4, latent_channels=4, codebook_size=64),
    "f4": VQGANConfig(dim=128, dim_mults=(1, 2, 4), num_res_blocks=2, latent_channels=4, codebook_size=8192),
}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with EMA or straight-through updates and usage tracking."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.latent_channels
        init = torch.randn(k, d)
        if cfg.quantizer == "ema":
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.zeros(k))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.zeros(k))  # EMA of the fraction of vectors assigned to each code
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.long))  # for the EMA's bias correction

    def lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest codes of latents ``z`` (B, D, H, W): (quantised (B, D, H, W), indices (B, H, W))."""
        # distances in fp32 even under autocast: bf16 rounding would pick the wrong code for close neighbours
        with torch.autocast(z.device.type, enabled=False):
            return self._lookup(z)

    def _lookup(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (N, D)
        book = self.codebook.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]  # (N, K)
        idx = dist.argmin(1)
        q = book[idx].view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return q, idx.view(b, h, w)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(straight-through quantised latents, indices, per-sample VQ loss (B,))."""
        if self.training:
            with torch.autocast(z.device.type, enabled=False):  # codebook statistics in fp32
                self._update_stats(z.float(), self.lookup(z)[1])
        q, idx = self.lookup(z)  # after the update: the codes this step's decoder and losses see
        commit = (z - q.detach()).pow(2).flatten(1).mean(1)
        loss = self.cfg.commitment * commit
        if self.cfg.quantizer == "straight_through":
            loss = loss + (q - z.detach()).pow(2).flatten(1).mean(1)
        return z + (q - z).detach(), idx, loss

    @torch.no_grad()
    def _update_stats(self, z: Tensor, idx: Tensor) -> None:
        cfg, k = self.cfg, self.cfg.codebook_size
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        if int(self.usage_steps) == 0:
            # data-dependent init: codes start on encoder outputs, not far-away random points nobody picks
            pick = torch.randint(0, len(flat), (k,), device=flat.device)
            self.codebook.data.copy_(flat[pick] + 1e-3 * torch.randn_like(flat[pick]))
            if cfg.quantizer == "ema":
                self.embed_sum.copy_(self.codebook)
                self.cluster_size.fill_(1.0)
            idx = self.lookup(z)[1]
        onehot = F.one_hot(idx.flatten(), k).float()  # (N, K)
        counts = onehot.sum(0)
        self.usage.lerp_(counts / counts.sum(), 1 - cfg.ema_decay)
        self.usage_steps += 1
        if cfg.quantizer != "ema":
            return
        self.cluster_size.lerp_(counts, 1 - cfg.ema_decay)
        self.embed_sum.lerp_(onehot.t() @ flat, 1 - cfg.ema_decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps codes with no assignments from dividing by zero
        size = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.embed_sum / size[:, None])
        # restart only once the usage EMA has seen ~its horizon of batches, so early noise kills no code
        if cfg.restart_dead_codes and int(self.usage_steps) * (1 - cfg.ema_decay) >= 1:
            dead = self.corrected_usage() < 1e-3 / k
            if dead.any():
                pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)
                self.codebook[dead] = flat[pick]
                self.embed_sum[dead] = flat[pick]
                self.cluster_size[dead] = 1.0
                self.usage[dead] = self.usage.sum() / k

    def corrected_usage(self) -> Tensor:
        """The usage EMA divided by its bias (1 - decay^steps), so it is a distribution from the first step."""
        steps = int(self.usage_steps)
        if steps == 0:
            return self.usage.clone()
        return self.usage / (1 - self.cfg.ema_decay**steps)

    def usage_stats(self) -> dict[str, float]:
        """Fraction of codes in use (usage above 1/(10 K)) and the perplexity of the usage distribution."""
        usage = self.corrected_usage()
        p = usage / usage.sum().clamp_min(1e-12)
        perplexity = torch.exp(-(p * (p + 1e-12).log()).sum())
        used = (usage > 0.1 / self.cfg.codebook_size).float().mean()
        return {"codebook_used": float(used), "codebook_perplexity": float(perplexity)}


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided convs to a grid of real/fake logits (Isola et al. 2017), GroupNorm instead of BatchNorm."""

    def __init__(self, channels: int, dim: int, layers: int):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, dim, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = dim
        for i in range(1, layers):
            nxt = dim * min(2**i, 8)
            mods += [nn.Conv2d(ch, nxt, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VQGAN(SavableModel):
    """Encoder, vector quantiser and decoder; ``encode`` gives pre-quantisation latents, ``decode`` quantises."""

    config_cls = VQGANConfig
    kind = "vqgan"

    def __init__(self, cfg: VQGANConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.cfg = make_config(VQGANConfig, cfg, kwargs)
        widths = [cfg.dim * m for m in cfg.dim_mults]
        enc: list[nn.Module] = [nn.Conv2d(cfg.channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                enc.append(ResBlock(ch, w, None, cfg.groups))
                ch = w
            if i < len(widths) - 1:
                enc.append(Downsample(ch, ch))
        enc += [ResBlock(ch, ch, None, cfg.groups), nn.GroupNorm(cfg.groups, ch), nn.SiLU()]
        enc.append(nn.Conv2d(ch, cfg.latent_channels, 1))
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(cfg)
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), ResBlock(ch, ch, None, cfg.groups)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_res_blocks):
                dec.append(ResBlock(ch, w, None, cfg.groups))
                ch = w
            if i > 0:
                dec.append(PixelShuffleUpsample(ch, ch))
        dec += [nn.GroupNorm(cfg.groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.discriminator = (
            PatchDiscriminator(cfg.channels, cfg.disc_dim, cfg.disc_layers) if cfg.discriminator else None
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.dim_mults) - 1)

    def encode(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, C, H, W) -> pre-quantisation latents (B, latent_channels, H/f, W/f)."""
        return self.encoder(images)

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images: quantise to the nearest codes, then decode."""
        q, _ = self.quantizer.lookup(z)
        return self.decoder(q)

    def decode_indices(self, idx: Tensor) -> Tensor:
        """Code indices (B, H, W) -> images."""
        q = self.quantizer.codebook[idx].permute(0, 3, 1, 2)
        return self.decoder(q)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, code indices, per-sample VQ loss (B,)) for training."""
        z = self.encode(images)
        q, idx, vq_loss = self.quantizer(z)
        return self.decoder(q), idx, vq_loss
