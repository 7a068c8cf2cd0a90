"""The unCLIP diffusion prior: a causal transformer that denoises a CLIP image embedding given the caption.

Ramesh et al. (2022, Sec. 2.2): a decoder-only transformer reads the sequence

    [text encodings (L tokens), text embedding, time, noised image embedding, (self-cond estimate), query]

under a causal mask and predicts, from the output at the final (learned query) token, the clean image embedding
x0 directly (or v). The diffused quantity is the CLIP image embedding scaled by ``sqrt(embed_dim)``: unit-norm
CLIP vectors have per-coordinate std ~ 1/sqrt(d), far below the unit-variance noise, which makes the task nearly
trivial at every t unless rescaled (crowsonkb's fix, DALLE2-pytorch issue #60). ``scale_embed``/``unscale_embed``
return new tensors and never touch their input (DALLE2-pytorch multiplies the caller's tensor in place).

Classifier-free guidance: ``drop_text`` (B,) replaces the text embedding with a learned null embedding and masks
every text token out of attention. The noised image embedding is *not* dropped. It is the diffusion state, not a
condition: the unconditional branch must still denoise x_t, otherwise it degenerates to a function of time only
(the mean embedding) and guidance extrapolates away from that constant instead of from an unconditional score.
(DALLE2-pytorch drops it as well and never explained why, issue #285; we keep it.)

The network follows ``t2i.diffusion``'s contract ``net(x, t, **cond)``; sampling with guidance and best-of-n
reranking is ``sample_prior`` in ``t2i.pipelines.unclip_stages`` (models sit below the diffusion core: the import
contract in pyproject.toml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.nn.attention import attention
from t2i.nn.embeddings import timestep_embedding

from .base import SavableModel, make_config


@dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 512  # CLIP embedding width (image and text embeddings share it)
    dim: int = 0  # transformer width (0: embed_dim)
    depth: int = 6
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    dropout: float = 0.0
    text_token_dim: int = 0  # width of per-token text encodings (0: condition on the text embedding only)
    max_text_len: int = 77  # text tokens kept (longer encodings are an error, not silently truncated)
    self_cond: bool = False  # feed the previous x0 estimate back as an extra token
    norm_out: bool = True  # final LayerNorm before the output projection

    def __post_init__(self):
        if self.embed_dim < 1 or self.depth < 1 or self.heads < 1 or self.head_dim < 1:
            raise ValueError("embed_dim, depth, heads and head_dim must be positive")
        if self.dim < 0 or self.text_token_dim < 0 or self.max_text_len < 1:
            raise ValueError("dim and text_token_dim must be >= 0 (0 = default / off), max_text_len >= 1")

    @property
    def width(self) -> int:
        return self.dim or self.embed_dim


PRESETS: dict[str, PriorConfig] = {
    "tiny": PriorConfig(embed_dim=32, depth=2, heads=2, head_dim=16, text_token_dim=32, max_text_len=16),
    "vit-b-32": PriorConfig(embed_dim=512, depth=12, heads=8, head_dim=64, text_token_dim=512, max_text_len=77),
    "vit-l-14": PriorConfig(embed_dim=768, depth=12, heads=12, head_dim=64, text_token_dim=768, max_text_len=77),
}


class Block(nn.Module):
    """Pre-LayerNorm transformer block: masked multi-head self-attention (SDPA) and a SwiGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = ff_mult * dim
        self.ff_in = nn.Linear(dim, 2 * hidden)
        self.ff_out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        """``last_only``: compute only the final token's output (B, 1, D); exact, since with a causal mask no later
        token exists, and the prior reads nothing else from its last block."""
        b, n, _ = x.shape  # (B, N, D)
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        if last_only:
            q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]  # (B, H, 1, d), (B, 1, 1, N), (B, 1, D)
        p = self.dropout if self.training else 0.0
        a = attention(q, k, v, mask, dropout_p=p)  # mask (B, 1, N or 1, N)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, x.shape[1], -1)))
        h, gate = self.ff_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.drop(self.ff_out(h * F.silu(gate)))


