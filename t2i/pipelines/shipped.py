"""Self-contained model folders: the default models that ship in ``models/`` and what ``t2i generate`` loads.

A model folder holds ``model.json`` (the pipeline kind, its sampling defaults and the training record of each part)
and one safetensors file per network, each carrying its own architecture config in the metadata, so nothing is
rebuilt from code defaults that might have changed since the file was written:

    models/sd3-shapes/    model.json  transformer.safetensors  vae.safetensors  clip.safetensors  README.md
    models/unclip-shapes/ model.json  clip.safetensors  prior.safetensors  decoder.safetensors  sr.safetensors

Weights are stored in fp16 (the repo's size budget) and loaded as fp32 for CPU inference. ``export_sd3`` and
``export_unclip`` write folders from ``t2i train`` runs (EMA weights of the newest checkpoint), reading the
settings the networks were trained with from the runs' stored configs, so sampling always matches training.

``load_generator`` turns a shipped name (``sd3-shapes``), a model folder, or an official SD3.5 file / diffusers
folder into a ``Generator``: one ``generate(prompts, seeds, ...)`` call whatever the family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from t2i.io import CheckpointMismatchError, check_state_dict, load_weights, read_metadata, save_weights
from t2i.io.safetensors_io import atomic_write_text

FORMAT = "t2i-model/1"
SHIPPED = ("sd3-shapes", "unclip-shapes", "sd3-shapes-turbo")


def models_dir() -> Path:
    """Where shipped models live: ``$T2I_MODELS_DIR``, else ``models/`` of the source checkout."""
    return Path(os.environ.get("T2I_MODELS_DIR") or Path(__file__).resolve().parents[2] / "models")


# ---------------------------------------------------------------------------------------------------------------
# components: one network per file, its config in the metadata


def save_component(path: str | Path, name: str, module: nn.Module, *, dtype=torch.float16, **extra: Any) -> None:
    """Write ``module`` (a ``t2i.models.MODELS`` entry called ``name``) with its config and ``extra`` JSON fields."""
    meta = {"t2i_component": name, "model_config": json.dumps(dataclasses.asdict(module.cfg), sort_keys=True)}
    meta["t2i_extra"] = json.dumps(extra, sort_keys=True)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    save_weights(path, sd, metadata=meta)


def load_component(path: str | Path, *, dtype=torch.float32) -> tuple[nn.Module, dict[str, Any]]:
    """(module in ``dtype``, its extra metadata) from a file written by ``save_component``."""
    from t2i.models import MODELS, model_config

    meta = read_metadata(path)
    name = meta.get("t2i_component")
    if name not in MODELS:
        raise ValueError(f"{path} is not a t2i model component (no known 't2i_component' in its metadata)")
    try:
        params = json.loads(meta["model_config"])
        extra = json.loads(meta.get("t2i_extra", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: its component metadata is damaged ({type(err).__name__}: {err})") from None
    if name == "clip":
        from t2i.models.clip import ClipEncoder, WordTokenizer

        tok = extra["tokenizer"]
        module = ClipEncoder.from_config(
            model_config("clip", params), WordTokenizer(tok["vocab"], tok["context_length"])
        )
        module.cfg = model_config("clip", params)
    else:
        module = MODELS[name][1](model_config(name, params))
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_weights(path).items()}
    try:  # every missing, unexpected or mis-shaped key in one error that names the file (a damaged or foreign file)
        check_state_dict(module.state_dict(), sd, what=f"{name} component")
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{path}: {err}") from None
    module.load_state_dict(sd, strict=True)
    return module.to(dtype).eval().requires_grad_(False), extra


def _clip_extra(clip) -> dict[str, Any]:
    return {"tokenizer": {"vocab": clip.tokenizer.vocab, "context_length": clip.tokenizer.context_length}}


# ---------------------------------------------------------------------------------------------------------------
# generators


@dataclass
class Settings:
    """Sampling settings of a generator; ``t2i generate`` flags override them."""

    steps: int
    cfg: float
    sampler: str
    size: int
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific (shift, prior steps, ...)

    def describe(self, model: str, seed: int) -> dict[str, Any]:
        """The settings of one image as A1111-style ``parameters`` fields (PNG metadata, server responses)."""
        from t2i import __version__

        return {"Steps": self.steps, "Sampler": self.sampler, "CFG scale": self.cfg, "Seed": seed,
                "Size": f"{self.size}x{self.size}", "Model": model,
                **{k.replace("_", " ").capitalize(): v for k, v in self.extra.items()},
                "Version": f"t2i {__version__}"}  # fmt: skip


# ``progress(done, total)`` after every sampler step of a ``Generator.generate`` call; it may raise to abort the call
# (the server does, when every client of a batch has gone away).
Progress = Callable[[int, int], None]


class Generator:
    """Prompts and seeds in, images ``(B, 3, H, W)`` in [0, 1] out."""

    name: str
    defaults: Settings
    _presets: dict[str, Settings] | None = None

    def presets(self) -> dict[str, Settings]:
        """Named settings (``t2i generate --preset``): the model folder's ``presets``, or SD3's for SD3 files."""
        return dict(self._presets or {})

    def check_size(self, size: int) -> None:
        raise NotImplementedError

    def generate(self, prompts: list[str], seeds: list[int], settings: Settings, *, negative: str = "",
                 progress: bool = False, callback: Progress | None = None) -> Tensor:  # fmt: skip
        """Images ``(B, 3, S, S)`` in [0, 1]; image ``k`` depends only on ``prompts[k]``, ``seeds[k]`` and the
        settings, not on the rest of the batch (up to float rounding)."""
        raise NotImplementedError


class SD3Generator(Generator):
    def __init__(self, pipe, name: str, defaults: Settings, sizes: tuple[int, int, int]):
        self.pipe, self.name, self.defaults = pipe, name, defaults
        self.min_size, self.max_size, self.multiple = sizes

    def check_size(self, size: int) -> None:
        if not (self.min_size <= size <= self.max_size and size % self.multiple == 0):
            raise ValueError(
                f"{self.name} makes square images of {self.min_size}-{self.max_size} px in steps of {self.multiple} "
                f"(trained at {self.defaults.size}); got --size {size}"
            )

    def generate(self, prompts, seeds, settings, *, negative="", progress=False, callback=None):
        s = settings
        sd3 = {k: v for k, v in s.extra.items() if k in ("shift", "slg_scale", "slg_layers", "slg_window")}
        sd3.update(steps=s.steps, cfg=s.cfg, sampler=s.sampler)
        step = None if callback is None else lambda d: callback(d["i"] + 1, s.steps)
        return self.pipe(prompts, negative_prompt=negative, seeds=list(seeds), height=s.size, width=s.size,
                         output="tensor", progress=progress, callback=step, **sd3)  # fmt: skip


class UnCLIPGenerator(Generator):
    def __init__(self, pipe, name: str, defaults: Settings):
        self.pipe, self.name, self.defaults = pipe, name, defaults
        self.sizes = [st.size for st in pipe.stages]

    def check_size(self, size: int) -> None:
        if size not in self.sizes:
            raise ValueError(f"{self.name} makes {' or '.join(map(str, self.sizes))} px images (its cascade "
                             f"stages); got --size {size}")  # fmt: skip

    def _configure(self, s: Settings) -> int:
        """Set the cascade's stages from ``s``; the index of the last stage to run."""
        for k, st in enumerate(self.pipe.stages):
            st.steps, st.sampler = s.steps, s.sampler
            st.guidance = s.cfg if k == 0 else 1.0  # guidance of the base stage; upsamplers are unconditional
        self.pipe.prior.sampler = s.sampler
        if "prior_steps" in s.extra:
            self.pipe.prior.steps = int(s.extra["prior_steps"])
        return self.sizes.index(s.size)

    def _total_steps(self, settings: Settings) -> int:
        """Callback calls of one ``generate``: the prior's steps, then each stage's up to ``settings.size``."""
        prior_steps = int(settings.extra.get("prior_steps", self.pipe.prior.steps))
        return prior_steps + settings.steps * (self.sizes.index(settings.size) + 1)

    def generate(self, prompts, seeds, settings, *, negative="", progress=False, callback=None):
        from t2i.diffusion import Seeds

        if negative:
            raise ValueError("unCLIP models guide with a null caption; --negative is not supported for them")
        s = settings
        stop = self._configure(s)
        total, done = self._total_steps(s), [0]

        def step(_):
            done[0] += 1
            callback(done[0], total)

        step = None if callback is None else step
        seeds = Seeds(list(seeds))
        embed, tokens, mask = self.pipe.image_embeds_from_text(list(prompts), seeds, callback=step)
        images = self.pipe.decode(
            embed, seeds=seeds, text_tokens=tokens, text_mask=mask, stop_stage=stop, callback=step
        )
        return ((images.float() + 1) / 2).clamp(0, 1)


