"""MMDiT and MMDiT-X: the SD3 / SD3.5 denoiser (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Two token streams, text context and image patches, each with its own weights, meet in one joint attention per
block. SD3.5 adds RMS QK-normalisation, and SD3.5-Medium (MMDiT-X) a second, image-only self-attention in its
first 13 blocks. Module names equal the official checkpoint keys (``x_embedder``, ``joint_blocks.N.x_block.attn``,
``adaLN_modulation.1`` ...), so ``sd3.5_*.safetensors`` loads with ``strict=True`` and no remap; the diffusers
layout is one converter away (``t2i.io.sd3``).

Unlike the reference, head size and patch size are configurable (64 and 2 in every released model), so tiny test
models can use head size 8 and patch 1 as diffusers' own tests do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from t2i.nn.attention import attention as _attention
from t2i.nn.embeddings import timestep_embedding

# ----------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24  # joint blocks
    num_heads: int | None = None  # None: = depth (the sd3.5 rule: hidden = 64 * depth)
    head_dim: int = 64  # per-head width; 64 in every released model
    patch_size: int = 2
    in_channels: int = 16  # SD3 VAE latent channels
    out_channels: int | None = None  # None: = in_channels
    context_dim: int = 4096  # T5 width; CLIP tokens are zero-padded to it
    pooled_dim: int = 2048  # CLIP-L (768) + CLIP-G (1280) pooled
    pos_embed_max_size: int = 192  # P: the stored pos-embed grid is P x P patches
    pos_embed_base_size: int = 64  # sincos positions i / (P / base); only used for random init
    qk_norm: str | None = None  # "rms" (SD3.5) or None (SD3)
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X: blocks with the extra image self-attention
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be 'rms' or None, got {self.qk_norm!r}")
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"x_block_self_attn_layers {bad} outside 0..{self.depth - 1}")

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def hidden_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def out_ch(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels


_SD3_MEDIUM = MMDiTConfig(depth=24, pos_embed_max_size=192)
# diffusers' own test transformer (test_models_transformer_sd3.py)
_TINY = MMDiTConfig(
    depth=4,
    num_heads=4,
    head_dim=8,
    patch_size=1,
    in_channels=4,
    context_dim=32,
    pooled_dim=64,
    pos_embed_max_size=96,
    pos_embed_base_size=32,
)
PRESETS: dict[str, MMDiTConfig] = {
    "sd3-medium": _SD3_MEDIUM,
    "sd3.5-medium": replace(
        _SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13))
    ),
    "sd3.5-large": MMDiTConfig(depth=38, pos_embed_max_size=192, qk_norm="rms"),
    "sd3.5-large-turbo": MMDiTConfig(depth=38, pos_embed_max_size=192, qk_norm="rms"),  # same net, new weights
    # diffusers' own test transformer (test_models_transformer_sd3.py), SD3 and SD3.5 flavours
    "tiny": _TINY,
    "tiny-x": replace(_TINY, qk_norm="rms", x_block_self_attn_layers=(0,)),
    # the 4-layer, 9M-parameter config that benchmarks/vs_diffusers.py times against diffusers
    "bench": MMDiTConfig(depth=4, num_heads=4, head_dim=64, patch_size=2, in_channels=16, context_dim=256,
                         pooled_dim=128, pos_embed_max_size=96, pos_embed_base_size=16, qk_norm="rms"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int) -> Tensor:
    """The fixed ``(grid*grid, dim)`` 2-D sincos table SD3 ships: first half x (column), second half y (row).

    Positions are ``i / (grid / base_size)``, as diffusers' ``PatchEmbed`` computes them; only needed for random
    init, because the official files carry the buffer.
    """
    if dim % 4:
        raise ValueError(f"2-D sincos embedding needs a width divisible by 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float64) / (grid / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def axis(p: Tensor) -> Tensor:  # (N,) -> (N, dim/2)
        out = p[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ys, xs = torch.meshgrid(pos, pos, indexing="ij")  # row-major token order: row = y
    return torch.cat([axis(xs.flatten()), axis(ys.flatten())], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchify ``(B, C, H, W) -> (B, H/p * W/p, D)``, row-major tokens."""

    def __init__(self, patch: int, in_ch: int, dim: int, **fk):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch, bias=True, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, stored as ``mlp.0`` / ``mlp.2`` (the t and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int, **fk):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim, **fk), nn.SiLU(), nn.Linear(dim, dim, **fk))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class TimestepEmbedder(MLPEmbedder):
    def __init__(self, dim: int, freq_dim: int = 256, **fk):
        super().__init__(freq_dim, dim, **fk)
        self.freq_dim = freq_dim

    def forward(self, t: Tensor) -> Tensor:
        # the sinusoid is computed in fp32 and cast to the weights' dtype (autocast may still run the MLP lower)
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable weight; statistics in fp32 whatever the input dtype (as diffusers
    computes the variance), result in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, **fk):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **fk))

    def forward(self, x: Tensor) -> Tensor:
        # the fused kernel equals the pow/mean/rsqrt composite bit for bit and is several times faster on CPU
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class TanhGELU(nn.Module):
    """The reference's MLP activation, GELU with the tanh approximation, evaluated as the exact (erf) GELU on
    bf16/fp16 inputs. PyTorch's CPU kernel for the tanh form is 5x slower than the erf one (forward; 2.5x forward
    + backward) in both precisions, and in low precision the swap is invisible: the two functions differ by at most
    4.7e-4 (at x = 2.7, where one bf16 rounding step is 0.016), and on bf16 inputs each lands within 8e-3 of the
    fp64 tanh form. fp32 keeps the tanh form exactly, as the equivalence tests require."""

    def forward(self, x: Tensor) -> Tensor:
        low_precision = x.dtype in (torch.bfloat16, torch.float16)
        return F.gelu(x) if low_precision else F.gelu(x, approximate="tanh")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x (1 + scale) + shift`` with per-sample ``(B, D)`` shift and scale over ``(B, L, D)`` tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class Attention(nn.Module):
    """Fused ``qkv`` projection (rows ``[q; k; v]``, head-major), optional RMS QK-norm, output ``proj``."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, pre_only: bool = False, **fk):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=True, **fk)
        if not pre_only:
            self.proj = nn.Linear(heads * head_dim, dim, bias=True, **fk)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(head_dim, **fk)
            self.ln_k = RMSNorm(head_dim, **fk)
        else:
            self.ln_q = self.ln_k = None

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, D) -> 3 x (B, L, H, d)``, q and k normalised."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).unbind(2)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor, split: int | None = None):
    """Attention on ``(B, L, H, d)`` tensors, no mask: ``-> (B, L, H*d)``, or the two parts ``[:split]``, ``[split:]``
    along L, each contiguous (a strided input would take F.linear off its fused addmm path). The kernel is
    ``t2i.nn.attention``'s choice: SDPA, except the explicit math under bf16/fp16 autocast on CPU, where SDPA's
    flash backward took half of a training step of ``sd3-shapes``."""
    B, L, H, d = q.shape
    out = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, d)
    if split is None:
        return out.transpose(1, 2).reshape(B, L, H * d)
    # SDPA may hand back a (B, L, H, d)-major buffer, so the parts can be strided views: copy them explicitly
    a, b = out[:, :, :split].transpose(1, 2), out[:, :, split:].transpose(1, 2)
    return a.reshape(B, split, H * d).contiguous(), b.reshape(B, L - split, H * d).contiguous()


class StreamBlock(nn.Module):
    """One stream of a joint block (the reference's ``DismantledBlock``): adaLN, attention pieces, MLP.

    ``pre_only`` (the last block's context stream) only supplies q/k/v; ``x_self_attn`` adds MMDiT-X's ``attn2``.
    """

    def __init__(self, cfg: MMDiTConfig, *, pre_only: bool = False, x_self_attn: bool = False, **fk):
        super().__init__()
        D = cfg.hidden_size
        self.pre_only, self.x_self_attn = pre_only, x_self_attn
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.heads, cfg.head_dim, cfg.qk_norm, pre_only, **fk)
        if x_self_attn:
            self.attn2 = Attention(D, cfg.heads, cfg.head_dim, cfg.qk_norm, **fk)
        if not pre_only:
            hidden = int(D * cfg.mlp_ratio)
            self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Sequential()  # official keys mlp.fc1 / mlp.fc2
            self.mlp.add_module("fc1", nn.Linear(D, hidden, **fk))
            self.mlp.add_module("act", TanhGELU())
            self.mlp.add_module("fc2", nn.Linear(hidden, D, **fk))
        n = 2 if pre_only else (9 if x_self_attn else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, n * D, bias=True, **fk))

    def pre_attention(self, x: Tensor, c: Tensor):
        """q/k/v of this stream (and of ``attn2``), plus the modulation chunks ``post_attention`` needs."""
        mod = self.adaLN_modulation(c).chunk(self.adaLN_modulation[1].out_features // x.shape[-1], dim=1)
        h = self.norm1(x)
        qkv = self.attn.qkv_heads(modulate(h, mod[0], mod[1]))
        qkv2 = self.attn2.qkv_heads(modulate(h, mod[6], mod[7])) if self.x_self_attn else None
        return qkv, qkv2, mod

    def post_attention(self, x: Tensor, attn_out: Tensor, attn2_out: Tensor | None, mod) -> Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn_out)
        if attn2_out is not None:
            x = x + mod[8].unsqueeze(1) * self.attn2.proj(attn2_out)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Context and image streams sharing one attention over ``[context; image]`` tokens."""

    def __init__(self, cfg: MMDiTConfig, index: int, **fk):
        super().__init__()
        last = index == cfg.depth - 1
        self.context_block = StreamBlock(cfg, pre_only=last, **fk)
        self.x_block = StreamBlock(cfg, x_self_attn=index in cfg.x_block_self_attn_layers, **fk)
        self.fast = False  # opt-in fused path, see forward_fast

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        if self.fast:
            return self.forward_fast(context, x, c)
        (qc, kc, vc), _, mod_c = self.context_block.pre_attention(context, c)
        (qx, kx, vx), qkv2, mod_x = self.x_block.pre_attention(x, c)
        n_ctx = context.shape[1]
        q, k, v = torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1)  # (B, Lc+Lx, H, d)
        out_c, out_x = attention(q, k, v, split=n_ctx)
        out2 = attention(*qkv2) if qkv2 is not None else None  # MMDiT-X: image-only self-attention
        x = self.x_block.post_attention(x, out_x, out2, mod_x)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out_c, None, mod_c), x

    def forward_fast(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """The same block with less memory traffic: one concatenation of both streams' q/k/v instead of three,
        and in the last block neither context queries nor their attention rows (that block discards its context
        output, so only the context keys and values are needed)."""
        cb, xb = self.context_block, self.x_block
        B, Lc, D = context.shape
        Lx = x.shape[1]
        H, d = xb.attn.heads, xb.attn.head_dim
        mod_c = cb.adaLN_modulation(c).chunk(cb.adaLN_modulation[1].out_features // D, dim=1)
        mod_x = xb.adaLN_modulation(c).chunk(xb.adaLN_modulation[1].out_features // D, dim=1)
        hc = modulate(cb.norm1(context), mod_c[0], mod_c[1])
        nx = xb.norm1(x)
        hx = modulate(nx, mod_x[0], mod_x[1])
        if cb.pre_only:
            if type(cb.attn.qkv) is nn.Linear:
                w, b = cb.attn.qkv.weight, cb.attn.qkv.bias
                kv = F.linear(hc, w[D:], b[D:])  # rows [k; v] only
            else:  # a wrapped layer (e.g. LoRA) must run whole so that its own additions apply
                kv = cb.attn.qkv(hc)[..., D:]
            kc, vc = kv.view(B, Lc, 2, H, d).unbind(2)
            qx, kx, vx = xb.attn.qkv(hx).view(B, Lx, 3, H, d).unbind(2)
            if xb.attn.ln_q is not None:
                kc, qx, kx = cb.attn.ln_k(kc), xb.attn.ln_q(qx), xb.attn.ln_k(kx)
            out_x = attention(qx, torch.cat([kc, kx], 1), torch.cat([vc, vx], 1))
            out_c = None
        else:
            qkv = torch.cat([cb.attn.qkv(hc), xb.attn.qkv(hx)], 1).view(B, Lc + Lx, 3, H, d)
            q, k, v = qkv.unbind(2)
            if xb.attn.ln_q is not None:
                q = torch.cat([cb.attn.ln_q(q[:, :Lc]), xb.attn.ln_q(q[:, Lc:])], 1)
                k = torch.cat([cb.attn.ln_k(k[:, :Lc]), xb.attn.ln_k(k[:, Lc:])], 1)
            out_c, out_x = attention(q, k, v, split=Lc)
        out2 = None
        if xb.x_self_attn:
            q2, k2, v2 = xb.attn2.qkv(modulate(nx, mod_x[6], mod_x[7])).view(B, Lx, 3, H, d).unbind(2)
            if xb.attn2.ln_q is not None:
                q2, k2 = xb.attn2.ln_q(q2), xb.attn2.ln_k(k2)
            out2 = attention(q2, k2, v2)
        x = xb.post_attention(x, out_x, out2, mod_x)
        if cb.pre_only:
            return None, x
        return cb.post_attention(context, out_c, None, mod_c), x


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig, **fk):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_ch, bias=True, **fk)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D, bias=True, **fk))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """The SD3 / SD3.5 MMDiT(-X): ``(x_t, 1000 sigma, context, pooled) -> velocity``.

    Args:
        cfg: architecture (see ``PRESETS``).
        dtype, device: where to build the parameters; ``device="meta"`` builds an 8B model in no memory, to be
            filled with ``load_state_dict(..., assign=True)``.
    """

    def __init__(self, cfg: MMDiTConfig, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.cfg = cfg
        fk = {"dtype": dtype, "device": device}
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D, **fk)
        self.t_embedder = TimestepEmbedder(D, **fk)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, D, **fk)
        self.context_embedder = nn.Linear(cfg.context_dim, D, **fk)
        P = cfg.pos_embed_max_size
        self.register_buffer("pos_embed", torch.zeros(1, P * P, D, **fk))
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i, **fk) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, **fk)
        self.grad_checkpointing = False
        if torch.device(device or "cpu").type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT-style init for training from scratch: xavier linears, zero adaLN and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for blk in self.joint_blocks:
            for stream in (blk.context_block, blk.x_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
                nn.init.zeros_(stream.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        table = sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.pos_embed_max_size, self.cfg.pos_embed_base_size)
        self.pos_embed.copy_(table.unsqueeze(0))

    def set_fast_path(self, enabled: bool = True) -> None:
        """Opt-in fused block path (``JointBlock.forward_fast``); equal to the plain path up to fp rounding."""
        for block in self.joint_blocks:
            block.fast = enabled

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each joint block in the backward pass (opt-in; trades compute for activation memory)."""
        self.grad_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre ``h x w`` window of the stored P x P patch grid, flattened row-major: ``(1, h*w, D)``."""
        P, p = self.cfg.pos_embed_max_size, self.cfg.patch_size
        if h > P or w > P:
            raise ValueError(
                f"a latent of {h * p}x{w * p} needs a {h}x{w} patch grid, but this model's positional embedding "
                f"covers at most {P}x{P} patches ({P * p} latent pixels, about {P * p * 8} image pixels per side "
                "with the SD3 VAE); generate a smaller image"
            )
        top, left = (P - h) // 2, (P - w) // 2
        grid = self.pos_embed.view(1, P, P, -1)[:, top : top + h, left : left + w]
        return grid.reshape(1, h * w, -1)

    def embed_patches(self, x: Tensor) -> Tensor:
        """The image stream's input: patch tokens plus the cropped positional table, ``(B, C, H, W) -> (B, N, D)``
        (a ControlNet starts from the same tokens)."""
        _, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be divisible by the patch size {p}; resize the image")
        patches = self.x_embedder(x.to(self.dtype))  # (B, N, D)
        # the residual stream stays in the compute dtype (bf16 under autocast, as in diffusers), not promoted to
        # fp32 by the fp32 positional table, and contiguous (the patch tokens are a transposed view)
        return (patches + self.cropped_pos_embed(H // p, W // p)).to(patches.dtype).contiguous()

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        skip_layers: tuple[int, ...] | list[int] = (),
        controlnet_residuals: Sequence[Tensor] | None = None,
        controlnet_layout: str = "reference",
    ) -> Tensor:
        """Velocity for latents ``x (B, C, H, W)`` at timesteps ``t (B,)`` in [0, 1000].

        ``context (B, L, context_dim)`` are the text tokens, ``pooled (B, pooled_dim)`` the pooled text vector;
        the joint blocks listed in ``skip_layers`` are bypassed (skip-layer guidance). ``controlnet_residuals`` are
        n ``(B, N, D)`` ControlNet outputs added to the image stream after the blocks ``controlnet_block_picker``
        assigns them under ``controlnet_layout`` ("reference" or "diffusers").
        """
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        hp, wp = H // p, W // p
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        dtype = self.dtype
        h = self.embed_patches(x)  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(pooled.to(dtype))  # (B, D)
        ctx = self.context_embedder(context.to(dtype))  # (B, L, D)
        skip = set(skip_layers)
        pick = controlnet_block_picker(self.cfg.depth, len(controlnet_residuals or ()), controlnet_layout)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    ctx, h = checkpoint(block, ctx, h, c, use_reentrant=False)
                else:
                    ctx, h = block(ctx, h, c)
            elif controlnet_layout == "reference":
                continue  # the reference's loop skips the block and its residual together
            j = pick(i)
            if j is not None:
                h = h + controlnet_residuals[j].to(h.dtype)
        h = self.final_layer(h, c)  # (B, N, p*p*C)
        C = self.cfg.out_ch
        h = h.view(B, hp, wp, p, p, C).permute(0, 5, 1, 3, 2, 4)  # channel fastest within a token
        return h.reshape(B, C, H, W)


CONTROLNET_LAYOUTS = ("reference", "diffusers")


def controlnet_block_picker(depth: int, n: int, layout: str = "reference") -> Callable[[int], int | None]:
    """Which of ``n`` ControlNet residuals block ``i`` of a ``depth``-block MMDiT adds after itself (None: none).

    - "reference" (the sd3.5 reference, mmditx.py): ``i // (depth // n)`` after every block, the last included,
      and a block skipped by ``skip_layers`` adds nothing. For SD3.5-Large (38 blocks) and its 19-block
      ControlNets, residual k follows blocks 2k and 2k + 1.
    - "diffusers" (``SD3Transformer2DModel``): ``int(i / (depth / n))`` with a float interval, after every block
      but the last (its context stream is pre-only), skipped blocks included; so the last residual is added once
      instead of twice.
    """
    if layout not in CONTROLNET_LAYOUTS:
        raise ValueError(f"controlnet_layout must be one of {CONTROLNET_LAYOUTS}, got {layout!r}")
    if n == 0:
        return lambda i: None
    if n > depth:
        raise ValueError(f"{n} ControlNet residuals for a {depth}-block MMDiT; a ControlNet may have at most "
                         f"{depth} blocks")  # fmt: skip
    if layout == "reference":
        interval = depth // n
        if (depth - 1) // interval >= n:  # the reference would index past its last residual here
            raise ValueError(f"the reference layout cannot spread {n} ControlNet residuals over {depth} blocks "
                             f"(block {depth - 1} would need residual {(depth - 1) // interval}); use a ControlNet "
                             "whose depth divides the MMDiT's, or controlnet_layout='diffusers'")  # fmt: skip
        return lambda i: i // interval
    return lambda i: None if i == depth - 1 else int(i / (depth / n))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count (buffers such as ``pos_embed`` excluded), valid on ``meta`` models."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CONTROLNET_LAYOUTS",
    "PRESETS",
    "MMDiT",
    "MMDiTConfig",
    "controlnet_block_picker",
    "count_parameters",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]
