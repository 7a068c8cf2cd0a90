"""LoRA files: t2i's portable adapter layout, and the kohya and diffusers/peft layouts of the SD3 ecosystem.

t2i layout (``t2i.nn.lora.lora_state_dict``), keyed by the model's own module names (the official checkpoint
names for MMDiT):

    joint_blocks.0.x_block.attn.qkv.lora_down.weight  (r, in)
    joint_blocks.0.x_block.attn.qkv.lora_up.weight    (out, r)
    joint_blocks.0.x_block.attn.qkv.alpha             ()        scale = alpha / r

kohya (sd-scripts) uses the same tensors with the dots of the module name turned into underscores behind a
prefix (``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``). Mapping back needs the model's module
names, because module names contain underscores themselves.

diffusers/peft uses the diffusers module names (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``,
``lora_B``). Those names split the fused q/k/v projection in three, swap the two halves of some adaLN rows, and
keep no alpha in the tensors. Conversion therefore works as follows:

- a fused qkv adapter becomes three adapters that share ``lora_A``;
- three separate q/k/v adapters become one fused adapter, exactly: with a shared A the rank is kept, otherwise
  A is stacked and B is block-diagonal, so the rank triples;
- alpha/r is folded into ``lora_B`` on export, and reads back as alpha = r, so every conversion gives the same
  outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from t2i.errors import check_choice

from .safetensors_io import load_weights, read_metadata, save_weights

FORMATS = ("t2i", "kohya", "diffusers")
KOHYA_PREFIX = "lora_unet"
DIFFUSERS_PREFIX = "transformer"


def save_lora(path: str | os.PathLike, state: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None):
    """Write a LoRA state dict (any layout) as safetensors, with its layout recorded in the metadata."""
    fmt = detect_format(state)
    save_weights(path, state, metadata={"t2i_lora_format": fmt, **(metadata or {})})


def load_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata; only safetensors are read."""
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: LoRA files are read from .safetensors only; convert other formats first")
    return load_weights(path), read_metadata(path)


def detect_format(state: Mapping[str, Tensor]) -> str:
    keys = list(state)
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya" if all(k.startswith(KOHYA_PREFIX + "_") for k in keys) else "t2i"
    raise ValueError("not a LoRA state dict: no lora_down/lora_up or lora_A/lora_B weights found")


