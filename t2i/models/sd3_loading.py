"""Load SD3 / SD3.5 weights from local files: official single files and diffusers folders, safetensors only.

- Official: ``sd3.5_large.safetensors`` (MMDiT under ``model.diffusion_model.``, VAE under ``first_stage_model.``)
  plus ``text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors``; tokenizers come from a folder holding
  ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/`` (a diffusers folder has them) because the official files do
  not ship any.
- Diffusers: ``transformer/``, ``vae/``, ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``.

Memory: every model is built on ``meta`` and filled with ``load_state_dict(assign=True)`` from tensors read one at
a time and cast straight to the requested dtype, so an fp16/bf16 file never exists as a full fp32 copy, and
nothing is initialised only to be overwritten. Which model a file holds (SD3.5-Large / -Medium / SD3-Medium) is
detected from its keys and shapes (``t2i.io.sd3.detect_transformer``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from t2i.io import CheckpointMismatchError, check_state_dict, named_read_errors
from t2i.io.sd3 import (
    TRANSFORMER_PREFIX,
    VAE_PREFIX,
    detect_transformer,
    detect_vae,
    diffusers_transformer_config_to_params,
    transformer_diffusers_to_official,
    vae_diffusers_to_official,
)

from .mmdit import MMDiT, MMDiTConfig
from .text import SD3TextEncoder, build_clip_from_state_dict, build_t5_from_state_dict, clip_g_config, clip_l_config
from .text import t5_xxl_config as _t5_config
from .vae import AutoencoderKL, LatentFormat, VAEConfig

PathLike = str | os.PathLike


def read_safetensors(
    paths: PathLike | list[PathLike], *, prefix: str = "", dtype: torch.dtype | None = None, device="cpu"
) -> dict[str, Tensor]:
    """Tensors under ``prefix`` (prefix removed) from one or more safetensors files, cast one by one to ``dtype``."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: dict[str, Tensor] = {}
    for path in map(_checked, paths):
        with named_read_errors(path), safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if key.startswith(prefix):
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[key[len(prefix) :]] = t
    return out


def _checked(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():  # first: a missing folder is not a pickle file
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are loaded (pickle checkpoints can run code)")
    return path


def _dtype(sd: dict[str, Tensor], key: str) -> torch.dtype:
    """The dtype of ``sd[key]``, or of the first floating tensor when that key is lost (``_fill`` names it)."""
    if key in sd:
        return sd[key].dtype
    return next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)


@contextmanager
def _naming(path: PathLike) -> Iterator[None]:
    """Prefix a mismatch found while reading ``path`` with the file's name, so the one-line error says where."""
    try:
        yield
    except CheckpointMismatchError as err:
        if str(path) in str(err):
            raise
        raise CheckpointMismatchError(f"{path}: {err}") from None


