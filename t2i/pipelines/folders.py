"""Model folders: the default models that ship in ``models/`` and what ``t2i generate`` loads.

A model folder holds ``model.json`` (the pipeline kind, its sampling defaults and presets, and the training record
of each part) and one model file per network (``t2i.models.files``: safetensors with the architecture config in
the metadata), so nothing is rebuilt from code defaults that might have changed since the folder was written:

    models/sd3-shapes/    model.json  transformer.safetensors  vae.safetensors  clip.safetensors  README.md
    models/unclip-shapes/ model.json  clip.safetensors  prior.safetensors  decoder.safetensors  sr.safetensors

Weights are stored in fp16 (the repo's size budget) and loaded as fp32. ``"precision"`` in ``model.json`` says how
the denoisers run: ``"fp32"`` (the default when absent) or ``"bf16"`` (bf16 autocast, and ``channels_last`` for
Unets), which the shipped models ask for: within 0.004 of their fp32 `eval` score at 1.4-3.1x the speed
(docs/performance.md). That is a speed choice, so a folder's bf16 runs as fp32 on a CPU without native bf16
matmuls, where bf16 would be the slow path (``t2i.nn.precision``; ``gen.precision_note`` says so);
``load_generator(precision=)`` and ``t2i generate --precision`` override both. ``t2i export``
(``t2i.train.export``) writes folders from training runs.

``load_generator`` turns a shipped name (``sd3-shapes``), a model folder, or an official SD3.5 file / diffusers
folder into a ``Generator`` (``t2i.pipelines.generator``): one ``generate(prompts, seeds, settings)`` call
whatever the family.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from t2i.errors import check_choice
from t2i.io.safetensors_io import atomic_write_text
from t2i.models.files import load_model_file
from t2i.nn.precision import bf16_advice, bf16_is_native

from .generator import Generator, SD3Generator, Settings, UnCLIPGenerator

FORMAT = "t2i-model/1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # name: the autocast dtype of the denoisers
SHIPPED = ("sd3-shapes", "unclip-shapes", "sd3-shapes-turbo")


def models_dir() -> Path:
    """Where shipped models live: ``$T2I_MODELS_DIR``, else ``models/`` of the source checkout."""
    return Path(os.environ.get("T2I_MODELS_DIR") or Path(__file__).resolve().parents[2] / "models")


def read_model_json(folder: Path) -> dict[str, Any]:
    try:
        spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}/model.json is not valid JSON ({err}); restore the folder's copy") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{folder}/model.json must hold a JSON object, got {type(spec).__name__}")
    if spec.get("format") != FORMAT:
        raise ValueError(f"{folder}/model.json is format {spec.get('format')!r}; this t2i reads {FORMAT!r}")
    return spec


def _folder_presets(spec: dict[str, Any]) -> dict[str, Settings]:
    """Presets of a model folder: partial settings over the defaults."""
    base = Settings.from_dict(spec["defaults"]).to_dict()
    return {
        name: Settings.from_dict({**base, **upgrade_settings_keys(over)})
        for name, over in spec.get("presets", {}).items()
    }


def upgrade_settings_keys(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with an older folder's ``cfg`` under its current name, ``guidance``."""
    d = dict(d)
    if "cfg" in d:
        d["guidance"] = d.pop("cfg")
    return d


def component_file(folder: Path, spec: dict[str, Any], part: str) -> Path:
    """The weights file of ``part``: ``<part>.safetensors`` in the folder, or the file ``model.json``'s
    ``components`` names, relative to the folder (a student shares its teacher's VAE and text encoder this way
    instead of shipping copies)."""
    rel = spec.get("components", {}).get(part, f"{part}.safetensors")
    return _contained_file(folder, rel, f"components.{part}", siblings=True)


def _contained_file(folder: Path, rel: Any, what: str, *, siblings: bool = False) -> Path:
    """``folder / rel``, refused unless it is a ``.safetensors`` file inside ``folder`` (or, with ``siblings``, inside
    another model folder beside it): a downloaded model.json must not make t2i read files elsewhere on the disk."""
    where = f"{folder}/model.json: {what}"
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ValueError(f"{where} must be a path relative to the model folder, got {rel!r}")
    path = folder / rel
    if path.suffix != ".safetensors":
        raise ValueError(f"{where} must name a .safetensors file, got {rel!r}")
    real, home = path.resolve(), folder.resolve()
    owner = real.parent
    inside = owner == home or (siblings and owner.parent == home.parent and (owner / "model.json").is_file())
    if not inside:
        allowed = "the model folder or a model folder beside it" if siblings else "the model folder"
        raise ValueError(f"{where} points outside {allowed} ({rel!r} -> {real}); keep weights inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}/model.json names {rel!r} for {what}, but {path} does not exist")
    return path