def _modules(state: Mapping[str, Tensor]) -> list[str]:
    return sorted({k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")})


# -- kohya ------------------------------------------------------------------------------------------------------


def to_kohya(state: Mapping[str, Tensor], prefix: str = KOHYA_PREFIX) -> dict[str, Tensor]:
    """t2i layout -> kohya layout (same tensors, underscored names)."""
    out = {}
    for m in _modules(state):
        k = f"{prefix}_{m.replace('.', '_')}"
        out[f"{k}.lora_down.weight"] = state[f"{m}.lora_down.weight"]
        out[f"{k}.lora_up.weight"] = state[f"{m}.lora_up.weight"]
        rank = state[f"{m}.lora_down.weight"].shape[0]
        out[f"{k}.alpha"] = state.get(f"{m}.alpha", torch.tensor(float(rank)))
    return out


def from_kohya(state: Mapping[str, Tensor], module_names: Iterable[str], prefix: str = KOHYA_PREFIX) -> dict:
    """kohya layout -> t2i layout, resolving underscored names against the target model's ``module_names``."""
    lookup = {f"{prefix}_{n.replace('.', '_')}": n for n in module_names}
    out, unknown = {}, []
    for k in _modules(state):
        if k not in lookup:
            unknown.append(k)
            continue
        m = lookup[k]
        out[f"{m}.lora_down.weight"] = state[f"{k}.lora_down.weight"]
        out[f"{m}.lora_up.weight"] = state[f"{k}.lora_up.weight"]
        rank = state[f"{k}.lora_down.weight"].shape[0]
        out[f"{m}.alpha"] = state.get(f"{k}.alpha", torch.tensor(float(rank)))
    if unknown:
        raise ValueError(f"{len(unknown)} kohya module(s) match no layer of the model, e.g. {unknown[:3]}")
    return out


# -- diffusers / peft (SD3 transformer) ---------------------------------------------------------------------


def _sd3_rules():
    from .sd3 import _BLOCK_RULES, _TOP_RULES

    return _BLOCK_RULES, _TOP_RULES


def _official_to_diffusers_name(m: str) -> str | tuple[str, str, str]:
    block_rules, top_rules = _sd3_rules()
    if match := re.match(r"joint_blocks\.(\d+)\.(.+)$", m):
        n, rest = match.groups()
        for src, dst in block_rules:
            if rest == src:
                if isinstance(dst, tuple):
                    return tuple(f"transformer_blocks.{n}.{d}" for d in dst)
                return f"transformer_blocks.{n}.{dst}"
    for src, dst in top_rules:
        if m == src:
            return dst
    raise ValueError(f"no diffusers name for MMDiT module {m!r}: LoRA on this layer cannot be exported")


def _swaps_halves(m: str, up: Tensor, down: Tensor) -> bool:
    # diffusers stores [scale; shift] where the official layout has [shift; scale]: the final layer's adaLN, and
    # the last (pre-only) context block's 2-chunk adaLN, recognisable by its out = 2 * in shape
    if m == "final_layer.adaLN_modulation.1":
        return True
    return m.endswith("context_block.adaLN_modulation.1") and up.shape[0] == 2 * down.shape[1]


def _swap(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_to_diffusers(state: Mapping[str, Tensor], prefix: str = DIFFUSERS_PREFIX) -> dict[str, Tensor]:
    """t2i layout on official MMDiT names -> diffusers/peft keys on ``SD3Transformer2DModel`` names."""
    out = {}
    pre = f"{prefix}." if prefix else ""
    for m in _modules(state):
        down, up = state[f"{m}.lora_down.weight"], state[f"{m}.lora_up.weight"]
        alpha = float(state.get(f"{m}.alpha", torch.tensor(float(down.shape[0]))))
        up = up * (alpha / down.shape[0])  # peft's default lora_alpha = r gives scale 1
        if _swaps_halves(m, up, down):
            up = _swap(up)
        name = _official_to_diffusers_name(m)
        if isinstance(name, tuple):
            for piece_name, piece in zip(name, up.chunk(3, dim=0), strict=True):
                out[f"{pre}{piece_name}.lora_A.weight"] = down.clone()
                out[f"{pre}{piece_name}.lora_B.weight"] = piece.contiguous()
        else:
            out[f"{pre}{name}.lora_A.weight"] = down
            out[f"{pre}{name}.lora_B.weight"] = up
    return out


PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers writes the peft LoraConfig here, as JSON


def _peft_pattern_key(patterns: Iterable[str], module: str) -> str:
    """peft's rule: a pattern applies to ``module`` when it matches the whole name or a dotted suffix of it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def peft_scales(metadata: Mapping[str, str] | None, targets: Iterable[str], prefix: str = DIFFUSERS_PREFIX) -> dict:
    """The scale peft applies to each diffusers target module, from a file's ``lora_adapter_metadata``.

    ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), with ``rank_pattern`` / ``alpha_pattern`` overriding per module,
    as ``StableDiffusion3Pipeline.load_lora_weights`` applies them. A file without that metadata gets scale 1
    (diffusers then sets lora_alpha = r).
    """
    raw = (metadata or {}).get(PEFT_METADATA_KEY)
    if not raw:
        return {t: 1.0 for t in targets}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"the LoRA file's {PEFT_METADATA_KEY} is not valid JSON ({err})") from None
    pre = f"{prefix}."
    if any(k.startswith(pre) for k in cfg):  # a pipeline-level file: one config per component, prefixed
        cfg = {k[len(pre) :]: v for k, v in cfg.items() if k.startswith(pre)}
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for t in targets:
        rr = ranks.get(_peft_pattern_key(ranks, t), r)
        aa = alphas.get(_peft_pattern_key(alphas, t), alpha)
        out[t] = float(aa) / (math.sqrt(rr) if cfg.get("use_rslora") else float(rr))
    return out


def sd3_from_diffusers(
    state: Mapping[str, Tensor], prefix: str = DIFFUSERS_PREFIX, *, metadata: Mapping[str, str] | None = None
) -> dict[str, Tensor]:
    """diffusers/peft SD3 LoRA -> t2i layout on official MMDiT names (alpha = rank, scale folded into up).

    ``metadata`` (the file's safetensors metadata) carries peft's lora_alpha and per-module patterns; without it the
    scale is 1, as diffusers assumes for a file without them.
    """
    pre = f"{prefix}." if prefix else ""
    plain = {(k[len(pre) :] if pre and k.startswith(pre) else k): v for k, v in state.items()}
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in plain if ".lora_A." in k})
    for t, scale in peft_scales(metadata, targets, prefix).items():
        if scale != 1.0:
            b = plain[f"{t}.lora_B.weight"]
            plain[f"{t}.lora_B.weight"] = (b.float() * scale).to(b.dtype)
    block_rules, top_rules = _sd3_rules()
    out, used = {}, set()

    def emit(m: str, down: Tensor, up: Tensor) -> None:
        if _swaps_halves(m, up, down):
            up = _swap(up)
        out[f"{m}.lora_down.weight"] = down
        out[f"{m}.lora_up.weight"] = up
        out[f"{m}.alpha"] = torch.tensor(float(down.shape[0]))

    blocks = sorted({int(x.group(1)) for t in targets if (x := re.match(r"transformer_blocks\.(\d+)\.", t))})
    for n in blocks:
        for src, dst in block_rules:
            names = [f"transformer_blocks.{n}.{d}" for d in (dst if isinstance(dst, tuple) else (dst,))]
            present = [t for t in names if t in targets]
            if not present:
                continue
            used.update(present)
            m = f"joint_blocks.{n}.{src}"
            if not isinstance(dst, tuple):
                emit(m, plain[f"{names[0]}.lora_A.weight"], plain[f"{names[0]}.lora_B.weight"])
                continue
            downs = {t: plain[f"{t}.lora_A.weight"] for t in present}
            ups = {t: plain[f"{t}.lora_B.weight"] for t in present}
            d_out = next(iter(ups.values())).shape[0]
            first = next(iter(downs.values()))
            if len(present) == 3 and all(torch.equal(d, first) for d in downs.values()):
                emit(m, first, torch.cat([ups[t] for t in names], dim=0))  # shared A: keep the rank
                continue
            down = torch.cat([downs[t] for t in present], dim=0)  # (sum r, in)
            up = torch.zeros(3 * d_out, down.shape[0], dtype=first.dtype)
            col = 0
            for i, t in enumerate(names):
                if t in present:
                    r = downs[t].shape[0]
                    up[i * d_out : (i + 1) * d_out, col : col + r] = ups[t]
                    col += r
            emit(m, down, up)
    for src, dst in top_rules:
        if dst in targets:
            used.add(dst)
            emit(src, plain[f"{dst}.lora_A.weight"], plain[f"{dst}.lora_B.weight"])
    unknown = sorted(set(targets) - used)
    if unknown:
        raise ValueError(f"{len(unknown)} diffusers LoRA target(s) have no MMDiT counterpart, e.g. {unknown[:3]}")
    return out


def convert_lora(
    state: Mapping[str, Tensor],
    to: str,
    *,
    module_names: Iterable[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict:
    """Convert a LoRA state dict of any layout to ``to`` ("t2i", "kohya" or "diffusers"; diffusers = SD3 only).

    ``module_names`` (the target model's module names) is needed to read kohya files; ``metadata`` (the file's
    safetensors metadata) to read a diffusers file's lora_alpha and its per-module patterns.
    """
    check_choice("LoRA format", to, FORMATS)
    src = detect_format(state)
    if src == "kohya":
        if module_names is None:
            raise ValueError("reading a kohya LoRA needs the model's module names to undo the underscores")
        native = from_kohya(state, module_names)
    elif src == "diffusers":
        native = sd3_from_diffusers(state, metadata=metadata)
    else:
        native = dict(state)
    if to == "t2i":
        return native
    return to_kohya(native) if to == "kohya" else sd3_to_diffusers(native)


def merge_into_state_dict(
    base: Mapping[str, Tensor], loras: Iterable[tuple[Mapping[str, Tensor], float]]
) -> dict[str, Tensor]:
    """Base weights with each (t2i-layout LoRA, weight) folded in: ``W + weight * alpha/r * up @ down``.

    Works on state dicts alone (no model is built). The sum is taken in float32 and cast back to each base
    weight's dtype; the base mapping is not modified.
    """
    out = dict(base)
    for state, weight in loras:
        problems = []
        for m in _modules(state):
            key = f"{m}.weight"
            down, up = state[f"{m}.lora_down.weight"], state[f"{m}.lora_up.weight"]
            if key not in out:
                problems.append(f"{m}: no such weight in the base model")
                continue
            if tuple(out[key].shape) != (up.shape[0], down.shape[1]):
                problems.append(f"{m}: LoRA {tuple(up.shape)} @ {tuple(down.shape)} vs weight {tuple(out[key].shape)}")
                continue
            alpha = float(state.get(f"{m}.alpha", torch.tensor(float(down.shape[0]))))
            delta = (weight * alpha / down.shape[0]) * (up.float() @ down.float())
            out[key] = (out[key].float() + delta).to(out[key].dtype)
        if problems:
            raise ValueError("the LoRA does not fit the base weights:\n  " + "\n  ".join(problems))
    return out