def _read_model_json(folder: Path) -> dict[str, Any]:
    try:
        spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}/model.json is not valid JSON ({err}); restore the folder's copy") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{folder}/model.json must hold a JSON object, got {type(spec).__name__}")
    if spec.get("format") != FORMAT:
        raise ValueError(f"{folder}/model.json is format {spec.get('format')!r}; this t2i reads {FORMAT!r}")
    return spec


def _settings(d: dict[str, Any]) -> Settings:
    d = dict(d)
    return Settings(int(d.pop("steps")), float(d.pop("cfg")), d.pop("sampler"), int(d.pop("size")), extra=d)


def _folder_presets(spec: dict[str, Any]) -> dict[str, Settings]:
    """Presets of a model folder: partial settings over the defaults."""
    return {name: _settings({**spec["defaults"], **over}) for name, over in spec.get("presets", {}).items()}


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


def _sd3_from_folder(folder: Path, spec: dict[str, Any]) -> SD3Generator:
    from t2i.models.text import ClipTextConditioner
    from t2i.models.vae import LatentFormat
    from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset

    transformer, _ = load_component(component_file(folder, spec, "transformer"))
    vae, vae_extra = load_component(component_file(folder, spec, "vae"))
    vae.latent_format = LatentFormat(**vae_extra["latent_format"])
    clip, _ = load_component(component_file(folder, spec, "clip"))
    text = ClipTextConditioner(clip, spec["text_layer"], spec.get("text_chars", 0), spec.get("text_words", False))
    d = _settings(spec["defaults"])
    preset = SD3Preset(steps=d.steps, cfg=d.cfg, sampler=d.sampler, shift=d.extra.get("shift", 3.0))
    pipe = SD3Pipeline(transformer, vae, text, preset=preset, device="cpu")
    f = vae.downscale * transformer.cfg.patch_size
    gen = SD3Generator(pipe, spec["name"], d, (2 * f, transformer.cfg.pos_embed_max_size * f, f))
    gen._presets = _folder_presets(spec)
    return gen