def _sd3_from_folder(folder: Path, spec: dict[str, Any], quantize: str | None = None,
                     precision: str = "fp32") -> SD3Generator:  # fmt: skip
    from t2i.models.text import ClipTextConditioner
    from t2i.models.vae import LatentFormat
    from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset

    transformer, _ = load_model_file(component_file(folder, spec, "transformer"))
    vae, vae_extra = load_model_file(component_file(folder, spec, "vae"))
    vae.latent_format = LatentFormat(**vae_extra["latent_format"])
    clip, _ = load_model_file(component_file(folder, spec, "clip"))
    caption = load_model_file(component_file(folder, spec, "caption"))[0] if spec.get("caption_encoder") else None
    text = ClipTextConditioner(clip, spec["text_layer"], spec.get("text_chars", 0), spec.get("text_words", False),
                               spec.get("text_word_positions", 0.0), spec.get("text_word_prefix", 0.0),
                               caption)  # fmt: skip
    d = Settings.from_dict(spec["defaults"])
    preset = SD3Preset(steps=d.steps, guidance=d.guidance, sampler=d.sampler, shift=d.options.get("shift", 3.0))
    pipe = SD3Pipeline(transformer, vae, text, preset=preset, device="cpu", quantize=quantize,
                       autocast=PRECISIONS[precision])  # fmt: skip
    f = vae.downscale * transformer.cfg.patch_size
    gen = SD3Generator(pipe, spec["name"], d, (2 * f, transformer.cfg.pos_embed_max_size * f, f))
    gen._presets = _folder_presets(spec)
    if "controlnet" in spec.get("components", {}) or (folder / "controlnet.safetensors").is_file():
        from t2i.models.controlnet import load_controlnet

        own = component_file(folder, spec, "controlnet")
        pipe.add_controlnet(load_controlnet(own))
        gen._controlnet_files = {own.resolve()}
    return gen


def _unclip_from_folder(folder: Path, spec: dict[str, Any], quantize: str | None = None,
                        precision: str = "fp32") -> UnCLIPGenerator:  # fmt: skip
    if quantize is not None:
        raise ValueError(
            f"{folder}: quantization is for the SD3 family's large models; unCLIP folders run as they are"
        )
    from t2i.diffusion import VPPath
    from t2i.pipelines.unclip import DecoderStage, LowresAugment, PriorSpec, UnCLIPPipeline

    clip, _ = load_model_file(folder / "clip.safetensors")
    p = spec["prior"]
    prior_net, _ = load_model_file(_contained_file(folder, p["file"], "prior.file"))
    prior = PriorSpec(prior_net, VPPath(p["schedule"], p["timesteps"]), p["prediction"], sampler=p["sampler"],
                      steps=p["steps"], guidance=p["guidance"], num_candidates=p["candidates"],
                      text_words=p.get("text_words", False))  # fmt: skip
    stages = []
    for st in spec["stages"]:
        net, _ = load_model_file(_contained_file(folder, st["file"], "stages[].file"))
        if precision == "bf16":  # oneDNN's bf16 convolutions are fastest in channels_last (docs/performance.md)
            net.to(memory_format=torch.channels_last)
        low = None
        if st.get("lowres_size"):
            low = LowresAugment(st["lowres_size"], sample_level=st["sample_level"])
        path = VPPath(st["schedule"], st["timesteps"])
        stages.append(DecoderStage(net, st["size"], path, st["prediction"], sampler=st["sampler"], steps=st["steps"],
                                   guidance=st["guidance"], lowres=low, tile=st.get("tile"),
                                   tile_overlap=st.get("tile_overlap", 32),
                                   text_words=st.get("text_words", False)))  # fmt: skip
    caption = load_model_file(component_file(folder, spec, "caption"))[0] if spec.get("caption_encoder") else None
    pipe = UnCLIPPipeline(clip, prior, stages, autocast=PRECISIONS[precision], caption=caption)
    gen = UnCLIPGenerator(pipe, spec["name"], Settings.from_dict(spec["defaults"]))
    gen._presets = _folder_presets(spec)
    return gen


