"""SD3 / SD3.5 checkpoint keys: official <-> diffusers converters and model detection from keys and shapes.

The official single files (``sd3.5_large.safetensors`` ...) store the MMDiT under ``model.diffusion_model.`` and
the VAE under ``first_stage_model.``, with the module names of the Stability reference; t2i's models use those
names, so an official file loads 1:1. Diffusers folders use other names, split q/k/v, and store the last context
block's and the final layer's adaLN rows as ``[scale; shift]`` instead of ``[shift; scale]``. The tables below are
the SD3.5 spec's §2.2 and §3.3 mapping, written once and run in both directions.

A leaf module: plain dict-of-tensor transforms, no model classes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from .safetensors_io import CheckpointMismatchError

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}

# official (inside joint_blocks.N.) -> diffusers (inside transformer_blocks.N.); tuples are q/k/v splits
_BLOCK_RULES: list[tuple[str, str | tuple[str, str, str]]] = [
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ("x_block.attn.ln_q", "attn.norm_q"),
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("x_block.attn2.ln_q", "attn2.norm_q"),
    ("x_block.attn2.ln_k", "attn2.norm_k"),
    ("x_block.attn.proj", "attn.to_out.0"),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
]
_TOP_RULES: list[tuple[str, str]] = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
]


def _swap_halves(t: Tensor) -> Tensor:
    """``[shift; scale]`` <-> ``[scale; shift]`` along dim 0 (adaLN rows; its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def split_official_checkpoint(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split an official single file into ``{"transformer", "vae", "clip_l", "clip_g", "t5xxl"}`` (present parts)."""
    parts = {"transformer": strip_prefix(sd, TRANSFORMER_PREFIX), "vae": strip_prefix(sd, VAE_PREFIX)}
    for name, prefix in TEXT_PREFIXES.items():
        parts[name] = strip_prefix(sd, prefix)
    return {k: v for k, v in parts.items() if v}


# ----------------------------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------------------------


def _depth(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not idx:
        raise ValueError("no transformer blocks found; is this an SD3 transformer state dict?")
    return max(idx) + 1


def _transformer_plan(last: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every transformer tensor as ``(official key, its diffusers key(s), swap adaLN halves)``: the one table both
    directions read. An official fused qkv maps to three diffusers tensors (split / concatenated along dim 0)."""
    plan = [("pos_embed", ("pos_embed.pos_embed",), False)]
    for src, dst in _TOP_RULES:
        for suffix in ("weight", "bias"):
            plan.append((f"{src}.{suffix}", (f"{dst}.{suffix}",), src == "final_layer.adaLN_modulation.1"))
    for n in range(last + 1):
        for src, dst in _BLOCK_RULES:
            names = dst if isinstance(dst, tuple) else (dst,)
            # the pre-only last block's 2-chunk adaLN is AdaLayerNormContinuous in diffusers: halves swapped
            swap = n == last and src == "context_block.adaLN_modulation.1"
            for suffix in ("weight", "bias"):
                ours = tuple(f"transformer_blocks.{n}.{name}.{suffix}" for name in names)
                plan.append((f"joint_blocks.{n}.{src}.{suffix}", ours, swap))
    return plan


def _convert_transformer(sd: dict[str, Tensor], *, to_diffusers: bool) -> tuple[dict[str, Tensor], list[str]]:
    """(converted state dict, source keys no rule used) along ``_transformer_plan``."""
    pattern = r"joint_blocks\.(\d+)\." if to_diffusers else r"transformer_blocks\.(\d+)\."
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for official, diffusers, swap in _transformer_plan(_depth(sd, pattern) - 1):
        keys = (official,) if to_diffusers else diffusers
        if not all(k in sd for k in keys):
            continue
        used.update(keys)
        if to_diffusers:
            t = _swap_halves(sd[official]) if swap else sd[official]
            out.update(zip(diffusers, t.chunk(len(diffusers), dim=0) if len(diffusers) > 1 else (t,), strict=True))
        else:
            t = torch.cat([sd[k] for k in diffusers], dim=0)
            out[official] = _swap_halves(t) if swap else t
    return out, sorted(set(sd) - used)


def transformer_official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official MMDiT keys (prefix already stripped) -> ``SD3Transformer2DModel`` keys."""
    sd = dict(sd)
    if any(k.startswith(TRANSFORMER_PREFIX) for k in sd):
        sd = strip_prefix(sd, TRANSFORMER_PREFIX)
    out, unknown = _convert_transformer(sd, to_diffusers=True)
    if unknown:
        raise ValueError(f"unrecognised official MMDiT keys (first few): {unknown[:5]}; not an SD3 transformer?")
    return out


def transformer_diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``SD3Transformer2DModel`` keys -> official MMDiT keys (q/k/v concatenated, adaLN halves swapped back)."""
    out, unknown = _convert_transformer(dict(sd), to_diffusers=False)
    if unknown:
        raise ValueError(f"unrecognised diffusers SD3 transformer keys (first few): {unknown[:5]}")
    return out


def require_keys(sd: Mapping[str, Tensor], keys, what: str) -> None:
    """One ``CheckpointMismatchError`` naming every key of ``keys`` that ``sd`` lacks (instead of a bare KeyError)."""
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointMismatchError(
            f"the {what} weights lack {len(missing)} key(s) that give its shape: {', '.join(missing)}; "
            "the file is incomplete or holds a different model"
        )


def detect_transformer(sd: Mapping[str, Tensor], *, head_dim: int | None = None) -> dict:
    """MMDiT config fields and a model name from official keys and shapes (the reference loader's rules).

    The head width is read from the QK-norm weights when present; without QK-norm (SD3-Medium) it is the
    released models' 64 unless ``head_dim`` is given. Returns ``{"name": ..., "params": {...}}`` where name is
    "sd3.5-large", "sd3.5-medium", "sd3-medium" or "custom".
    """
    if any(k.startswith("transformer_blocks.") for k in sd):
        sd = transformer_diffusers_to_official(sd)
    if any(k.startswith(TRANSFORMER_PREFIX) for k in sd):
        sd = strip_prefix(sd, TRANSFORMER_PREFIX)
    if "x_embedder.proj.weight" not in sd or "pos_embed" not in sd:
        raise ValueError("not an SD3 transformer: x_embedder.proj.weight or pos_embed is missing")
    require_keys(sd, ("final_layer.linear.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
                      "joint_blocks.0.x_block.mlp.fc1.weight"), "SD3 transformer")  # fmt: skip
    D, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    depth = _depth(sd, r"joint_blocks\.(\d+)\.")
    # QK-norm from any block that has it: one lost key must be reported as missing, not turn QK-norm off and make
    # every other block's norm weights "unexpected"
    ln_k = sorted(k for k in sd if re.match(r"joint_blocks\.\d+\.(context|x)_block\.attn\.ln_k\.weight$", k))
    qk = bool(ln_k)
    if qk:
        head_dim = int(sd[ln_k[0]].shape[0])
    head_dim = head_dim or 64
    if D % head_dim:
        raise ValueError(f"hidden size {D} is not a multiple of head_dim {head_dim}; pass the right head_dim")
    P = math.isqrt(sd["pos_embed"].shape[1])
    dual = tuple(
        sorted(int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$", k)))
    )
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    params = {
        "depth": depth,
        "num_heads": D // head_dim,
        "head_dim": head_dim,
        "patch_size": int(p),
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "context_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_dim": int(sd["y_embedder.mlp.0.weight"].shape[1]),
        "pos_embed_max_size": P,
        "qk_norm": "rms" if qk else None,
        "x_block_self_attn_layers": dual,
        "mlp_ratio": sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / D,
    }
    official = 64 * depth == D and head_dim == 64 and p == 2 and in_ch == 16
    if official and depth == 38 and qk and not dual and P == 192:
        name = "sd3.5-large"
    elif official and depth == 24 and qk and dual == tuple(range(13)) and P == 384:
        name = "sd3.5-medium"
    elif official and depth == 24 and not qk and not dual and P == 192:
        name = "sd3-medium"
    else:
        name = "custom"
    return {"name": name, "params": params}


def diffusers_transformer_config_to_params(config: Mapping) -> dict:
    """``transformer/config.json`` of a diffusers SD3 folder -> MMDiT config fields."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    if config.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
        raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim in SD3 models")
    qk = config.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"unsupported qk_norm {qk!r} (SD3 models use 'rms_norm' or none)")
    return {
        "depth": int(config["num_layers"]),
        "num_heads": heads,
        "head_dim": head_dim,
        "patch_size": int(config.get("patch_size", 2)),
        "in_channels": int(config.get("in_channels", 16)),
        "out_channels": config.get("out_channels"),
        "context_dim": int(config.get("joint_attention_dim", 4096)),
        "pooled_dim": int(config.get("pooled_projection_dim", 2048)),
        "pos_embed_max_size": int(config.get("pos_embed_max_size", 96)),
        "pos_embed_base_size": int(config.get("sample_size", 128)) // int(config.get("patch_size", 2)),
        "qk_norm": "rms" if qk == "rms_norm" else None,
        "x_block_self_attn_layers": tuple(config.get("dual_attention_layers", ()) or ()),
    }


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_levels(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not idx:
        raise ValueError("no VAE encoder/decoder levels found; is this an SD3 VAE state dict?")
    return max(idx) + 1


# Official (ldm) -> diffusers renames, read in both directions: ``{p}`` is encoder or decoder, ``{i}`` / ``{j}`` an
# index; the decoder's level order (reversed in diffusers) and the attention layers are handled in ``_vae_convert``.
_VAE_RENAMES = [
    ("^{p}.norm_out.", "{p}.conv_norm_out."),
    ("^encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("^encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".nin_shortcut.", ".conv_shortcut."),
]
_FIELDS = {"p": "(?P<p>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)"}


def _rename_rule(src: str, dst: str) -> tuple[re.Pattern, str]:
    """A template pair as (regex over ``src`` keys, replacement producing ``dst``)."""
    anchored = src.startswith("^")
    parts = re.split(r"\{(\w)\}", src.removeprefix("^"))  # literal, field, literal, field, ...
    regex = "".join(_FIELDS[x] if k % 2 else re.escape(x) for k, x in enumerate(parts))
    return re.compile(("^" if anchored else "") + regex), re.sub(r"\{(\w)\}", r"\\g<\1>", dst.removeprefix("^"))


def _vae_convert(sd: dict[str, Tensor], *, to_diffusers: bool) -> dict[str, Tensor]:
    rules = [_rename_rule(*(pair if to_diffusers else pair[::-1])) for pair in _VAE_RENAMES]
    up = (
        r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$"
        if to_diffusers
        else r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$"
    )
    levels = _vae_levels(sd, up)
    attn = _VAE_ATTN if to_diffusers else {v: k for k, v in _VAE_ATTN.items()}
    attn_key = r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$" if to_diffusers else (
        r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$")  # fmt: skip
    out = {}
    for key, t in sd.items():
        new = key
        for regex, repl in rules:
            new = regex.sub(repl, new)
        if m := re.match(up, new):
            b = levels - 1 - int(m.group(1))  # diffusers counts decoder levels from the bottleneck up
            if to_diffusers:
                new = f"decoder.up_blocks.{b}.{'resnets' if m.group(2) == 'block' else 'upsamplers.0'}.{m.group(3)}"
            else:
                new = f"decoder.up.{b}.{'block' if m.group(2) == 'resnets' else 'upsample'}.{m.group(3)}"
        if m := re.match(attn_key, new):
            middle = "mid_block.attentions.0" if to_diffusers else "mid.attn_1"
            new = f"{m.group(1)}.{middle}.{attn[m.group(2)]}.{m.group(3)}"
            if to_diffusers and t.ndim == 4:
                t = t[:, :, 0, 0]  # the official 1x1 attention convs are Linear layers in diffusers
            elif not to_diffusers and t.ndim == 2:
                t = t[:, :, None, None]
        out[new] = t
    return out


def vae_official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official (ldm) VAE keys -> diffusers ``AutoencoderKL`` keys; 1x1 attention convs become Linear weights."""
    sd = dict(sd)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = strip_prefix(sd, VAE_PREFIX)
    return _vae_convert(sd, to_diffusers=True)


def vae_diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` keys -> official (ldm) VAE keys; the inverse of ``vae_official_to_diffusers``."""
    bad = [k for k in sd if k.startswith(("quant_conv.", "post_quant_conv."))]
    if bad:
        raise ValueError(f"{bad[0]}: SD3 VAEs have no quant convs; this is a different autoencoder")
    return _vae_convert(dict(sd), to_diffusers=False)


def detect_vae(sd: Mapping[str, Tensor]) -> dict:
    """VAE config fields (channels per level, blocks per level, latent channels) from official keys and shapes."""
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        sd = vae_diffusers_to_official(sd)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = strip_prefix(sd, VAE_PREFIX)
    levels = _vae_levels(sd, r"encoder\.down\.(\d+)\.")
    needed = ["encoder.conv_in.weight", "decoder.conv_in.weight"]
    require_keys(sd, needed + [f"encoder.down.{i}.block.0.conv1.weight" for i in range(levels)], "VAE")
    chans = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    blocks = _vae_levels(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    return {
        "block_out_channels": chans,
        "layers_per_block": blocks,
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
    }
