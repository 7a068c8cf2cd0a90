"""Tiny random model folders in the shipped format (``t2i.pipelines.folders``), for pipeline and CLI tests.

The SD3 folder writes its defaults with the older ``cfg`` key, the unCLIP one with ``guidance``: both load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from t2i.models import build_model
from t2i.models.clip import CLIP_PRESETS, ClipConfig, ScratchClip
from t2i.models.files import clip_extra, save_model_file
from t2i.pipelines.folders import write_model_json
from t2i.shapes.captions import shapes_tokenizer


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Small random values in every parameter, so zero-initialised output layers do not hide a wrong wiring."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def shapes_clip(cfg: ClipConfig) -> ScratchClip:
    """A from-scratch CLIP of ``cfg`` over the shapes caption vocabulary (random weights: seed torch first)."""
    return ScratchClip(cfg, shapes_tokenizer(context_length=cfg.context_length))


def tiny_clip(seed: int = 0) -> ScratchClip:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(CLIP_PRESETS["tiny"], image_size=32)
    return shapes_clip(cfg).eval()


def tiny_sd3_folder(root: str | Path, seed: int = 0, **defaults) -> Path:
    """An ``sd3`` folder: a 2-block MMDiT-X over a 2-level VAE (factor 2, 4 channels), a tiny CLIP text tower."""
    root = Path(root)
    torch.manual_seed(seed)
    clip = tiny_clip(seed)
    mmdit = dict(
        depth=2,
        num_heads=2,
        head_dim=8,
        patch_size=2,
        in_channels=4,
        context_dim=32,
        pooled_dim=32,
        pos_embed_max_size=16,
        pos_embed_base_size=8,
        qk_norm="rms",
        x_block_self_attn_layers=[0],
    )
    net = _randomize(build_model("mmdit", mmdit), seed)
    vae = build_model("sd3_vae", dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_groups=4))
    root.mkdir(parents=True, exist_ok=True)
    save_model_file(root / "transformer.safetensors", "mmdit", net)
    save_model_file(root / "vae.safetensors", "sd3_vae", vae, latent_format={"scale": 1.0, "shift": 0.0})
    save_model_file(root / "clip.safetensors", "clip", clip, **clip_extra(clip))
    d = {"steps": 3, "cfg": 3.0, "sampler": "euler", "size": 32, "shift": 1.0, **defaults}
    write_model_json(root, {"kind": "sd3", "name": "tiny-sd3", "text_layer": -2, "defaults": d,
                        "presets": {"fast": {"steps": 1, "cfg": 1.0}}})  # fmt: skip
    return root


def tiny_unclip_folder(root: str | Path, seed: int = 0) -> Path:
    """An ``unclip`` folder: tiny CLIP, prior, 16 px base Unet and a 16 -> 32 px upsampler."""
    root = Path(root)
    torch.manual_seed(seed)
    clip = tiny_clip(seed)
    prior = build_model("unclip_prior", dict(embed_dim=32, depth=1, heads=2, head_dim=8, text_token_dim=32,
                                             max_text_len=24, self_cond=True))  # fmt: skip
    unet = dict(dim=8, dim_mults=[1, 2], num_res_blocks=1, attn_levels=[False, True], self_attn=[False, False],
                heads=2, head_dim=8, groups=4)  # fmt: skip
    base = _randomize(build_model("unclip_unet", dict(unet, image_embed_dim=32, text_embed_dim=32)), seed)
    sr = _randomize(build_model("unclip_unet", dict(unet, attn_levels=[False, False], lowres_cond=True,
                                                    lowres_noise_cond=True)), seed + 1)  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    save_model_file(root / "clip.safetensors", "clip", clip, **clip_extra(clip))
    save_model_file(root / "prior.safetensors", "unclip_prior", prior)
    save_model_file(root / "decoder.safetensors", "unclip_unet", base)
    save_model_file(root / "sr.safetensors", "unclip_unet", sr)
    stage = {"schedule": "cosine", "timesteps": 1000, "sampler": "ddim", "steps": 2, "sample_level": 0.2}
    write_model_json(root, {
        "kind": "unclip", "name": "tiny-unclip",
        "prior": {"file": "prior.safetensors", "schedule": "cosine", "timesteps": 1000, "prediction": "x0",
                  "sampler": "ddim", "steps": 2, "guidance": 2.0, "candidates": 2},
        "stages": [dict(stage, file="decoder.safetensors", size=16, prediction="eps", guidance=2.0, lowres_size=None),
                   dict(stage, file="sr.safetensors", size=32, prediction="v", guidance=1.0, lowres_size=16)],
        "defaults": {"steps": 2, "guidance": 2.0, "sampler": "ddim", "size": 32},
    })  # fmt: skip
    return root


def train_default(tmp_path: str | Path, name: str, overrides: list[str]) -> str:
    """Two fp32 steps of ``configs/default/<name>.yaml`` (shrunk by ``overrides``) under ``tmp_path``; the run."""
    from t2i.train.config import load_config
    from t2i.train.loop import train

    common = [f"run.out_dir={tmp_path}", "run.steps=2", "run.log_every=1", "run.sample_every=0", "run.ckpt_every=0",
              "run.threads=0", "run.precision=fp32", "run.compile=false", "run.eval_every=0"]  # fmt: skip
    cfg = load_config(f"configs/default/{name}.yaml", [*common, *overrides])
    train(cfg)
    return str(Path(tmp_path) / cfg.run.name)


TINY_CLIP = ("model.params={embed_dim: 32, text_width: 32, text_layers: 2, text_heads: 2, context_length: 24, "
             "vision_width: 32, vision_layers: 1, vision_heads: 2, image_size: 64, patch_size: 16}")  # fmt: skip
TINY_VAE = ["model.params.block_out_channels=[8, 8, 8]", "model.params.norm_groups=4"]
TINY_MMDIT = ["model.params.depth=1", "model.params.x_block_self_attn_layers=[0]", "model.params.context_dim=32",
              "model.params.pooled_dim=32"]  # fmt: skip


def train_tiny_sd3(tmp_path: str | Path, text_chars: int = 0, text_words: bool = False,
                   word_positions: float = 0.0, word_prefix: float = 0.0,
                   caption: bool = False) -> tuple[str, str, str]:  # fmt: skip
    """(mmdit, vae, clip) runs of a tiny sd3-shapes trained for two steps; ``text_chars`` > 0 adds character
    tokens of the quoted text, which need a wider (64) text tower; ``text_words`` the CLIP's input embeddings,
    ``word_positions`` their sincos index code, ``word_prefix`` their left context, ``caption`` a caption encoder
    trained on the CLIP (two steps) that turns them into its states."""
    width = 64 if text_chars else 32
    clip = train_default(tmp_path, "clip", [TINY_CLIP.replace("text_width: 32", f"text_width: {width}"),
                                            "data.batch_size=4"])  # fmt: skip
    vae = train_default(tmp_path, "vae", [*TINY_VAE, "data.batch_size=2"])
    task = [f"task.params.vae={vae}", f"task.params.text={clip}", "task.params.latent_scale=1.5",
            "task.params.latent_shift=0.1", f"task.params.text_chars={text_chars}",
            f"task.params.text_words={str(text_words).lower()}",
            f"task.params.text_word_positions={word_positions}",
            f"task.params.text_word_prefix={word_prefix}", "task.params.caption_encoder=null"]  # fmt: skip
    if caption:
        run = train_default(tmp_path, "caption", [f"task.params.clip={clip}", f"model.params.width={width}",
                                                  "model.params.depth=1", "data.batch_size=4"])  # fmt: skip
        task.append(f"task.params.caption_encoder={run}")
    mmdit = [*TINY_MMDIT, f"model.params.context_dim={width}"]
    return train_default(tmp_path, "sd3", [*task, *mmdit, "data.batch_size=2"]), vae, clip