def _fill(model: nn.Module, sd: dict[str, Tensor], what: str) -> nn.Module:
    check_state_dict(model.state_dict(), sd, what=what)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _folder_weights(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (pickle .bin files are not loaded)")
    return files


# -- transformer and VAE ---------------------------------------------------------------------------------------


def mmdit_from_state_dict(
    sd: dict[str, Tensor], *, config: MMDiTConfig | None = None, head_dim: int | None = None, device="cpu"
) -> MMDiT:
    """An MMDiT holding ``sd`` (official or diffusers keys, official prefix allowed), config detected if not given."""
    if any(k.startswith("transformer_blocks.") for k in sd):
        sd = transformer_diffusers_to_official(sd)
    if any(k.startswith(TRANSFORMER_PREFIX) for k in sd):
        sd = {k[len(TRANSFORMER_PREFIX) :]: v for k, v in sd.items() if k.startswith(TRANSFORMER_PREFIX)}
    if config is None:
        config = MMDiTConfig(**detect_transformer(sd, head_dim=head_dim)["params"])
    dtype = _dtype(sd, "context_embedder.weight")
    model = MMDiT(config, dtype=dtype, device="meta")
    return _fill(model, {k: v.to(device) for k, v in sd.items()}, "MMDiT")


def load_mmdit(path: PathLike, *, dtype: torch.dtype | None = None, device="cpu", head_dim=None) -> MMDiT:
    """The MMDiT of an official single file, a bare transformer file, or a diffusers ``transformer/`` folder."""
    with _naming(path):
        return _load_mmdit(Path(path), dtype=dtype, device=device, head_dim=head_dim)


def _load_mmdit(path: Path, *, dtype, device, head_dim) -> MMDiT:
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        sd = read_safetensors(_folder_weights(path), dtype=dtype, device=device)
        params = diffusers_transformer_config_to_params(config)
        return mmdit_from_state_dict(sd, config=MMDiTConfig(**params), device=device)
    path = _checked(path)
    with named_read_errors(path), safe_open(str(path), framework="pt") as f:
        has_prefix = any(k.startswith(TRANSFORMER_PREFIX) for k in f.keys())  # noqa: SIM118
    sd = read_safetensors(path, prefix=TRANSFORMER_PREFIX if has_prefix else "", dtype=dtype, device=device)
    if has_prefix is False:
        sd = {k: v for k, v in sd.items() if not k.startswith((VAE_PREFIX, "text_encoders."))}
    return mmdit_from_state_dict(sd, head_dim=head_dim, device=device)


def vae_from_state_dict(
    sd: dict[str, Tensor], *, norm_groups: int = 32, latent_format: LatentFormat | None = None, device="cpu"
) -> AutoencoderKL:
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        sd = vae_diffusers_to_official(sd)
    cfg = VAEConfig(**detect_vae(sd), norm_groups=norm_groups)
    dtype = _dtype(sd, "decoder.conv_in.weight")
    vae = AutoencoderKL(cfg, latent_format=latent_format, dtype=dtype, device="meta")
    return _fill(vae, {k: v.to(device) for k, v in sd.items()}, "VAE")


def load_vae(
    path: PathLike, *, dtype: torch.dtype | None = None, device="cpu", norm_groups: int = 32
) -> AutoencoderKL:
    """The VAE of an official single file (``first_stage_model.*``), a bare VAE file, or a diffusers ``vae/``.

    GroupNorm group counts leave no trace in the weights: files get ``norm_groups`` (32 in every SD3 VAE),
    diffusers folders their config's value.
    """
    with _naming(path):
        return _load_vae(Path(path), dtype=dtype, device=device, norm_groups=norm_groups)


def _load_vae(path: Path, *, dtype, device, norm_groups: int) -> AutoencoderKL:
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
            raise ValueError(f"{path}: SD3 VAEs have no quant convs; this is a different autoencoder")
        fmt = LatentFormat(float(config.get("scaling_factor", 1.5305)), float(config.get("shift_factor") or 0.0))
        sd = read_safetensors(_folder_weights(path), dtype=dtype, device=device)
        return vae_from_state_dict(sd, norm_groups=int(config.get("norm_num_groups", 32)), latent_format=fmt)
    path = _checked(path)
    with named_read_errors(path), safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    has_prefix = any(k.startswith(VAE_PREFIX) for k in keys)
    if not has_prefix and any(k.startswith(TRANSFORMER_PREFIX) for k in keys):
        raise ValueError(f"{path} holds a transformer but no VAE (no '{VAE_PREFIX}' keys); pass the VAE file")
    sd = read_safetensors(path, prefix=VAE_PREFIX if has_prefix else "", dtype=dtype, device=device)
    return vae_from_state_dict(sd, norm_groups=norm_groups, device=device)


# -- text encoders ---------------------------------------------------------------------------------------------


def _tokenizers(folder: PathLike | None, with_t5: bool):
    if folder is None:
        return None, None, None
    from transformers import AutoTokenizer

    folder = Path(folder)
    load = lambda name: AutoTokenizer.from_pretrained(folder / name, local_files_only=True)  # noqa: E731
    return load("tokenizer"), load("tokenizer_2"), load("tokenizer_3") if with_t5 else None


def load_text_encoder(
    folder: PathLike | None = None,
    *,
    clip_l: PathLike | None = None,
    clip_g: PathLike | None = None,
    t5: PathLike | None = None,
    tokenizers: PathLike | None = None,
    load_t5: bool = True,
    dtype: torch.dtype | None = None,
    device="cpu",
    t5_length: int = 77,
    configs: dict | None = None,
    **kwargs,
) -> SD3TextEncoder:
    """The SD3 text stack from a diffusers folder (``folder``) or official files (``clip_l``/``clip_g``/``t5``).

    Tokenizers are read from ``tokenizers`` (default: ``folder``) as ``tokenizer{,_2,_3}/``. ``load_t5=False``
    (or no T5 file) gives the T5-free stack. The official files carry no configs: the released CLIP-L, CLIP-G and
    T5-XXL ones are used unless ``configs={"clip_l": ..., "clip_g": ..., "t5": ...}`` (transformers configs)
    overrides them. Extra keyword arguments go to ``SD3TextEncoder``.
    """
    if folder is not None:
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        folder = Path(folder)
        kw = {"local_files_only": True, "dtype": dtype}
        enc_l = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **kw).to(device).eval()
        enc_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **kw).to(device).eval()
        enc_t5 = None
        if load_t5 and (folder / "text_encoder_3").exists():
            enc_t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3", **kw).to(device).eval()
        tokenizers = tokenizers if tokenizers is not None else folder
    else:
        if clip_l is None or clip_g is None:
            raise ValueError("pass a diffusers folder, or the official clip_l and clip_g .safetensors files")
        configs = configs or {}
        cfg_l, cfg_g = configs.get("clip_l") or clip_l_config(), configs.get("clip_g") or clip_g_config()
        enc_l = build_clip_from_state_dict(cfg_l, read_safetensors(clip_l, dtype=dtype), device=device)
        enc_g = build_clip_from_state_dict(cfg_g, read_safetensors(clip_g, dtype=dtype), device=device)
        enc_t5 = None
        if load_t5 and t5 is not None:
            cfg_t5 = configs.get("t5") or _t5_config()
            enc_t5 = build_t5_from_state_dict(cfg_t5, read_safetensors(t5, dtype=dtype), device=device)
    tok_l, tok_g, tok_t5 = _tokenizers(tokenizers, enc_t5 is not None)
    return SD3TextEncoder(
        enc_l, enc_g, enc_t5, tokenizer_l=tok_l, tokenizer_g=tok_g, tokenizer_t5=tok_t5, t5_length=t5_length,
        **kwargs,
    )  # fmt: skip