def _unclip_from_folder(folder: Path, spec: dict[str, Any]) -> UnCLIPGenerator:
    from t2i.diffusion import VPPath
    from t2i.pipelines.unclip import DecoderStage, LowresAugment, PriorSpec, UnCLIPPipeline

    clip, _ = load_component(folder / "clip.safetensors")
    p = spec["prior"]
    prior_net, _ = load_component(_contained_file(folder, p["file"], "prior.file"))
    prior = PriorSpec(prior_net, VPPath(p["schedule"], p["timesteps"]), p["prediction"], sampler=p["sampler"],
                      steps=p["steps"], guidance=p["guidance"], num_candidates=p["candidates"])  # fmt: skip
    stages = []
    for st in spec["stages"]:
        net, _ = load_component(_contained_file(folder, st["file"], "stages[].file"))
        low = None
        if st.get("lowres_size"):
            low = LowresAugment(st["lowres_size"], sample_level=st["sample_level"])
        path = VPPath(st["schedule"], st["timesteps"])
        stages.append(DecoderStage(net, st["size"], path, st["prediction"], sampler=st["sampler"], steps=st["steps"],
                                   guidance=st["guidance"], lowres=low))  # fmt: skip
    gen = UnCLIPGenerator(UnCLIPPipeline(clip, prior, stages), spec["name"], _settings(spec["defaults"]))
    gen._presets = _folder_presets(spec)
    return gen