class PriorNetwork(SavableModel):
    """The prior's denoiser ``net(x_t, t, *, text_embed, text_tokens, text_mask, drop_text, self_cond)``.

    ``x_t`` is the noised *scaled* image embedding (B, embed_dim); the output is the prediction (x0 or v, as
    the training objective chose) in the same scaled units. Build from a ``PriorConfig`` or keyword arguments;
    unknown arguments are a ``ValueError``.
    """

    config_cls = PriorConfig
    kind = "unclip_prior"

    def __init__(self, cfg: PriorConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.cfg = make_config(PriorConfig, cfg, kwargs)
        d, e = cfg.width, cfg.embed_dim
        self.text_embed_in = nn.Linear(e, d)
        self.null_text_embed = nn.Parameter(torch.randn(e) * 0.02)
        self.text_tokens_in = nn.Linear(cfg.text_token_dim, d) if cfg.text_token_dim else None
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.image_in = nn.Linear(e, d)
        self.self_cond_in = nn.Linear(e, d) if cfg.self_cond else None
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        n_text = cfg.max_text_len if cfg.text_token_dim else 0
        self.seq_len = n_text + 4 + int(cfg.self_cond)
        self.pos = nn.Parameter(torch.randn(self.seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.head_dim, cfg.ff_mult, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm_out = nn.LayerNorm(d) if cfg.norm_out else nn.Identity()
        self.out = nn.Linear(d, e)

    # -- embedding scale ----------------------------------------------------------------------------------------

    @property
    def image_embed_scale(self) -> float:
        """sqrt(embed_dim): maps unit-norm CLIP embeddings to roughly unit per-coordinate variance."""
        return math.sqrt(self.cfg.embed_dim)

    def scale_embed(self, image_embed: Tensor) -> Tensor:
        """CLIP image embedding -> the diffused variable (a new tensor; the input is never modified)."""
        return image_embed * self.image_embed_scale

    def unscale_embed(self, x: Tensor) -> Tensor:
        """The diffused variable -> CLIP image embedding units (a new tensor)."""
        return x / self.image_embed_scale

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
        self_cond: Tensor | None = None,
    ) -> Tensor:
        """Predict x0 (or v) of the scaled image embedding ``x`` (B, embed_dim) at model time ``t`` (B,).

        Args:
            text_embed: (B, embed_dim) CLIP text embedding.
            text_tokens, text_mask: (B, L, text_token_dim) per-token encodings and (B, L) validity, L <= max_text_len.
            drop_text: (B,) bool; True conditions that sample on nothing (null text embedding, no text tokens).
            self_cond: (B, embed_dim) previous x0 estimate (scaled units); zeros when None.
        """
        cfg = self.cfg
        b, dev = x.shape[0], x.device
        t = torch.as_tensor(t, device=dev).float().expand(b)
        if drop_text is None:
            drop_text = torch.zeros(b, dtype=torch.bool, device=dev)
        drop = drop_text.to(dev).bool()
        dtype = self.text_embed_in.weight.dtype
        text_embed = torch.where(drop[:, None], self.null_text_embed.to(dtype), text_embed.to(dtype))
        seq, keep = [], []
        if self.text_tokens_in is not None:
            if text_tokens is None:
                raise ValueError("this prior has text_token_dim > 0: pass text_tokens (and text_mask)")
            L = text_tokens.shape[1]
            if cfg.max_text_len < L:
                raise ValueError(f"{L} text tokens exceed max_text_len={cfg.max_text_len}; truncate in the tokenizer")
            tok = self.text_tokens_in(text_tokens.to(dtype))
            tok_keep = torch.ones(b, L, dtype=torch.bool, device=dev) if text_mask is None else text_mask.bool()
            tok_keep = tok_keep & ~drop[:, None]
            pad = cfg.max_text_len - L  # pad to a fixed length so positions mean the same thing in every batch
            seq.append(F.pad(tok, (0, 0, 0, pad)))
            keep.append(F.pad(tok_keep, (0, pad), value=False))
        elif text_tokens is not None:
            raise ValueError("this prior was built with text_token_dim=0 and cannot take text_tokens")
        fixed = [
            self.text_embed_in(text_embed),
            self.time_mlp(timestep_embedding(t, cfg.width)),
            self.image_in(x.to(dtype)),
        ]
        if self.self_cond_in is not None:
            fixed.append(self.self_cond_in(torch.zeros_like(x) if self_cond is None else self_cond.to(dtype)))
        fixed.append(self.query.to(dtype).expand(b, -1))
        seq.append(torch.stack(fixed, 1))
        keep.append(torch.ones(b, len(fixed), dtype=torch.bool, device=dev))
        h = torch.cat(seq, 1) + self.pos  # (B, N, D)
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        # every token may see itself, so masked (padding or dropped) positions never form all-masked rows (NaN)
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        mask = ((causal[None] & torch.cat(keep, 1)[:, None, :]) | eye)[:, None]  # (B, 1, N, N)
        for i, block in enumerate(self.blocks):
            h = block(h, mask, last_only=i == len(self.blocks) - 1)
        return self.out(self.norm_out(h[:, -1]))  # the query token's output, (B, embed_dim)
