"""ADM/Imagen-style Unet: the unCLIP decoder and its super-resolution stages.

The network follows Dhariwal & Nichol (2021, "ADM") with the conditioning of unCLIP (Ramesh et al. 2022, Sec. 2.1)
and Imagen (Saharia et al. 2022):

- ResNet blocks (GroupNorm, SiLU, 3x3 conv) with FiLM: a scale and shift from one conditioning vector made of the
  timestep embedding plus a projection of the CLIP image embedding (GLIDE/unCLIP add the embedding to time);
- the CLIP image embedding also becomes ``num_image_tokens`` tokens, which join the (projected) text encodings in
  the cross-attention context; cross-attention runs at *every* attention level and in the middle, not only in
  the bottleneck as DALLE2-pytorch does;
- self-attention only where ``self_attn`` says so (it is quadratic in pixels), always in the middle;
- pixel-unshuffle downsampling and pixel-shuffle upsampling (ICNR-initialised against checkerboards);
- super-resolution stages concatenate the upsampled low-res image (``lowres_cond``) and embed its Imagen noise
  augmentation level (``lowres_noise_cond``); ``self_cond`` concatenates the previous x0 estimate (Chen et al.
  2023, Analog Bits);
- ``learned_variance`` (off by default: it is a known NaN source in small models) doubles the output channels;
  the extra half interpolates log beta and log beta-tilde (Nichol & Dhariwal 2021, Eq. 15) and is returned only
  with ``return_variance=True``, so the x0-denoiser wrappers of ``t2i.diffusion`` work unchanged.

Classifier-free guidance drops conditioning by per-sample boolean masks ``drop_image`` / ``drop_text``: a dropped
image embedding is replaced by a learned null embedding, dropped text tokens are masked out of attention. The
masks batch like any other conditioning tensor, so ``t2i.diffusion.classifier_free_guidance`` runs cond and uncond
in one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.nn.attention import attention
from t2i.nn.embeddings import timestep_embedding

from .base import SavableModel, make_config

C = TypeVar("C")


# ---------------------------------------------------------------------------------------------------------------
# blocks


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM scale/shift from the conditioning vector, GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(self, cin: int, cout: int, emb_dim: int | None, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # every block starts as the identity (ADM's zero_module)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention over ``x`` (self) or a ``context`` (cross), with a key padding mask
    (``t2i.nn.attention``: SDPA, or the explicit math where that is faster)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim else None
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)  # residual branch starts at zero
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape  # (B, N, D)
        h = self.norm(x)
        ctx = h if context is None else self.context_norm(context)
        q = self.to_q(h).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, d)
        k, v = self.to_kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, M, d)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M), True = attend
        out = attention(q, k, v, attn_mask)
        return x + self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class SpatialAttention(nn.Module):
    """Optional self-attention then cross-attention to the conditioning tokens, on a feature map."""

    def __init__(self, ch: int, heads: int, head_dim: int, context_dim: int, self_attn: bool):
        super().__init__()
        self.self_attn = Attention(ch, heads, head_dim) if self_attn else None
        self.cross_attn = Attention(ch, heads, head_dim, context_dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.self_attn is not None:
            h = self.self_attn(h)
        h = self.cross_attn(h, context, mask)
        return h.transpose(1, 2).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    """Pixel-unshuffle then 1x1 conv (space-to-depth): no information is thrown away before the conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(4 * cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pixel_unshuffle(x, 2))


