"""Networks, one architecture per file, and the registry that configs name them by.

``MODELS`` maps a config name to ``(ConfigDataclass, ModelClass)``; ``build_model(name, params)`` checks the params
against the dataclass (unknown keys are errors naming the nearest valid one) and builds the model. Real
architectures (Unet decoders, the prior, MMDiT) register here the same way as the toy ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from t2i.errors import check_choice, unknown_choice

from .caption import CaptionEncoder, CaptionEncoderConfig
from .clip import ClipConfig, ScratchClip
from .controlnet import ControlNet, ControlNetConfig
from .mmdit import MMDiT, MMDiTConfig
from .prior import PriorConfig, PriorNetwork
from .toy import ToyMLP, ToyMLPConfig, ToyUNet, ToyUNetConfig
from .unet import Unet, UnetConfig
from .vae import AutoencoderKL, VAEConfig
from .vqgan import VQGAN, VQGANConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "toy_unet": (ToyUNetConfig, ToyUNet),
    "toy_mlp": (ToyMLPConfig, ToyMLP),
    "unclip_unet": (UnetConfig, Unet),  # unCLIP decoder / super-resolution stages
    "unclip_prior": (PriorConfig, PriorNetwork),
    "vqgan": (VQGANConfig, VQGAN),
    "clip": (ClipConfig, ScratchClip),  # from-scratch CLIP; build_model("clip", params, tokenizer=...)
    "caption_encoder": (CaptionEncoderConfig, CaptionEncoder),  # word roles for the MMDiT (t2i.models.caption)
    "mmdit": (MMDiTConfig, MMDiT),  # SD3 / SD3.5 MMDiT(-X); PRESETS in t2i.models.mmdit
    "sd3_vae": (VAEConfig, AutoencoderKL),  # the SD3 KL autoencoder at any width; PRESETS in t2i.models.vae
    "sd3_controlnet": (ControlNetConfig, ControlNet),  # SD3 ControlNet; PRESETS in t2i.models.controlnet
}


def model_config(name: str, params: dict[str, Any] | None = None):
    """The config dataclass of model ``name`` filled from ``params``."""
    check_choice("model", name, MODELS)
    cfg_cls, _ = MODELS[name]
    valid = [f.name for f in dataclasses.fields(cfg_cls)]
    for key in params or {}:
        if key not in valid:
            raise unknown_choice("config key", key, valid, cutoff=0.5, prefix="model.params.")
    return cfg_cls(**(params or {}))


def build_model(name: str, params: dict[str, Any] | None = None, **inputs: Any) -> nn.Module:
    """Build model ``name`` from its config params; ``inputs`` are what a model needs beside its config (the
    ``clip`` model takes the ``tokenizer`` of its captions)."""
    return MODELS[name][1](model_config(name, params), **inputs)