def model_folder(model: str) -> Path | None:
    """The t2i model folder ``model`` names (a shipped name or a path), or None if it is not one."""
    path = Path(model)
    if model in SHIPPED and not path.exists():
        path = models_dir() / model
    return path if (path / "model.json").exists() else None


def load_generator(model: str) -> Generator:
    """A shipped model name, a t2i model folder, or an official SD3/SD3.5 file or diffusers folder."""
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
    if (path / "model.json").exists():
        spec = _read_model_json(path)
        build = {"sd3": _sd3_from_folder, "unclip": _unclip_from_folder}.get(spec.get("kind"))
        if build is None:
            raise ValueError(f"{path}/model.json has unknown kind {spec.get('kind')!r}; use sd3 or unclip")
        try:
            return build(path, spec)
        except (KeyError, TypeError, AttributeError) as err:  # an entry missing or of the wrong JSON type
            raise ValueError(
                f"{path}/model.json is malformed ({type(err).__name__}: {err}); compare it with a folder that "
                "`t2i export` wrote"
            ) from None
    from t2i.pipelines.sd3 import PRESETS, SD3Pipeline

    def settings(p) -> Settings:
        extra = {"shift": p.shift, "slg_scale": p.slg_scale, "slg_layers": p.slg_layers, "slg_window": p.slg_window}
        return Settings(p.steps, p.cfg, p.sampler, 1024, extra=extra)

    pipe = SD3Pipeline.from_pretrained(path)
    f = pipe.vae.downscale * pipe.transformer.cfg.patch_size
    gen = SD3Generator(
        pipe, path.name, settings(pipe.preset), (16 * f, pipe.transformer.cfg.pos_embed_max_size * f, f)
    )
    gen._presets = {name: settings(p) for name, p in PRESETS.items()}
    return gen


# ---------------------------------------------------------------------------------------------------------------
# export from training runs


def _run_part(run: str | Path, name: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(EMA network, stored run config, training record) of the newest checkpoint of a ``t2i train`` run."""
    from t2i.io import read_config
    from t2i.train.tasks.unclip import load_trained, trained_weights_file

    run = Path(run)
    if run.is_file() and read_metadata(run).get("t2i_component") == name:
        # a component of an existing model folder (keep its VAE / CLIP, retrain the rest): its training record
        # comes from that folder's model.json
        net, _ = load_component(run)
        spec = _read_model_json(run.parent) if (run.parent / "model.json").is_file() else {}
        return net, {}, dict(spec.get("training", {}).get(run.stem) or {"component": str(run)})
    weights = trained_weights_file(str(run)) if (run / "checkpoints").is_dir() else None
    if weights is None:
        raise FileNotFoundError(
            f"{run} has no checkpoint; train it with `t2i train configs/default/...yaml`, or "
            "give a component file of a model folder (e.g. models/sd3-shapes/vae.safetensors)"
        )
    ckpt = weights.parent
    cfg = read_config(weights)
    net = load_trained(str(weights), name)
    step = int(ckpt.name.split("_")[-1])
    record = {"run": run.name, "checkpoint": ckpt.name, "weights": weights.name, "step": step,
              "batch_size": cfg["data"]["batch_size"], "samples": step * cfg["data"]["batch_size"],
              "precision": cfg["run"]["precision"], "threads": cfg["run"]["threads"],
              "params": sum(p.numel() for p in net.parameters()),
              "seed": cfg["run"]["seed"], "train_seconds": _train_seconds(run)}  # fmt: skip
    cpu = _last_metric(run, "cpu_seconds")
    if cpu is not None:
        record["cpu_seconds"] = round(cpu, 1)
    earlier = _stage_record(cfg.get("model", {}).get("init_from"))
    if earlier is not None:  # a later stage of a curriculum: the card counts the stage it started from too
        record["started_from"] = earlier
    return net, cfg, record


def _stage_record(init_from: str | None, depth: int = 0) -> dict[str, Any] | None:
    """The training record of the run checkpoint a run started from (``model.init_from``), or None when it did not
    start from a ``t2i train`` checkpoint (``<run>/checkpoints/step_N/<file>``) that is still on disk. A stage that
    itself continued an earlier one carries that one's record as its ``started_from``, and so on."""
    if not init_from or depth > 16:  # a curriculum, not a cycle
        return None
    p = Path(init_from)
    if p.parent.parent.name != "checkpoints" or not (p.parents[2] / "metrics.jsonl").is_file():
        return None
    from t2i.io import read_config
    from t2i.train.report import read_metrics

    run, step = p.parents[2], int(p.parent.name.split("_")[-1])
    cfg = read_config(p) if p.is_file() else None
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get("step", 0) <= step and "cpu_seconds" in r]
    rec: dict[str, Any] = {"run": run.name, "checkpoint": p.parent.name, "weights": p.name, "step": step}
    if cfg:
        rec.update(batch_size=cfg["data"]["batch_size"], samples=step * cfg["data"]["batch_size"],
                   threads=cfg["run"]["threads"], seed=cfg["run"]["seed"])  # fmt: skip
    rec["train_seconds"] = _train_seconds(run)
    if rows:
        rec["cpu_seconds"] = round(rows[-1]["cpu_seconds"], 1)
    earlier = _stage_record((cfg or {}).get("model", {}).get("init_from"), depth + 1)
    if earlier is not None:
        rec["started_from"] = earlier
    return rec