class PixelShuffleUpsample(nn.Module):
    """Conv to 4x channels then pixel shuffle, ICNR-initialised so it starts as nearest upsampling (Aitken 2017)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, 4 * cout, 1)
        w = torch.empty(cout, cin, 1, 1)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        with torch.no_grad():
            self.conv.weight.copy_(w.repeat_interleave(4, dim=0))  # the 4 sub-pixels start identical
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


# ---------------------------------------------------------------------------------------------------------------
# the Unet


@dataclass(frozen=True)
class UnetConfig:
    channels: int = 3  # image (or latent) channels
    dim: int = 64  # channels at the first level
    dim_mults: tuple[int, ...] = (1, 2, 4)  # channel multiplier per level; one 2x downsample between levels
    num_res_blocks: int = 2  # ResNet blocks per level (the up path has one more, for the extra skip)
    attn_levels: tuple[bool, ...] = (False, True, True)  # cross-attention (and optional self-attention) per level
    self_attn: tuple[bool, ...] = (False, False, True)  # self-attention at these levels (the middle always has it)
    heads: int = 4
    head_dim: int = 32
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0
    time_dim: int | None = None  # conditioning vector width (default 4 * dim)
    image_embed_dim: int = 0  # CLIP image embedding width (0: no image conditioning)
    num_image_tokens: int = 4  # tokens the image embedding is split into for cross-attention
    # > 0: the image embedding also becomes an image_map_grid x image_map_grid map (an MLP), upsampled to the input's
    # size and added after the first conv. Four tokens and a FiLM shift hand the Unet what the embedding names
    # (colours, shapes) but not where: a decoder trained on them leaves a CLIP embedding that holds the layout
    # (vision_positions='sincos') at chance on position. On a map, where is first-order at every pixel. The MLP
    # has the shape of a CLIP picture head (ClipConfig.picture_grid; 3 channels), so it can start as one.
    image_map_grid: int = 0
    image_map_channels: int = 3  # channels of that map
    # > 0: a second map of this many channels from the embedding (its own MLP, on the same grid), added the same way.
    # The first, a CLIP picture head, says which colour is where; a decoder that reads only it binds colours to the
    # wrong shapes, although the embedding says which shape is where (a probe reads it back in 82% of objects). A
    # decoder task can train it to say so outright (task.params.shape_map_weight, one channel per shape).
    image_shape_map_channels: int = 0
    text_embed_dim: int = 0  # width of the text encodings attended to (0: no text conditioning)
    # > 0: the Unet also takes a text_map (B, text_map_channels, grid, grid): a picture of the caption made by a text
    # model (e.g. a caption encoder's colour picture and shape maps), added like the image maps and hidden with the
    # text for guidance (drop_text). The image maps come from the prior's sample, whose embedding places colours but
    # does not bind shapes to them; a text map says which shape of which colour goes where, read off the words
    text_map_grid: int = 0
    text_map_channels: int = 8
    lowres_cond: bool = False  # super-resolution stage: concatenate the upsampled low-res image
    lowres_noise_cond: bool = False  # embed the low-res noise augmentation level
    self_cond: bool = False  # concatenate the previous x0 estimate (self-conditioning)
    learned_variance: bool = False  # also output the iDDPM variance interpolation (off: NaN-prone when small)

    def __post_init__(self):
        for name in ("dim_mults", "attn_levels", "self_attn"):  # YAML gives lists; keep the config hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.dim_mults)
        if n < 1 or any(m < 1 for m in self.dim_mults):
            raise ValueError(f"dim_mults must be positive integers, got {self.dim_mults}")
        for name in ("attn_levels", "self_attn"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per level ({n}, like dim_mults), got {getattr(self, name)}")
        if any(s and not a for s, a in zip(self.self_attn, self.attn_levels, strict=True)):
            raise ValueError("self_attn can only be on at levels where attn_levels is on")
        if self.dim % self.groups or any((self.dim * m) % self.groups for m in self.dim_mults):
            raise ValueError(f"every level width (dim * mult) must be divisible by groups={self.groups}")
        if self.lowres_noise_cond and not self.lowres_cond:
            raise ValueError("lowres_noise_cond needs lowres_cond=True (it embeds the low-res image's noise level)")
        if self.num_res_blocks < 1 or self.num_image_tokens < 1:
            raise ValueError("num_res_blocks and num_image_tokens must be at least 1")
        if self.image_map_grid < 0 or self.image_map_channels < 1:
            raise ValueError(
                f"image_map_grid must be >= 0 (0: no map) and image_map_channels >= 1, got {self.image_map_grid} "
                f"and {self.image_map_channels}"
            )
        if self.image_map_grid and not self.image_embed_dim:
            raise ValueError("image_map_grid > 0 maps the image embedding: it needs image_embed_dim > 0")
        if self.image_shape_map_channels < 0 or (self.image_shape_map_channels and not self.image_map_grid):
            raise ValueError(
                "image_shape_map_channels must be >= 0, and > 0 only with image_map_grid > 0 (its grid), got "
                f"{self.image_shape_map_channels} with image_map_grid={self.image_map_grid}"
            )
        if self.text_map_grid < 0 or self.text_map_channels < 1:
            raise ValueError(
                f"text_map_grid must be >= 0 (0: no text map) and text_map_channels >= 1, got {self.text_map_grid} "
                f"and {self.text_map_channels}"
            )


# a table: one configuration per row
PRESETS: dict[str, UnetConfig] = {
    "tiny": UnetConfig(dim=16, dim_mults=(1, 2), num_res_blocks=1, attn_levels=(False, True),
                       self_attn=(False, True), heads=2, head_dim=16, image_embed_dim=32, text_embed_dim=32),
    "base64": UnetConfig(dim=128, dim_mults=(1, 2, 3, 4), num_res_blocks=3, attn_levels=(False, True, True, True),
                         self_attn=(False, False, True, True), heads=8, head_dim=64, image_embed_dim=768,
                         text_embed_dim=768),
    "sr256": UnetConfig(dim=64, dim_mults=(1, 2, 4, 8), num_res_blocks=2, attn_levels=(False, False, False, True),
                        self_attn=(False, False, False, True), image_embed_dim=768, lowres_cond=True,
                        lowres_noise_cond=True),
}  # fmt: skip


class Unet(SavableModel):
    """The unCLIP/Imagen decoder Unet; ``net(x, t, **cond)`` as ``t2i.diffusion`` expects.

    Build from a config or from keyword arguments (``Unet(dim=64, image_embed_dim=512)``); unknown arguments are
    a ``ValueError`` naming the closest valid one.
    """

    config_cls = UnetConfig
    kind = "unclip_unet"

    def __init__(self, cfg: UnetConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.cfg = make_config(UnetConfig, cfg, kwargs)
        widths = [cfg.dim * m for m in cfg.dim_mults]
        emb = cfg.time_dim or 4 * cfg.dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.lowres_noise_mlp = (
            nn.Sequential(nn.Linear(cfg.dim, emb), nn.SiLU(), nn.Linear(emb, emb)) if cfg.lowres_noise_cond else None
        )
        ctx = emb  # context token width
        self.time_token = nn.Linear(emb, ctx)  # the time embedding is always one context token (never all-masked)
        if cfg.image_embed_dim:
            self.image_to_cond = nn.Linear(cfg.image_embed_dim, emb)
            self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * ctx)
            self.null_image_embed = nn.Parameter(torch.randn(cfg.image_embed_dim) * 0.02)
        if cfg.image_map_grid:
            e, g, c = cfg.image_embed_dim, cfg.image_map_grid, cfg.image_map_channels
            self.image_to_map = nn.Sequential(nn.Linear(e, 4 * e), nn.GELU(), nn.Linear(4 * e, c * g * g))
        if cfg.image_shape_map_channels:
            e, g, c = cfg.image_embed_dim, cfg.image_map_grid, cfg.image_shape_map_channels
            self.image_to_shape_map = nn.Sequential(nn.Linear(e, 4 * e), nn.GELU(), nn.Linear(4 * e, c * g * g))
        if cfg.text_embed_dim:
            self.text_proj = nn.Linear(cfg.text_embed_dim, ctx)

        cin = cfg.channels * (1 + int(cfg.lowres_cond) + int(cfg.self_cond))
        self.init_conv = nn.Conv2d(cin, widths[0], 3, padding=1)
        if cfg.image_map_grid:
            self.map_conv = nn.Conv2d(cfg.image_map_channels, widths[0], 3, padding=1)
            nn.init.zeros_(self.map_conv.weight)  # the map starts as no change, like every residual branch
            nn.init.zeros_(self.map_conv.bias)
        if cfg.image_shape_map_channels:
            self.shape_map_conv = nn.Conv2d(cfg.image_shape_map_channels, widths[0], 3, padding=1)
            nn.init.zeros_(self.shape_map_conv.weight)  # so a trained decoder given this map starts unchanged
            nn.init.zeros_(self.shape_map_conv.bias)
        if cfg.text_map_grid:
            self.text_map_conv = nn.Conv2d(cfg.text_map_channels, widths[0], 3, padding=1)
            nn.init.zeros_(self.text_map_conv.weight)  # so a trained decoder given a text map starts unchanged
            nn.init.zeros_(self.text_map_conv.bias)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips = [widths[0]]
        ch = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._level(ch, w, emb, ctx, i))
                ch = w
                skips.append(ch)
            if i < len(widths) - 1:
                self.down.append(Downsample(ch, ch))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, emb, cfg.groups, cfg.dropout)
        self.mid_attn = SpatialAttention(ch, cfg.heads, cfg.head_dim, ctx, self_attn=True)
        self.mid2 = ResBlock(ch, ch, emb, cfg.groups, cfg.dropout)
        for i, w in reversed(list(enumerate(widths))):
            for j in range(cfg.num_res_blocks + 1):
                self.up.append(self._level(ch + skips.pop(), w, emb, ctx, i))
                ch = w
                if j == cfg.num_res_blocks and i > 0:
                    self.up.append(PixelShuffleUpsample(ch, ch))
        self.out_norm = nn.GroupNorm(cfg.groups, ch)
        cout = cfg.channels * (2 if cfg.learned_variance else 1)
        self.out_conv = nn.Conv2d(ch, cout, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self._grad_ckpt = False

    def _level(self, cin: int, cout: int, emb: int, ctx: int, level: int) -> nn.ModuleList:
        cfg = self.cfg
        block = nn.ModuleList([ResBlock(cin, cout, emb, cfg.groups, cfg.dropout)])
        if cfg.attn_levels[level]:
            block.append(SpatialAttention(cout, cfg.heads, cfg.head_dim, ctx, cfg.self_attn[level]))
        return block

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self._grad_ckpt = enabled

    # -- conditioning -----------------------------------------------------------------------------------------

    def _conditioning(self, t, image_embed, drop_image, text_tokens, text_mask, drop_text, text_map, lowres_t):
        cfg, b = self.cfg, t.shape[0]
        emb = self.time_mlp(timestep_embedding(t, cfg.dim))  # (B, E)
        if self.lowres_noise_mlp is not None:
            if lowres_t is None:
                raise ValueError("this Unet has lowres_noise_cond=True: pass lowres_t (augmentation level, [B])")
            emb = emb + self.lowres_noise_mlp(timestep_embedding(lowres_t * 1000, cfg.dim))
        tokens, masks = [self.time_token(emb)[:, None]], [torch.ones(b, 1, dtype=torch.bool, device=t.device)]
        maps = []  # (convolution, grid) pairs: the picture map, the shape map, the text map
        if cfg.image_embed_dim:
            null = self.null_image_embed.to(emb.dtype).expand(b, -1)
            if image_embed is None:
                image_embed = null
            elif drop_image is not None:
                image_embed = torch.where(drop_image[:, None], null, image_embed.to(emb.dtype))
            emb = emb + self.image_to_cond(image_embed)
            tokens.append(self.image_to_tokens(image_embed).view(b, cfg.num_image_tokens, -1))
            if cfg.image_map_grid:
                g = cfg.image_map_grid
                maps.append((self.map_conv, self.image_to_map(image_embed).view(b, cfg.image_map_channels, g, g)))
                if cfg.image_shape_map_channels:
                    maps.append((self.shape_map_conv, self.shape_map(image_embed)))
            masks.append(torch.ones(b, cfg.num_image_tokens, dtype=torch.bool, device=t.device))
        elif image_embed is not None:
            raise ValueError("this Unet has image_embed_dim=0 and cannot take an image_embed")
        if cfg.text_embed_dim and text_tokens is not None:
            keep = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=t.device)
            if text_mask is not None:
                keep = keep & text_mask.bool()
            if drop_text is not None:
                keep = keep & ~drop_text[:, None]  # a dropped caption is simply invisible to attention
            tokens.append(self.text_proj(text_tokens.to(emb.dtype)))
            masks.append(keep)
        elif text_tokens is not None:
            raise ValueError("this Unet has text_embed_dim=0 and cannot take text_tokens")
        if cfg.text_map_grid and text_map is not None:  # None: no caption, as when it is dropped
            want = (b, cfg.text_map_channels, cfg.text_map_grid, cfg.text_map_grid)
            if tuple(text_map.shape) != want:
                raise ValueError(f"text_map must have shape {want} (text_map_channels, text_map_grid), got "
                                 f"{tuple(text_map.shape)}")  # fmt: skip
            text_map = text_map.to(emb.dtype)
            if drop_text is not None:
                text_map = text_map * (~drop_text).to(emb.dtype)[:, None, None, None]
            maps.append((self.text_map_conv, text_map))
        elif text_map is not None:
            raise ValueError("this Unet has text_map_grid=0 and cannot take a text_map")
        return emb, torch.cat(tokens, 1), torch.cat(masks, 1), maps

    def shape_map(self, image_embed: Tensor) -> Tensor:
        """The second map (``image_shape_map_channels``, grid x grid) of image embeddings (B, E)."""
        g, c = self.cfg.image_map_grid, self.cfg.image_shape_map_channels
        return self.image_to_shape_map(image_embed).view(image_embed.shape[0], c, g, g)

    def _run(self, block, h, emb, ctx, mask):
        if isinstance(block, (Downsample, PixelShuffleUpsample)):
            return block(h)
        h = block[0](h, emb)
        return block[1](h, ctx, mask) if len(block) > 1 else h

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor | None = None,
        drop_image: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
        text_map: Tensor | None = None,
        lowres: Tensor | None = None,
        lowres_t: Tensor | None = None,
        self_cond: Tensor | None = None,
        return_variance: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict the stage's target for ``x`` (B, C, H, W) at model time ``t`` (B,).

        Args:
            image_embed: (B, image_embed_dim) CLIP image embedding; None means the null embedding.
            drop_image, drop_text: (B,) bool, True replaces that sample's image embedding by the null one /
                hides its text tokens (classifier-free guidance).
            text_tokens, text_mask: (B, L, text_embed_dim) encodings and (B, L) validity mask.
            text_map: (B, text_map_channels, text_map_grid, text_map_grid) picture of the caption (Unets with
                text_map_grid); None, or drop_text, leaves it out.
            lowres: (B, C, H, W) low-res image already upsampled to this stage's size (SR stages).
            lowres_t: (B,) noise augmentation level in [0, 1] of ``lowres``.
            self_cond: (B, C, H, W) previous x0 estimate (zeros when there is none).
            return_variance: also return the variance interpolation v in [0, 1] (learned variance only).
        """
        cfg = self.cfg
        if x.shape[1] != cfg.channels:
            raise ValueError(f"expected {cfg.channels} input channels, got {x.shape[1]}")
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        emb, ctx, mask, maps = self._conditioning(
            t, image_embed, drop_image, text_tokens, text_mask, drop_text, text_map, lowres_t
        )
        parts = [x]
        if cfg.lowres_cond:
            if lowres is None:
                raise ValueError("this Unet is a super-resolution stage (lowres_cond=True): pass lowres=")
            if lowres.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"lowres must be upsampled to {tuple(x.shape[-2:])}, got {tuple(lowres.shape[-2:])}")
            parts.append(lowres.to(x.dtype))
        if cfg.self_cond:
            parts.append(torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype))
        h = torch.cat(parts, 1)
        if self.init_conv.weight.is_contiguous(memory_format=torch.channels_last):
            # a Unet moved to channels_last (``.to(memory_format=...)``): feed its first conv the same layout, or
            # oneDNN reorders at every call (measured 1.2x slower in bf16)
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.init_conv(h)
        for conv, grid in maps:  # each map (colours; shapes; the text's) upsampled, through its own convolution
            h = h + conv(F.interpolate(grid.to(h.dtype), size=h.shape[-2:], mode="bilinear", align_corners=False))
        hs = [h]
        for block in self.down:
            h = self._maybe_ckpt(block, h, emb, ctx, mask)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), ctx, mask), emb)
        for block in self.up:
            if isinstance(block, PixelShuffleUpsample):
                h = block(h)
            else:
                h = self._maybe_ckpt(block, torch.cat([h, hs.pop()], 1), emb, ctx, mask)
        out = self.out_conv(F.silu(self.out_norm(h)))  # (B, C or 2C, H, W)
        if not cfg.learned_variance:
            if return_variance:
                raise ValueError("return_variance=True needs a Unet built with learned_variance=True")
            return out
        pred, v = out.chunk(2, dim=1)
        return (pred, (v + 1) / 2) if return_variance else pred

    def _maybe_ckpt(self, block, h, emb, ctx, mask):
        if self._grad_ckpt and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._run, block, h, emb, ctx, mask, use_reentrant=False)
        return self._run(block, h, emb, ctx, mask)