def resolve_model(model: str) -> Path:
    """The path a model name means: a shipped name (``sd3-shapes``: its folder in ``models_dir()``), or a path to a
    t2i model folder, an official SD3/SD3.5 file or a diffusers folder. Raises FileNotFoundError saying which
    names work; the CLI, the server and ``load_generator`` all resolve names here."""
    path = Path(model)
    if model in SHIPPED and not path.exists():
        path = models_dir() / model
        if not (path / "model.json").exists():
            raise FileNotFoundError(
                f"the shipped model {model!r} is missing from {path.parent}; run from a t2i checkout (or set "
                "T2I_MODELS_DIR to its models/ folder)"
            )
    if not path.exists():
        raise FileNotFoundError(
            f"unknown model {model!r}: give a shipped name ({', '.join(SHIPPED)}), a t2i model folder, or a local "
            "SD3/SD3.5 .safetensors file or diffusers folder"
        )
    return path


def model_folder(model: str) -> Path | None:
    """The t2i model folder ``model`` names (a shipped name or a path), or None if it is not one."""
    try:
        path = resolve_model(model)
    except FileNotFoundError:
        return None
    return path if (path / "model.json").exists() else None


def load_generator(model: str, *, quantize: str | None = None, precision: str | None = None,
                   controlnets: Sequence[str] = ()) -> Generator:  # fmt: skip
    """A shipped model name, a t2i model folder, or an official SD3/SD3.5 file or diffusers folder; ``quantize``
    ("int8") stores an SD3 model's large weights as int8 (``t2i.nn.quantize``). ``precision`` ("fp32" or "bf16")
    overrides the folder's own (``model.json``'s ``"precision"``; fp32 for official files). ``controlnets`` are
    ControlNet files or diffusers folders added to an SD3 model's own (a model folder's
    ``controlnet.safetensors``)."""
    if precision is not None:
        check_choice("precision", precision, PRECISIONS)
    gen = _load_generator(model, quantize, precision)
    if controlnets:
        if not isinstance(gen, SD3Generator):
            raise ValueError(f"{model} is not an SD3-family model; ControlNets work with SD3 / SD3.5 models")
        from t2i.models.controlnet import load_controlnet

        for path in controlnets:
            if Path(path).resolve() in getattr(gen, "_controlnet_files", set()):
                continue  # the folder's own ControlNet, already loaded with it
            gen.pipe.add_controlnet(load_controlnet(path))
    return gen


def _load_generator(model: str, quantize: str | None, precision: str | None) -> Generator:
    path = resolve_model(model)
    if (path / "model.json").exists():
        spec = read_model_json(path)
        build = {"sd3": _sd3_from_folder, "unclip": _unclip_from_folder}.get(spec.get("kind"))
        if build is None:
            raise ValueError(f"{path}/model.json has unknown kind {spec.get('kind')!r}; use sd3 or unclip")
        note = ""
        if precision is None:
            precision = spec.get("precision", "fp32")
            if precision not in PRECISIONS:
                raise ValueError(
                    f"{path}/model.json: precision must be one of {sorted(PRECISIONS)}, got {precision!r}"
                )
            if precision == "bf16" and not bf16_is_native("cpu"):
                # the folder's bf16 is a speed choice; where bf16 is emulated it is the slow path (t2i.nn.precision)
                precision, note = "fp32", f"running fp32, not the folder's bf16: {bf16_advice('cpu')}"
        try:
            gen = build(path, spec, quantize, precision)
            gen.precision, gen.precision_note = precision, note
            return gen
        except (KeyError, TypeError, AttributeError) as err:  # an entry missing or of the wrong JSON type
            raise ValueError(
                f"{path}/model.json is malformed ({type(err).__name__}: {err}); compare it with a folder that "
                "`t2i export` wrote"
            ) from None
    from t2i.pipelines.sd3 import PRESETS, SD3Pipeline

    def settings(p) -> Settings:
        extra = {"shift": p.shift, "slg_scale": p.slg_scale, "slg_layers": p.slg_layers, "slg_window": p.slg_window}
        if p.guidance_interval is not None:
            extra["guidance_interval"] = p.guidance_interval
        return Settings(p.steps, p.guidance, p.sampler, 1024, extra=extra)

    precision = precision or "fp32"
    pipe = SD3Pipeline.from_pretrained(path, quantize=quantize, autocast=PRECISIONS[precision])
    f = pipe.vae.downscale * pipe.transformer.cfg.patch_size
    gen = SD3Generator(
        pipe, path.name, settings(pipe.preset), (16 * f, pipe.transformer.cfg.pos_embed_max_size * f, f)
    )
    gen._presets = {name: settings(p) for name, p in PRESETS.items()}
    gen.precision = precision
    return gen


def write_model_json(out: Path, spec: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "model.json", json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")