def _last_metric(run: Path, key: str) -> float | None:
    """The last logged value of ``key`` in a run's ``metrics.jsonl`` (None when it never logged one)."""
    from t2i.train.report import read_metrics

    return next((r[key] for r in reversed(read_metrics(run / "metrics.jsonl")) if key in r), None)


def _train_seconds(run: Path) -> float | None:
    """Wall-clock training time summed over the run's logged intervals (resumes included)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        return None
    total, prev = 0.0, rows[0]
    for row in rows[1:]:
        if row["step"] > prev["step"] and row["time"] > prev["time"]:
            dt = row["time"] - prev["time"]
            total += dt if dt < 600 else 0.0  # a gap of > 10 min between logs is a stopped run, not training
        prev = row
    first = rows[0]
    return round(total + first["step"] * (total / max(rows[-1]["step"] - first["step"], 1)), 1)


def _write_model(out: Path, spec: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "model.json", json.dumps({"format": FORMAT, **spec}, indent=2) + "\n")


def export_sd3(out: str | Path, *, transformer: str, vae: str, clip: str, name: str = "sd3-shapes",
               defaults: dict[str, Any] | None = None, share_from: str | Path | None = None) -> Path:  # fmt: skip
    """A ``sd3`` model folder from an ``sd3`` task run and the VAE and CLIP runs it was trained with.

    ``share_from``: an existing sd3 model folder whose VAE and text encoder this one uses (a distilled student
    and its teacher): ``model.json`` points at that folder's files instead of holding copies. They must hold the
    same weights as the ``vae`` and ``clip`` runs, which is checked."""
    from t2i.models.vae import LatentFormat

    out = Path(out)
    net, cfg, rec = _run_part(transformer, "mmdit")
    task = cfg["task"]["params"]
    student = {}
    if cfg["task"]["name"] == "distill":  # a few-step student: its base task's settings, its own step preset
        from t2i.train.tasks.sd3 import SD3TaskConfig

        student = {"steps": task["student_steps"], "cfg": 1.0,
                   "sampler": "consistency" if task["method"] == "consistency" else "euler"}  # fmt: skip
        rec["distilled"] = {k: task[k] for k in ("method", "teacher", "guidance", "student_steps")}
        task = {**dataclasses.asdict(SD3TaskConfig()), **task["base_params"]}
    vae_net, _, vae_rec = _run_part(vae, "sd3_vae")
    if task.get("latent_scale") is None:
        raise ValueError(f"{transformer}: pin task.params.latent_scale/latent_shift in its config before export")
    fmt = LatentFormat(task["latent_scale"], task["latent_shift"])
    clip_net, _, clip_rec = _run_part(clip, "clip")
    out.mkdir(parents=True, exist_ok=True)
    save_component(out / "transformer.safetensors", "mmdit", net)
    curve = Path(transformer) / "eval_curve.png"  # the run's learning curve, when it was scored while training
    if curve.is_file():
        shutil.copyfile(curve, out / "learning_curve.png")
    components = {}
    if share_from is not None:
        shared = Path(share_from)
        shared_spec = _read_model_json(shared)
        for part, module in (("vae", vae_net), ("clip", clip_net)):
            f = component_file(shared, shared_spec, part)
            theirs, extra = load_component(f)
            ours = {k: v.half().float() for k, v in module.state_dict().items()}  # as stored: fp16
            if theirs.state_dict().keys() != ours.keys() or any(
                not torch.equal(v, ours[k]) for k, v in theirs.state_dict().items()
            ):
                raise ValueError(f"{f} does not hold the weights of the {part} run given; export without sharing")
            if part == "vae" and extra.get("latent_format") != dataclasses.asdict(fmt):
                raise ValueError(f"{f} has latent format {extra.get('latent_format')}, the run {fmt}")
            components[part] = os.path.relpath(f, out)
    else:
        save_component(out / "vae.safetensors", "sd3_vae", vae_net, latent_format=dataclasses.asdict(fmt))
        save_component(out / "clip.safetensors", "clip", clip_net, **_clip_extra(clip_net))
    d = {"steps": cfg["run"]["sample_steps"], "cfg": task["guidance"], "sampler": task["sampler"],
         "size": cfg["data"]["image_size"], "shift": task["shift"], **student, **(defaults or {})}  # fmt: skip
    spec = {"kind": "sd3", "name": name, "text_layer": task["text_layer"], "defaults": d,
            "training": {"transformer": rec, "vae": vae_rec, "clip": clip_rec}}  # fmt: skip
    if task.get("text_chars"):
        spec["text_chars"] = task["text_chars"]
    if task.get("text_words"):
        spec["text_words"] = True
    if components:
        spec["components"] = components
    _write_model(out, spec)
    return out


def export_unclip(
    out: str | Path,
    *,
    clip: str,
    prior: str,
    decoder: str,
    sr: str,
    name: str = "unclip-shapes",
    defaults: dict[str, Any] | None = None,
    prior_settings: dict[str, Any] | None = None,
) -> Path:
    """An ``unclip`` model folder from CLIP, prior, base-decoder and super-resolution runs."""
    out = Path(out)
    clip_net, _, clip_rec = _run_part(clip, "clip")
    prior_net, pcfg, prior_rec = _run_part(prior, "unclip_prior")
    pt = pcfg["task"]["params"]
    out.mkdir(parents=True, exist_ok=True)
    save_component(out / "clip.safetensors", "clip", clip_net, **_clip_extra(clip_net))
    save_component(out / "prior.safetensors", "unclip_prior", prior_net)
    prior_spec = {"file": "prior.safetensors", "schedule": pt["vp_schedule"], "timesteps": pt["num_train_timesteps"],
                  "prediction": pt["prediction"], "sampler": "ddim", "steps": 32, "guidance": 2.0, "candidates": 2,
                  **(prior_settings or {})}  # fmt: skip
    stages, records = [], {"clip": clip_rec, "prior": prior_rec}
    for key, run in (("decoder", decoder), ("sr", sr)):
        net, cfg, rec = _run_part(run, "unclip_unet")
        t = cfg["task"]["params"]
        save_component(out / f"{key}.safetensors", "unclip_unet", net)
        records[key] = rec
        stages.append({"file": f"{key}.safetensors", "size": t.get("stage_size") or cfg["data"]["image_size"],
                       "schedule": t["vp_schedule"], "timesteps": t["num_train_timesteps"],
                       "prediction": t["prediction"], "sampler": t["sampler"], "steps": cfg["run"]["sample_steps"],
                       "guidance": t["guidance"], "lowres_size": t.get("lowres_size"),
                       "sample_level": t["sample_level"]})  # fmt: skip
    d = {"steps": stages[0]["steps"], "cfg": stages[0]["guidance"], "sampler": stages[0]["sampler"],
         "size": stages[-1]["size"], **(defaults or {})}  # fmt: skip
    _write_model(out, {"kind": "unclip", "name": name, "prior": prior_spec, "stages": stages, "defaults": d,
                       "training": records})  # fmt: skip
    return out
