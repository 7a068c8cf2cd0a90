"""SD3 ControlNet keys: the released SD3.5 files <-> diffusers ``SD3ControlNetModel``, and detection from keys.

The SD3.5-Large ControlNet files (``sd3.5_large_controlnet_{blur,canny,depth}.safetensors``) already use
diffusers-like names for their embedders (``time_text_embed.*``, ``pos_embed_input.proj.*``,
``controlnet_blocks.N.*``) but the reference's names inside the blocks (``transformer_blocks.N.attn.qkv``,
``mlp.fc1``, ``adaLN_modulation.1``); they also carry an unused ``pos_embed.proj`` and a ``control_type`` tensor.
Diffusers' joint-free variant (``joint_attention_dim=None``, ``use_pos_embed=False``) splits q/k/v and renames
the rest; it has neither extra. SD3-Medium-style diffusers ControlNets (joint blocks with text tokens, their own
positional table) are a different network and are refused with a clear error.

A leaf module: plain dict-of-tensor transforms, no model classes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

# official (inside transformer_blocks.N.) -> diffusers; a tuple is the q/k/v split of the fused projection
_BLOCK_RULES: list[tuple[str, str | tuple[str, str, str]]] = [
    ("attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("attn.proj", "attn.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.1", "norm1.linear"),
]
# the same names in both layouts
_SHARED = re.compile(r"^(time_text_embed\.|pos_embed_input\.proj\.|controlnet_blocks\.\d+\.)")
_OFFICIAL_ONLY = ("pos_embed.proj.weight", "pos_embed.proj.bias", "control_type")
CONTROL_TYPE_NAMES = ("blur", "canny", "depth")


def _depth(sd: Mapping[str, Tensor]) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"controlnet_blocks\.(\d+)\.weight$", k))]
    if not idx:
        raise ValueError("no controlnet_blocks.N.weight keys: this is not an SD3 ControlNet state dict")
    return max(idx) + 1


def controlnet_official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official SD3.5 ControlNet keys -> diffusers ``SD3ControlNetModel`` (joint-free) keys; the unused
    ``pos_embed.proj`` and ``control_type`` are dropped, as diffusers' own converter does."""
    out: dict[str, Tensor] = {}
    used = set(_OFFICIAL_ONLY)
    for key, t in sd.items():
        if _SHARED.match(key):
            out[key] = t
            used.add(key)
    for n in range(_depth(sd)):
        for src, dst in _BLOCK_RULES:
            for suffix in ("weight", "bias"):
                key = f"transformer_blocks.{n}.{src}.{suffix}"
                if key not in sd:
                    continue
                used.add(key)
                names = dst if isinstance(dst, tuple) else (dst,)
                parts = sd[key].chunk(len(names), dim=0)
                for name, part in zip(names, parts, strict=True):
                    out[f"transformer_blocks.{n}.{name}.{suffix}"] = part
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"unrecognised SD3 ControlNet keys (first few): {unknown[:5]}")
    return out


def controlnet_diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``SD3ControlNetModel`` (joint-free) keys -> official keys (q/k/v concatenated). ``pos_embed.proj``
    is kept when the folder has it (saved after a pipeline attached the base model's); ``control_type`` is not
    stored by diffusers and must come from elsewhere."""
    if any(k.startswith("context_embedder.") or ".attn.add_q_proj." in k for k in sd):
        raise ValueError(
            "this diffusers ControlNet has text tokens or its own positional table (an SD3-Medium-style "
            "ControlNet such as InstantX's); t2i loads the SD3.5 ControlNets (joint_attention_dim=None)"
        )
    out: dict[str, Tensor] = {}
    # a folder saved after diffusers' pipeline attached the base model's patch embedding also holds the base's
    # positional table: the tokens come from the base model at run time, so it is not needed
    used: set[str] = {"pos_embed.pos_embed"}
    for key, t in sd.items():
        if _SHARED.match(key) or key.startswith("pos_embed.proj."):
            out[key] = t
            used.add(key)
    for n in range(_depth(sd)):
        for src, dst in _BLOCK_RULES:
            names = dst if isinstance(dst, tuple) else (dst,)
            for suffix in ("weight", "bias"):
                keys = [f"transformer_blocks.{n}.{name}.{suffix}" for name in names]
                if not all(k in sd for k in keys):
                    continue
                used.update(keys)
                out[f"transformer_blocks.{n}.{src}.{suffix}"] = torch.cat([sd[k] for k in keys], dim=0)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"unrecognised diffusers SD3 ControlNet keys (first few): {unknown[:5]}")
    return out


def detect_controlnet(sd: Mapping[str, Tensor], *, head_dim: int = 64) -> dict:
    """``ControlNetConfig`` fields from official keys and shapes (diffusers keys are converted first).

    The head width is not in the weights (no QK-norm); the released models use 64. ``control_type`` comes from the
    file's tensor when present (absent from diffusers folders: the caller decides)."""
    if any(".attn.to_q." in k for k in sd):
        sd = controlnet_diffusers_to_official(sd)
    need = ("pos_embed_input.proj.weight", "time_text_embed.text_embedder.linear_1.weight",
            "transformer_blocks.0.mlp.fc1.weight")  # fmt: skip
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"the ControlNet weights lack {', '.join(missing)}; the file is incomplete or another model")
    D, in_ch, p, _ = sd["pos_embed_input.proj.weight"].shape
    ln_k = [k for k in sd if re.match(r"transformer_blocks\.\d+\.attn\.ln_k\.weight$", k)]
    if ln_k:  # QK-norm (ControlNets trained by t2i from an SD3.5-style base) also gives the head width
        head_dim = int(sd[ln_k[0]].shape[0])
    if D % head_dim:
        raise ValueError(f"ControlNet width {D} is not a multiple of head_dim {head_dim}; pass the right head_dim")
    params = {
        "depth": _depth(sd),
        "num_heads": int(D) // head_dim,
        "head_dim": head_dim,
        "patch_size": int(p),
        "in_channels": int(in_ch),
        "pooled_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "mlp_ratio": sd["transformer_blocks.0.mlp.fc1.weight"].shape[0] / D,
        "qk_norm": "rms" if ln_k else None,
        "stored_patch_embed": "pos_embed.proj.weight" in sd,
    }
    if "control_type" in sd:
        kind = int(sd["control_type"].flatten()[0])
        if not 0 <= kind < len(CONTROL_TYPE_NAMES):
            raise ValueError(f"control_type {kind} is none of {CONTROL_TYPE_NAMES} (0, 1, 2)")
        params["control_type"] = CONTROL_TYPE_NAMES[kind]
    return params


def diffusers_controlnet_config_to_params(config: Mapping) -> dict:
    """``config.json`` of a diffusers ``SD3ControlNetModel`` folder -> ControlNet config fields."""
    if config.get("joint_attention_dim") is not None or config.get("use_pos_embed", True):
        raise ValueError(
            "this diffusers ControlNet has text tokens or its own positional table (joint_attention_dim / "
            "use_pos_embed set: an SD3-Medium-style ControlNet); t2i loads the SD3.5 ControlNets"
        )
    if config.get("extra_conditioning_channels", 0):
        raise ValueError("ControlNets with extra conditioning channels (inpainting ControlNets) are not supported")
    return {
        "depth": int(config["num_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "head_dim": int(config["attention_head_dim"]),
        "patch_size": int(config.get("patch_size", 2)),
        "in_channels": int(config.get("in_channels", 16)),
        "pooled_dim": int(config.get("pooled_projection_dim", 2048)),
    }