# -- whole models ---------------------------------------------------------------------------------------------


@dataclass
class SD3Components:
    transformer: MMDiT
    vae: AutoencoderKL | None
    text_encoder: SD3TextEncoder | None
    model_name: str  # "sd3.5-large", "sd3.5-medium", "sd3-medium" or "custom" (detected from keys and shapes)


def load_sd3(
    path: PathLike,
    *,
    text_encoders: PathLike | None = None,
    tokenizers: PathLike | None = None,
    load_text: bool = True,
    load_t5: bool = True,
    dtype: torch.dtype | None = torch.bfloat16,
    vae_dtype: torch.dtype | None = torch.float32,
    vae_norm_groups: int = 32,
    device="cpu",
    **text_kwargs,
) -> SD3Components:
    """Load everything from a diffusers folder or an official single file (+ its ``text_encoders/`` folder).

    Args:
        path: a diffusers folder (has ``transformer/``) or an official ``sd3*.safetensors`` file.
        text_encoders: for official files, the folder with ``clip_l``, ``clip_g`` and ``t5xxl*`` safetensors
            (default: ``text_encoders/`` next to the file, when it exists).
        tokenizers: folder with ``tokenizer{,_2,_3}/`` (default: the diffusers folder itself).
        load_text, load_t5: skip the text stack entirely, or only T5 (zeros are used for its rows).
        dtype: transformer and text-encoder weights (bf16 by default, the released files' native dtype).
        vae_dtype: VAE weights (fp32 by default: fp16 VAEs overflow; bf16 is fine for decoding).
        vae_norm_groups: GroupNorm groups of a single-file VAE (not recorded in the weights; 32 for SD3).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "transformer").is_dir():
            raise ValueError(f"{path} is a folder without transformer/; pass a diffusers SD3 folder or a file")
        transformer = load_mmdit(path / "transformer", dtype=dtype, device=device)
        vae = load_vae(path / "vae", dtype=vae_dtype, device=device) if (path / "vae").is_dir() else None
        text = None
        if load_text and (path / "text_encoder").is_dir():
            text = load_text_encoder(
                path, tokenizers=tokenizers, load_t5=load_t5, dtype=dtype, device=device, **text_kwargs
            )
    else:
        transformer = load_mmdit(path, dtype=dtype, device=device)
        with safe_open(str(path), framework="pt") as f:
            has_vae = any(k.startswith(VAE_PREFIX) for k in f.keys())  # noqa: SIM118
        vae = load_vae(path, dtype=vae_dtype, device=device, norm_groups=vae_norm_groups) if has_vae else None
        text = None
        folder = Path(text_encoders) if text_encoders is not None else path.parent / "text_encoders"
        if load_text and folder.is_dir():
            t5_files = sorted(folder.glob("t5xxl*.safetensors"))
            text = load_text_encoder(
                clip_l=folder / "clip_l.safetensors", clip_g=folder / "clip_g.safetensors",
                t5=t5_files[0] if t5_files else None, tokenizers=tokenizers, load_t5=load_t5, dtype=dtype,
                device=device, **text_kwargs,
            )  # fmt: skip
    name = detect_transformer(transformer.state_dict(), head_dim=transformer.cfg.head_dim)["name"]
    return SD3Components(transformer, vae, text, name)
