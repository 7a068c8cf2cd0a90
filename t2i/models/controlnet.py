"""ControlNet for SD3 / SD3.5 (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models";
the SD3.5-Large blur / canny / depth ControlNets of the sd3.5 reference's ``dit_embedder.py``).

The network is a small DiT beside the MMDiT: plain DiT blocks over the image tokens only (no text tokens, no
QK-norm), its own timestep and pooled-text embedders, a patch embedding of the VAE-encoded control image added to
the base model's own patch tokens, and after every block a zero-initialised Linear whose output is one residual
for the MMDiT's image stream (``MMDiT.forward(controlnet_residuals=...)``; which block takes which residual is
``t2i.models.mmdit.controlnet_block_picker``).

Module names equal the keys of the released files (``time_text_embed.timestep_embedder.linear_1``,
``pos_embed_input.proj``, ``transformer_blocks.N.attn.qkv``, ``controlnet_blocks.N``, the ``control_type``
buffer), so ``sd3.5_large_controlnet_*.safetensors`` loads with ``strict=True``; diffusers'
``SD3ControlNetModel`` folders go through ``t2i.io.controlnet``. The files also carry ``pos_embed.proj``, which the
8B forward pass never uses (it starts from the base model's tokens); it is kept only so the files load whole.

``ControlledMMDiT`` puts base model and controls together as one network with the MMDiT's call signature, so the
samplers, guidance and the pipeline treat a controlled model like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .mmdit import MMDiT, MMDiTConfig, PatchEmbed, StreamBlock, attention, timestep_embedding

# the released files' ``control_type`` values (sd3.5 reference: blur = 0, canny = 1, depth = 2)
CONTROL_TYPES: tuple[str, ...] = ("blur", "canny", "depth")
INPUT_RANGES = ("reference", "signed")


@dataclass(frozen=True)
class ControlNetConfig:
    depth: int = 19  # DiT blocks (= residuals); the SD3.5-Large ControlNets have 19 for the base's 38
    num_heads: int = 38  # the base model's heads: the residuals are added to its stream
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16  # VAE latent channels of the control image
    pooled_dim: int = 2048  # CLIP-L + CLIP-G pooled
    mlp_ratio: float = 4.0
    qk_norm: str | None = None  # "rms" for ControlNets copied from a QK-normed base (the released ones have none)
    control_type: str = "canny"  # a key of CONTROL_TYPES: what the control image shows
    # "reference": canny images enter the VAE as x*255*0.5+0.5, blur and depth as 2x-1 (the sd3.5 reference's
    # preprocessing, which the released nets were trained with); "signed": 2x-1 for every kind (diffusers'
    # pipeline, and the ControlNets `t2i train` makes, whose small VAEs only ever saw [-1, 1])
    input_range: str = "reference"
    stored_patch_embed: bool = True  # the official files' unused pos_embed.proj; diffusers folders lack it

    def __post_init__(self):
        if self.control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {CONTROL_TYPES}, got {self.control_type!r}")
        if self.input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {self.input_range!r}")
        if self.depth < 1:
            raise ValueError(f"a ControlNet needs at least one block, got depth={self.depth}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def block_config(self) -> MMDiTConfig:
        """The MMDiT config whose ``StreamBlock`` is this ControlNet's plain DiT block."""
        return MMDiTConfig(depth=self.depth, num_heads=self.num_heads, head_dim=self.head_dim,
                           patch_size=self.patch_size, in_channels=self.in_channels, pooled_dim=self.pooled_dim,
                           qk_norm=self.qk_norm, mlp_ratio=self.mlp_ratio)  # fmt: skip


PRESETS: dict[str, ControlNetConfig] = {
    # stabilityai/stable-diffusion-3.5-controlnets: 19 blocks on SD3.5-Large's 2432-wide stream
    "sd3.5-large-blur": ControlNetConfig(control_type="blur"),
    "sd3.5-large-canny": ControlNetConfig(control_type="canny"),
    "sd3.5-large-depth": ControlNetConfig(control_type="depth"),
    # for the "tiny" MMDiT of t2i.models.mmdit (4 heads of 8, patch 1, 4 channels)
    "tiny": ControlNetConfig(depth=2, num_heads=4, head_dim=8, patch_size=1, in_channels=4, pooled_dim=64),
}


