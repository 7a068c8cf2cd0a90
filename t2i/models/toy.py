"""Tiny denoisers for smoke tests, CI and benchmarks of the training stack: honest networks, not real models.

``ToyUNet`` is a two-resolution residual conv net in the ADM mould (Dhariwal & Nichol 2021) shrunk to a few
thousand parameters: time enters as a sinusoidal embedding through an MLP, an optional class label through an
embedding table (one extra "null" row for classifier-free guidance), both as a per-channel scale and shift of each
residual block. ``ToyMLP`` is the same idea for vectors ``[B, D]`` (the shape of unCLIP prior inputs and of
precomputed embeddings). Both follow the network contract of ``t2i.diffusion``: ``net(x, t, **cond)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from t2i.nn.embeddings import timestep_embedding


class _Conditioning(nn.Module):
    """Time (and optional class label) to one conditioning vector per sample."""

    def __init__(self, time_dim: int, num_classes: int):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # row num_classes is the null label that classifier-free guidance drops to
        self.label_emb = nn.Embedding(num_classes + 1, time_dim) if num_classes > 0 else None
        self.num_classes = num_classes

    def forward(self, t: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))  # (B, time_dim)
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.label_emb(labels)
        return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning as a per-channel scale and shift in between."""

    def __init__(self, ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * ch)
        self.norm2 = nn.GroupNorm(groups, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, ch, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


@dataclass(frozen=True)
class ToyUNetConfig:
    channels: int = 3  # image channels in and out
    width: int = 32  # channels at full resolution (doubled at half resolution)
    depth: int = 1  # residual blocks per stage
    time_dim: int = 64
    num_classes: int = 0  # 0: unconditional
    groups: int = 8  # GroupNorm groups; must divide width


class ToyUNet(nn.Module):
    """A tiny two-resolution conditional U-Net: ``(B, C, H, W), t (B,) -> (B, C, H, W)``; H and W even."""

    def __init__(self, cfg: ToyUNetConfig):
        super().__init__()
        if cfg.width % cfg.groups:
            raise ValueError(f"width ({cfg.width}) must be divisible by groups ({cfg.groups})")
        self.cfg = cfg
        w = cfg.width
        self.cond = _Conditioning(cfg.time_dim, cfg.num_classes)
        self.stem = nn.Conv2d(cfg.channels, w, 3, padding=1)
        self.enc = nn.ModuleList(ResBlock(w, cfg.time_dim, cfg.groups) for _ in range(cfg.depth))
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(ResBlock(2 * w, cfg.time_dim, cfg.groups) for _ in range(cfg.depth))
        self.up = nn.Conv2d(2 * w, w, 3, padding=1)
        self.dec = nn.ModuleList(ResBlock(w, cfg.time_dim, cfg.groups) for _ in range(cfg.depth))
        self.out_norm = nn.GroupNorm(cfg.groups, w)
        self.out = nn.Conv2d(w, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # predicts 0 at init: a stable start for every parameterisation
        nn.init.zeros_(self.out.bias)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def _block(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.cond(t, labels)  # (B, time_dim)
        h = self.stem(x)  # (B, w, H, W)
        for block in self.enc:
            h = self._block(block, h, emb)
        skip = h
        h = self.down(h)  # (B, 2w, H/2, W/2)
        for block in self.mid:
            h = self._block(block, h, emb)
        h = self.up(F.interpolate(h, size=skip.shape[-2:], mode="nearest")) + skip  # (B, w, H, W)
        for block in self.dec:
            h = self._block(block, h, emb)
        return self.out(F.silu(self.out_norm(h)))

    def flops_per_sample(self, height: int, width: int) -> int:
        """Forward multiply-adds x2 of the conv and linear layers for one sample (norms/activations ignored)."""
        total = 0
        hw = {1: height * width, 2: ((height + 1) // 2) * ((width + 1) // 2)}
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                res = 2 if name.startswith("mid") or name == "down" else 1
                total += 2 * m.weight.numel() * hw[res]
            elif isinstance(m, nn.Linear):
                total += 2 * m.weight.numel()
        return total


class _MLPBlock(nn.Module):
    def __init__(self, dim: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.emb = nn.Linear(emb_dim, 2 * dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(self.fc1(self.norm(x) * (1 + scale) + shift)))


@dataclass(frozen=True)
class ToyMLPConfig:
    dim: int = 16  # vector size in and out
    width: int = 64
    depth: int = 2
    time_dim: int = 64
    num_classes: int = 0


class ToyMLP(nn.Module):
    """A tiny conditional residual MLP denoiser for vectors: ``(B, D), t (B,) -> (B, D)``."""

    def __init__(self, cfg: ToyMLPConfig):
        super().__init__()
        self.cfg = cfg
        self.cond = _Conditioning(cfg.time_dim, cfg.num_classes)
        self.inp = nn.Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList(_MLPBlock(cfg.width, cfg.time_dim) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.cond(t, labels)
        h = self.inp(x)  # (B, width)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        return self.out(self.out_norm(h))

    def flops_per_sample(self, *_) -> int:
        return sum(2 * m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
