"""The one single-file model format, and the loader of weights trained by ``t2i train``.

A model file is safetensors whose metadata names the registered architecture (``t2i_component``: a key of
``t2i.models.MODELS``) and holds its config (``model_config``, JSON) and any extra JSON fields (``t2i_extra``: the
CLIP tokenizer, the VAE's latent format, ...), so nothing is rebuilt from code defaults that may have changed since
the file was written. Model folders (``models/sd3-shapes/``) hold one such file per network; ``Unet.save`` and
friends write the same format. Files written by older versions with a ``t2i_model`` key still load.

``load_trained`` reads what ``t2i train`` leaves: a run folder (its newest checkpoint, EMA weights when present), a
checkpoint folder or weights file (the architecture from the run config stored in the metadata), or a model file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.io import CheckpointMismatchError, check_state_dict, load_weights, read_config, read_metadata, save_weights
from t2i.io.runs import trained_weights_file

# ``t2i_model`` kinds of files written before there was one format, and the registry names they mean
_LEGACY_KINDS = {"unet": "unclip_unet"}  # the one kind whose old name differs from its registry name


def model_file_name(path: str | Path) -> str | None:
    """The registered architecture a model file holds, or None when it is not a model file."""
    meta = read_metadata(path)
    name = meta.get("t2i_component")
    if name is None and "t2i_model" in meta:
        name = _LEGACY_KINDS.get(meta["t2i_model"], meta["t2i_model"])
    return name


def save_model_file(path: str | Path, name: str, module: nn.Module, *, dtype: torch.dtype | None = torch.float16,
                    **extra: Any) -> None:  # fmt: skip
    """Write ``module`` (registered as ``name``) with its config and ``extra`` JSON fields; floating tensors are
    stored in ``dtype`` (fp16 by default, the size budget of shipped models; None keeps their dtype)."""
    meta = {"t2i_component": name, "model_config": json.dumps(dataclasses.asdict(module.cfg), sort_keys=True)}
    meta["t2i_extra"] = json.dumps(extra, sort_keys=True)
    convert = dtype is not None
    sd = {k: v.to(dtype) if convert and v.is_floating_point() else v for k, v in module.state_dict().items()}
    save_weights(path, sd, metadata=meta)


def clip_extra(clip) -> dict[str, Any]:
    """The extra fields a CLIP file needs to rebuild its tokenizer."""
    return {"tokenizer": {"vocab": clip.tokenizer.vocab, "context_length": clip.tokenizer.context_length}}


def _build(name: str, params: dict[str, Any], extra: dict[str, Any]) -> nn.Module:
    from t2i.models import MODELS, model_config

    from .base import tuples_from_json

    cfg = model_config(name, tuples_from_json(MODELS[name][0], params))
    if name == "clip":  # the tokenizer is part of the file, not of the architecture
        from t2i.models.clip import ClipEncoder, WordTokenizer

        tok = extra["tokenizer"]  # a training head the config names (picture_grid) is in the file too
        return ClipEncoder.from_config(cfg, WordTokenizer(tok["vocab"], tok["context_length"]))
    return MODELS[name][1](cfg)


def load_model_file(path: str | Path, *, dtype: torch.dtype = torch.float32,
                    expect: str | None = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """(module in ``dtype``, its extra fields) from a model file; ``expect`` refuses any other architecture."""
    from t2i.models import MODELS

    name = model_file_name(path)
    if name not in MODELS:
        raise ValueError(f"{path} is not a t2i model file (no known 't2i_component' in its metadata)")
    if expect is not None and name != expect:
        raise ValueError(f"{path} holds a {name!r} model, not a {expect!r}")
    meta = read_metadata(path)
    try:
        params = json.loads(meta["model_config"])
        extra = json.loads(meta.get("t2i_extra", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: its model metadata is damaged ({type(err).__name__}: {err})") from None
    module = _build(name, params, extra)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_weights(path).items()}
    try:  # every missing, unexpected or mis-shaped key in one error that names the file (a damaged or foreign file)
        check_state_dict(module.state_dict(), sd, what=f"{name} model")
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{path}: {err}") from None
    module.load_state_dict(sd, strict=True)
    return module.to(dtype).eval().requires_grad_(False), extra


def load_trained(path: str | Path, name: str, *,
                 inputs_for: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> nn.Module:  # fmt: skip
    """A model trained by ``t2i train``: ``path`` is a run folder (its newest checkpoint, EMA weights when
    present), a checkpoint folder, a weights file, or a model file; the architecture comes from the config stored
    with it. Returned in training mode with gradients on (callers freeze what they do not train).

    ``inputs_for(model_params)`` gives what a network takes besides its config when it is rebuilt from a run (a
    CLIP's tokenizer, which a model file carries but a run config does not); ``t2i.train.trained`` passes it."""
    from t2i.models import build_model

    p = trained_weights_file(path)
    if p is None:
        raise FileNotFoundError(f"{path} has no finished checkpoint yet")
    if not p.exists():
        raise FileNotFoundError(
            f"no trained {name!r} model at {p}: give a run folder (train it first with `t2i train`), a checkpoint "
            "folder or a weights file"
        )
    if model_file_name(p) == name:
        module, _ = load_model_file(p)
        return module.train().requires_grad_(True)
    cfg = read_config(p)
    if not cfg or cfg.get("model", {}).get("name") != name:
        raise ValueError(f"{p} was not written by a {name!r} training run (its stored config names another model)")
    params = cfg["model"]["params"]
    model = build_model(name, params, **(inputs_for(params) if inputs_for else {}))
    weights = load_weights(p)
    if cfg.get("task", {}).get("name") == "distill":  # a DistillModel: the student, without discriminator heads
        weights = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
    model.load_state_dict(weights, strict=True)
    return model


def stored_model_name(path: str | Path) -> str | None:
    """The architecture of a ``t2i train`` run folder, checkpoint, weights file or model file (None for anything
    else: an official file, a diffusers folder, a missing path)."""
    p = trained_weights_file(path)
    if p is None or p.suffix != ".safetensors" or not p.is_file():
        return None
    cfg = read_config(p)
    if cfg:
        return cfg.get("model", {}).get("name")
    return model_file_name(p)