class _TwoLinear(nn.Module):
    """Linear -> SiLU -> Linear stored as ``linear_1`` / ``linear_2`` (the file's embedder names)."""

    def __init__(self, in_dim: int, dim: int, **fk):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, **fk)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """``c = t_emb(t) + y_emb(pooled)`` (diffusers' ``CombinedTimestepTextProjEmbeddings``, the file's names)."""

    def __init__(self, dim: int, pooled_dim: int, freq_dim: int = 256, **fk):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = _TwoLinear(freq_dim, dim, **fk)
        self.text_embedder = _TwoLinear(pooled_dim, dim, **fk)

    def forward(self, t: Tensor, pooled: Tensor) -> Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        freqs = timestep_embedding(t, self.freq_dim).to(dtype)  # fp32 sinusoid, cos first (as the MMDiT's)
        return self.timestep_embedder(freqs) + self.text_embedder(pooled.to(dtype))


class ControlNet(nn.Module):
    """The SD3.5 ControlNet (the reference's ``ControlNetEmbedder`` in its 8B mode): control latent + base tokens ->
    one ``(B, N, D)`` residual per block.

    Args:
        cfg: architecture (``PRESETS``).
        dtype, device: where to build the parameters (``device="meta"`` for a full-size model in no memory).
    """

    def __init__(self, cfg: ControlNetConfig, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.cfg = cfg
        fk = {"dtype": dtype, "device": device}
        D = cfg.hidden_size
        block_cfg = cfg.block_config()
        if cfg.stored_patch_embed:
            self.pos_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, D, **fk)  # in the files, unused (see above)
        self.pos_embed_input = PatchEmbed(cfg.patch_size, cfg.in_channels, D, **fk)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_dim, **fk)
        self.transformer_blocks = nn.ModuleList(StreamBlock(block_cfg, **fk) for _ in range(cfg.depth))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D, **fk) for _ in range(cfg.depth))
        kind = CONTROL_TYPES.index(cfg.control_type)
        # a real tensor even on meta: it is configuration (one int), not a weight to be filled
        where = "cpu" if torch.device(device or "cpu").type == "meta" else device
        self.register_buffer("control_type", torch.tensor([kind], dtype=torch.int32, device=where))
        if torch.device(device or "cpu").type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Training from scratch: xavier linears, zero adaLN, and zero output Linears and control patch embedding,
        so a new ControlNet adds exactly nothing until it learns (ControlNet's "zero convolutions")."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (getattr(self, "pos_embed", None), self.pos_embed_input):
            if emb is None:
                continue
            nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        nn.init.zeros_(self.pos_embed_input.proj.weight)
        for blk in self.transformer_blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        for lin in self.controlnet_blocks:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @torch.no_grad()
    def init_from_base(self, base: MMDiT) -> None:
        """Copy the embedders and the first ``depth`` image streams of ``base`` (ControlNet's trainable copy), keep
        the zero output Linears and control patch embedding. An MMDiT-X block's second image attention has no
        place in a plain block: its weights and its three adaLN chunks are left out."""
        bc = base.cfg
        if (bc.hidden_size, bc.patch_size, bc.in_channels, bc.pooled_dim) != (
            self.cfg.hidden_size, self.cfg.patch_size, self.cfg.in_channels, self.cfg.pooled_dim):  # fmt: skip
            raise ValueError("the ControlNet's width, patch size, channels or pooled width differ from the base "
                             "model's; build it with controlnet_config_for(base.cfg, ...)")  # fmt: skip
        if self.cfg.depth > bc.depth:
            raise ValueError(f"a {self.cfg.depth}-block ControlNet cannot copy a {bc.depth}-block base model")
        if self.cfg.stored_patch_embed:
            self.pos_embed.load_state_dict(base.x_embedder.state_dict())
        tte = self.time_text_embed
        for ours, theirs in ((tte.timestep_embedder, base.t_embedder), (tte.text_embedder, base.y_embedder)):
            ours.linear_1.load_state_dict(theirs.mlp[0].state_dict())
            ours.linear_2.load_state_dict(theirs.mlp[2].state_dict())
        if self.cfg.qk_norm != bc.qk_norm:
            raise ValueError(f"the base model's qk_norm is {bc.qk_norm!r}, the ControlNet's {self.cfg.qk_norm!r}; "
                             "build it with controlnet_config_for(base.cfg, ...)")  # fmt: skip
        D = self.cfg.hidden_size
        for i, blk in enumerate(self.transformer_blocks):
            src = {k: v for k, v in base.joint_blocks[i].x_block.state_dict().items() if not k.startswith("attn2.")}
            for k in ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias"):
                src[k] = src[k][: 6 * D]  # shift, scale, gate of attention and MLP; MMDiT-X's *_msa2 come after
            blk.load_state_dict(src)

    def forward(self, tokens: Tensor, control_latent: Tensor, t: Tensor, pooled: Tensor,
                scale: float = 1.0) -> list[Tensor]:  # fmt: skip
        """Residuals for the MMDiT's image stream.

        ``tokens (B, N, D)``: the base model's ``embed_patches(x_t)``; ``control_latent (B, C, H, W)``: the
        VAE-encoded control image in MMDiT latent space; ``t (B,)`` in [0, 1000]; ``pooled (B, pooled_dim)``.
        """
        dtype = self.controlnet_blocks[0].weight.dtype
        c = self.time_text_embed(t, pooled)  # (B, D)
        h = tokens.to(dtype) + self.pos_embed_input(control_latent.to(dtype))  # (B, N, D)
        out = []
        for blk, lin in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            qkv, _, mod = blk.pre_attention(h, c)
            h = blk.post_attention(h, attention(*qkv), None, mod)
            out.append(lin(h) * scale)
        return out


def controlnet_config_for(base: MMDiTConfig, depth: int, control_type: str = "canny",
                          input_range: str = "signed") -> ControlNetConfig:  # fmt: skip
    """A ControlNet config that fits ``base``: its width, heads, patch, channels and pooled width."""
    return ControlNetConfig(depth=depth, num_heads=base.heads, head_dim=base.head_dim, patch_size=base.patch_size,
                            in_channels=base.in_channels, pooled_dim=base.pooled_dim, mlp_ratio=base.mlp_ratio,
                            qk_norm=base.qk_norm, control_type=control_type, input_range=input_range)  # fmt: skip


def load_controlnet(path, *, control_type: str | None = None, dtype: torch.dtype = torch.float32) -> ControlNet:
    """A ControlNet from a t2i model file, an official SD3.5 ControlNet file, or a diffusers ``SD3ControlNetModel``
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``). Built on ``meta`` and filled tensor by
    tensor, so an 8B-sized ControlNet never exists twice in memory.

    ``control_type`` names what the control image shows when the weights do not say it (diffusers folders store
    no kind: the folder name is searched for blur / canny / depth, else canny) or overrides it.
    """
    import json
    from pathlib import Path

    from t2i.io import check_state_dict
    from t2i.io.controlnet import (
        controlnet_diffusers_to_official,
        detect_controlnet,
        diffusers_controlnet_config_to_params,
    )

    from .files import load_model_file, model_file_name
    from .sd3_loading import read_safetensors

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ControlNet at {path}: give a .safetensors file or a diffusers folder")
    if path.is_dir():
        cfg_file, weights = path / "config.json", path / "diffusion_pytorch_model.safetensors"
        if not (cfg_file.is_file() and weights.is_file()):
            raise FileNotFoundError(f"{path} is not a diffusers ControlNet folder: it needs config.json and "
                                    "diffusion_pytorch_model.safetensors")  # fmt: skip
        params = diffusers_controlnet_config_to_params(json.loads(cfg_file.read_text(encoding="utf-8")))
        sd = controlnet_diffusers_to_official(read_safetensors(weights, dtype=dtype))
        guess = next((k for k in CONTROL_TYPES if k in path.name.lower()), "canny")
        params.update(control_type=control_type or guess, input_range="signed",
                      stored_patch_embed="pos_embed.proj.weight" in sd)  # fmt: skip
        sd["control_type"] = torch.tensor([CONTROL_TYPES.index(params["control_type"])], dtype=torch.int32)
    elif model_file_name(path) == "sd3_controlnet":
        net, _ = load_model_file(path, dtype=dtype, expect="sd3_controlnet")
        if control_type is not None and control_type != net.cfg.control_type:
            raise ValueError(f"{path} is a {net.cfg.control_type} ControlNet trained by t2i; its kind cannot be "
                             f"changed to {control_type}")  # fmt: skip
        return net.eval()
    else:
        sd = read_safetensors(path, dtype=dtype)
        params = detect_controlnet(sd)
        params.setdefault("control_type", "canny")
        if control_type is not None:
            params["control_type"] = control_type
            sd["control_type"] = torch.tensor([CONTROL_TYPES.index(control_type)], dtype=torch.int32)
    if params["control_type"] not in CONTROL_TYPES:
        raise ValueError(f"control_type must be one of {CONTROL_TYPES}, got {params['control_type']!r}")
    net = ControlNet(ControlNetConfig(**params), device="meta", dtype=dtype)
    check_state_dict(net.state_dict(), sd, what=f"ControlNet {path.name}")
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()


@dataclass
class ActiveControl:
    """One control while sampling: its network, strength, and the model-time interval ``[low, high]`` where it
    acts (outside it the control adds nothing and its network is not run)."""

    net: ControlNet
    scale: float = 1.0
    interval: tuple[float, float] = (float("-inf"), float("inf"))


class ControlledMMDiT(nn.Module):
    """An MMDiT plus controls, with the MMDiT's call signature: ``(x, t, context, pooled, skip_layers,
    control_latents)``, where ``control_latents (B, K, C, H, W)`` holds the K controls' VAE latents per sample
    (batch-first, so classifier-free guidance repeats them over its two branches like any other input).

    The residuals of all controls active at ``t`` are summed; ``layout`` is the injection convention
    (``controlnet_block_picker``).
    """

    def __init__(self, base: MMDiT, controls: Sequence[ActiveControl], layout: str = "reference"):
        super().__init__()
        self.base, self.controls, self.layout = base, list(controls), layout
        self.cfg = base.cfg
        self.nets = nn.ModuleList(c.net for c in self.controls)  # so .to() and offloading move them too

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def residuals(self, x: Tensor, t: Tensor, pooled: Tensor, control_latents: Tensor) -> list[Tensor] | None:
        """The summed residuals of the controls active at ``t`` (None when none is)."""
        if control_latents.shape[1] != len(self.controls):
            raise ValueError(f"{control_latents.shape[1]} control latents for {len(self.controls)} controls")
        total: list[Tensor] | None = None
        tokens = None
        for k, ctl in enumerate(self.controls):
            lo, hi = ctl.interval
            if not bool(((t >= lo) & (t <= hi)).all()) or ctl.scale == 0:
                continue
            if tokens is None:
                tokens = self.base.embed_patches(x)
            res = ctl.net(tokens, control_latents[:, k], t, pooled, ctl.scale)
            if total is not None and len(res) != len(total):
                raise ValueError("controls used together must have the same number of blocks; sample with them "
                                 "one at a time or use ControlNets of one depth")  # fmt: skip
            total = res if total is None else [a + b for a, b in zip(total, res, strict=True)]
        return total

    def forward(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, skip_layers=(),
                control_latents: Tensor | None = None) -> Tensor:  # fmt: skip
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        res = self.residuals(x, t, pooled, control_latents) if control_latents is not None else None
        return self.base(x, t, context, pooled, skip_layers=skip_layers, controlnet_residuals=res,
                         controlnet_layout=self.layout)  # fmt: skip


__all__ = ["CONTROL_TYPES", "PRESETS", "ActiveControl", "ControlNet", "ControlNetConfig", "ControlledMMDiT",
           "controlnet_config_for", "load_controlnet"]  # fmt: skip
