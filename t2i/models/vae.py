"""The SD3 16-channel KL autoencoder (Rombach et al. 2022's AutoencoderKL, widened to 16 latent channels by
Esser et al. 2024) and its latent format.

Module names follow the official ``first_stage_model.*`` keys (``encoder.down.0.block.1.conv2``,
``decoder.up.3.upsample.conv``, ``mid.attn_1.q`` ...), so the VAE of an official SD3/SD3.5 file loads with
``strict=True``; ``t2i.io.sd3`` converts to and from diffusers' ``AutoencoderKL`` names. There are no
quant/post-quant convs. The scale/shift that put latents in the range the MMDiT was trained on live in
``LatentFormat``, never inline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.nn.noise import NoiseSource, randn_like


@dataclass(frozen=True)
class LatentFormat:
    """``z_model = (z_vae - shift) * scale`` into the MMDiT, and back before decoding (SD3: 1.5305, 0.0609)."""

    scale: float = 1.5305
    shift: float = 0.0609

    def process_in(self, z: Tensor) -> Tensor:
        return (z - self.shift) * self.scale

    def process_out(self, z: Tensor) -> Tensor:
        return z / self.scale + self.shift


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # per level; the SDXL VAE widths
    layers_per_block: int = 2  # resnets per encoder level (the decoder has one more)
    in_channels: int = 3
    latent_channels: int = 16
    norm_groups: int = 32


PRESETS: dict[str, VAEConfig] = {
    "sd3": VAEConfig(),
    # diffusers' SD3 pipeline test VAE
    "tiny": VAEConfig(block_out_channels=(4,), layers_per_block=1, latent_channels=4, norm_groups=1),
    "tiny2": VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_groups=4),
}


def _norm(cfg: VAEConfig, ch: int, fk) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6, affine=True, **fk)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus a (1x1 ``nin_shortcut`` when widths differ) residual."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, fk):
        super().__init__()
        self.norm1 = _norm(cfg, cin, fk)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, **fk)
        self.norm2 = _norm(cfg, cout, fk)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, **fk)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, **fk) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv projections (mid block only)."""

    def __init__(self, cfg: VAEConfig, ch: int, fk):
        super().__init__()
        self.norm = _norm(cfg, ch, fk)
        self.q = nn.Conv2d(ch, ch, 1, **fk)
        self.k = nn.Conv2d(ch, ch, 1, **fk)
        self.v = nn.Conv2d(ch, ch, 1, **fk)
        self.proj_out = nn.Conv2d(ch, ch, 1, **fk)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv (the ldm asymmetric downsample)."""

    def __init__(self, ch: int, fk):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int, fk):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(cfg: VAEConfig, ch: int, fk) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(cfg, ch, ch, fk)
    mid.attn_1 = AttnBlock(cfg, ch, fk)
    mid.block_2 = ResnetBlock(cfg, ch, ch, fk)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, fk):
        super().__init__()
        chans = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1, **fk)
        self.down = nn.ModuleList()
        cin = chans[0]
        for i, cout in enumerate(chans):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(cfg, cin if j == 0 else cout, cout, fk) for j in range(cfg.layers_per_block)
            )
            if i != len(chans) - 1:
                level.downsample = Downsample(cout, fk)
            self.down.append(level)
            cin = cout
        self.mid = _mid(cfg, cin, fk)
        self.norm_out = _norm(cfg, cin, fk)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1, **fk)  # mean ‖ logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, fk):
        super().__init__()
        chans = cfg.block_out_channels
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1, **fk)
        self.mid = _mid(cfg, cin, fk)
        levels: list[nn.Module] = []
        for i in reversed(range(len(chans))):  # built bottleneck first, stored as up[i] for level i
            cout = chans[i]
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(cfg, cin if j == 0 else cout, cout, fk) for j in range(cfg.layers_per_block + 1)
            )
            if i != 0:
                level.upsample = Upsample(cout, fk)
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, cin, fk)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1, **fk)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The SD3 VAE: ``encode`` images in [-1, 1] to raw (unscaled) latents, ``decode`` back.

    Args:
        cfg: architecture (``PRESETS["sd3"]`` for the released VAE).
        latent_format: scale/shift between VAE latents and MMDiT latents.
        dtype, device: where to build the parameters (``"meta"`` for loading with ``assign=True``).
    """

    def __init__(
        self,
        cfg: VAEConfig = PRESETS["sd3"],
        *,
        latent_format: LatentFormat | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.cfg = cfg
        self.latent_format = latent_format or LatentFormat()
        fk = {"dtype": dtype, "device": device}
        self.encoder = Encoder(cfg, fk)
        self.decoder = Decoder(cfg, fk)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and std, logvar clamped to [-30, 20] as both references do."""
        mean, logvar = self.encoder(x.to(self.dtype)).float().chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def encode(self, x: Tensor, *, sample: bool = True, noise: NoiseSource = None) -> Tensor:
        """Raw VAE latents of images ``x`` in [-1, 1]: a posterior sample (what SD3 img2img uses) or the mean."""
        mean, std = self.moments(x)
        return mean + std * randn_like(mean, noise) if sample else mean

    def decode(self, z: Tensor, *, tile: int | None = None, overlap: int = 8) -> Tensor:
        """Images in about [-1, 1] from raw latents; ``tile`` (latent pixels) decodes in blended tiles.

        Tiling bounds peak memory for large images. GroupNorm statistics and the mid attention become per tile,
        so a tiled decode differs slightly from a whole one; overlaps are linearly cross-faded to hide seams.
        """
        z = z.to(self.dtype)
        if tile is None or (z.shape[-2] <= tile and z.shape[-1] <= tile):
            return self.decoder(z)
        return self._decode_tiled(z, tile, overlap)

    def _decode_tiled(self, z: Tensor, tile: int, overlap: int) -> Tensor:
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap ({overlap}) must be smaller than tile ({tile})")
        f = self.downscale
        B, _, H, W = z.shape
        out = torch.zeros(B, self.cfg.in_channels, H * f, W * f, device=z.device, dtype=torch.float32)
        weight = torch.zeros(1, 1, H * f, W * f, device=z.device, dtype=torch.float32)
        for y0 in _tile_starts(H, tile, overlap):
            for x0 in _tile_starts(W, tile, overlap):
                y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
                img = self.decoder(z[:, :, y0:y1, x0:x1]).float()
                wy = _ramp((y1 - y0) * f, overlap * f, y0 > 0, y1 < H, z.device)
                wx = _ramp((x1 - x0) * f, overlap * f, x0 > 0, x1 < W, z.device)
                w = wy[:, None] * wx[None, :]
                out[:, :, y0 * f : y1 * f, x0 * f : x1 * f] += img * w
                weight[:, :, y0 * f : y1 * f, x0 * f : x1 * f] += w
        return (out / weight).to(self.dtype)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    starts.append(n - tile)  # the last tile ends exactly at the border
    return starts


def _ramp(n: int, width: int, fade_in: bool, fade_out: bool, device) -> Tensor:
    """Blend weights along one axis: linear ramps over ``width`` pixels on edges shared with a neighbour."""
    w = torch.ones(n, device=device)
    if width <= 0:
        return w
    ramp = (torch.arange(min(width, n), device=device, dtype=torch.float32) + 0.5) / width
    if fade_in:
        w[: len(ramp)] = torch.minimum(w[: len(ramp)], ramp)
    if fade_out:
        w[n - len(ramp) :] = torch.minimum(w[n - len(ramp) :], ramp.flip(0))
    return w


def count_vae_parameters(vae: AutoencoderKL) -> tuple[int, int]:
    """(encoder, decoder) parameter counts; the SD3 VAE has 34,274,208 and 49,545,475."""
    return sum(p.numel() for p in vae.encoder.parameters()), sum(p.numel() for p in vae.decoder.parameters())