# ---------------------------------------------------------------------------------------------------------------
# learned variance: the hybrid loss term (Nichol & Dhariwal 2021, Sec. 3.1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def variance_bound_loss(path, x0: Tensor, x_t: Tensor, x0_hat: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Per-sample KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in nats/dim for a discrete VP path.

    The model mean uses the *detached* x0 estimate, so this term trains only the variance (iDDPM's L_hybrid);
    the model log-variance is ``v log beta_t + (1 - v) log beta_tilde_t`` with beta_tilde clipped at its t=2
    value, as in iDDPM (beta_tilde_1 = 0).
    """
    T = getattr(path, "num_train_timesteps", None)
    if T is None:
        raise ValueError("learned variance needs a discrete VP path (num_train_timesteps=T)")
    k = (t.double() * T).round().long().clamp(1, T)  # 1-based step index
    ab = torch.cat([torch.ones(1, dtype=torch.float64), path.alphas_cumprod.double()]).to(x0.device)
    ab_t, ab_s = ab[k], ab[k - 1]
    beta = (1 - ab_t / ab_s).clamp(1e-20, 0.999)
    beta_tilde = beta * (1 - ab_s) / (1 - ab_t)
    beta_tilde_2 = (1 - ab[2] / ab[1]) * (1 - ab[1]) / (1 - ab[2]) if T > 1 else beta
    beta_tilde = torch.where(k == 1, beta_tilde_2.expand_as(beta_tilde), beta_tilde)
    nd = x0.ndim

    def bc(z):
        return z.float().reshape(-1, *([1] * (nd - 1)))

    c0 = bc(ab_s.sqrt() * beta / (1 - ab_t))
    ct = bc((1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t))
    true_mean = c0 * x0 + ct * x_t
    model_mean = c0 * x0_hat.detach() + ct * x_t
    true_logvar = bc(beta_tilde.log())
    model_logvar = v * bc(beta.log()) + (1 - v) * true_logvar
    return normal_kl(true_mean, true_logvar.expand_as(x0), model_mean, model_logvar).flatten(1).mean(1)
