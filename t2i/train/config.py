"""Typed training configs: dataclasses per concern, YAML files, dotted command-line overrides.

A run is described by one ``TrainConfig`` with sections ``run``, ``model``, ``task``, ``data``, ``optim``,
``schedule`` and ``ema``. YAML files give any subset of fields; ``section.field=value`` overrides (the value is
parsed as YAML, so ``optim.betas=[0.9,0.95]`` works) are applied on top. Unknown keys are errors that name the key
and the nearest valid one: a typo must never silently fall back to a default (the failure mode of frameworks whose
EMA or amp settings were ignored). ``model.params`` and ``task.params`` are free-form here and are checked the same
way against the chosen model's or task's own config dataclass when it is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from t2i.errors import unknown_choice

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam", "lion", "lamb")
SCHEDULES = ("constant", "cosine", "linear", "exponential")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class RunConfig:
    name: str = "run"  # outputs go to <out_dir>/<name>/
    out_dir: str = "runs"
    seed: int = 0
    steps: int = 100  # optimiser steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, meant for GPUs)
    log_every: int = 10  # steps between metric lines
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    num_samples: int = 16  # images per sample grid
    sample_steps: int = 20  # sampler steps for the grids
    ckpt_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk
    distributed: str = "ddp"  # wrapper used under torchrun: ddp | fsdp
    progress: bool = True  # tqdm bar
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    threads: int = 0  # torch CPU threads (0: torch's default)
    deterministic: bool = False  # deterministic kernels: needed for bit-exact resume on GPUs (CPU kernels are)
    compile: bool = False  # torch.compile the training forward/backward (minutes to compile; then faster steps)
    # bf16 runs only: train the model's convolutions in channels-last layout. 1.4x the unCLIP decoder's bare
    # forward + backward + AdamW, but no gain inside the trainer's full step (EMA, clipping, the task's CLIP) and
    # slower for the VAE, so no default config asks for it (docs/performance.md)
    channels_last: bool = False
    # Scores on the shapes benchmark while training (tasks that draw from captions: sd3): the EMA weights (else the
    # model) draw the first ``eval_per_category`` prompts of each category of ``eval_split`` every ``eval_every``
    # steps and at the end; scores go to metrics.jsonl / TensorBoard and eval_curve.png (score vs CPU-minutes).
    eval_every: int = 0  # 0: never
    eval_per_category: int = 10
    eval_split: str = "eval"  # eval | heldout
    eval_steps: int | None = None  # sampler steps (default: run.sample_steps)


@dataclass
class ModelConfig:
    name: str = "toy_unet"  # a key of t2i.models.MODELS
    params: dict = field(default_factory=dict)  # fields of that model's config dataclass
    grad_checkpointing: bool = False  # recompute activations in backward (memory for compute)
    init_from: str | None = None  # weights to start from: safetensors; .pt/.bin only with --allow-pickle
    # submodules added to the model that init_from's file lacks (e.g. [shape_map_conv]): they keep their
    # initialisation; everything else must be in the file
    init_new: list[str] = field(default_factory=list)
    # when set, only these submodules (or parameters) train and everything else stays frozen as loaded, e.g.
    # [shape_cells, shape_head_out] to add a head to a trained model without changing what it already computes
    train_only: list[str] = field(default_factory=list)


@dataclass
class TaskConfig:
    name: str = "diffusion"  # a key of t2i.train.tasks.TASKS
    params: dict = field(default_factory=dict)  # fields of that task's config dataclass


@dataclass
class DataConfig:
    source: str = "toy"  # toy | shapes | folder | tar | embeddings
    path: str | None = None  # folder, shard pattern/URL list, or embeddings file (source dependent)
    batch_size: int = 16  # global samples per optimiser step (split over ranks and accumulation micro-batches)
    image_size: int = 16
    channels: int = 3
    num_samples: int = 512  # size of procedural sources (toy, shapes)
    num_classes: int = 4  # label classes of the toy source
    random_flip: bool = False
    random_crop: bool = False  # random crop (else centre crop) after resizing the short side
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    shapes_focus: str | None = None  # shapes source: only prompts naming this "colour shape" pair (a fine-tune set)
    # shapes source: category weights of the train stream, e.g. {position: 2, colors: 0.5}; unnamed categories
    # keep weight 1 (a curriculum lever: spend the samples where the model is weakest)
    shapes_weights: dict[str, float] | None = None
    # shapes source: the relations position prompts may use, e.g. ["left of", "above"] (default: all four). A
    # curriculum lever: with one direction per axis a model learns which object a sentence names first
    # (docs/quality_analysis.md measured that, and that the flip for "right of" was not learned after it)
    shapes_relations: list[str] | None = None
    # shapes source: where the train stream's words go: "random" (as the benchmark's splits draw them) or "centred"
    # (one layout per word: a model that need not first work out where a word starts learns its letters sooner)
    shapes_text_layout: str = "random"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | lion | lamb
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to norms, biases or embeddings
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    grad_accum: int = 1  # micro-batches per optimiser step


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | linear | exponential, after linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of optim.lr
    decay_rate: float = 0.5  # exponential: lr is multiplied by decay_rate every decay_steps
    decay_steps: int = 1000


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999  # per-step decay; ignored when half_life is set
    half_life: float | None = None  # half-life in training samples (EDM), batch-size invariant
    warmup: bool = True  # ramp the decay up from 0 early in training (EMA of the first steps is noise)
    update_every: int = 1  # optimiser steps between EMA updates


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


_CHOICES = {
    "run.precision": PRECISIONS,
    "run.distributed": DISTRIBUTED,
    "run.eval_split": ("eval", "heldout"),
    "optim.name": OPTIMIZERS,
    "schedule.name": SCHEDULES,
}

T = TypeVar("T")


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so YAML and JSON dumps are portable."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def unknown_key_error(key: str, valid: list[str], where: str) -> ValueError:
    """The error for an unknown config key: names it and, if one is close, the valid key it probably meant."""
    return unknown_choice("config key", key, valid, cutoff=0.5, prefix=where)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept YAML's string floats (``3e-4``) and ints as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{name} must not be null")
    if origin is list or (origin is tuple and typing.get_args(tp)[-1] is Ellipsis):
        (elem, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        items = [_coerce(v, elem, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:
                raise ValueError(f"{name} is too large to be a number ({value.bit_length()} bits)") from None
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # PyYAML reads 3e-4 (no dot) as a string
        if number is None:
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(number):  # no config value means "infinite": inf and nan are always typos or attacks
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {name}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and values of the wrong type."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key_error(str(key), names, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{where}{key}.")
            continue
        kwargs[key] = _coerce(value, tp, f"{where}{key}")
        choices = _CHOICES.get(f"{where}{key}")
        if choices and kwargs[key] not in choices:
            raise ValueError(f"{where}{key} must be one of {', '.join(choices)}, got {kwargs[key]!r}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], "3e-4"): the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be dotted, section.key (e.g. optim.lr)")
    try:
        return parts, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"override {text!r}: the value is not valid YAML ({problem}); quote it or fix it") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config mapping (validation happens in ``from_dict`` afterwards)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply overrides, and validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    cfg = from_dict(TrainConfig, apply_overrides(data, list(overrides)))
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no config file at {path}; the shipped ones are in configs/ (e.g. configs/tiny)")
    if not path.is_file():
        raise ValueError(f"{path} is a folder, not a config file; pass a .yaml file (e.g. configs/tiny/flow_rf.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; a config is YAML (e.g. configs/tiny/flow_rf.yaml)") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections (run, model, data, ...), got {type(data).__name__}")
    return data


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that a single field's type cannot express."""
    positive = {
        "run.steps": cfg.run.steps,
        "data.batch_size": cfg.data.batch_size,
        "optim.grad_accum": cfg.optim.grad_accum,
        "run.keep_last": cfg.run.keep_last,
        "ema.update_every": cfg.ema.update_every,
    }
    if cfg.run.eval_every:
        positive["run.eval_per_category"] = cfg.run.eval_per_category
        if cfg.run.eval_steps is not None:
            positive["run.eval_steps"] = cfg.run.eval_steps
    non_negative = {
        "run.eval_every": (cfg.run.eval_every, "0: no scoring while training"),
        "run.log_every": (cfg.run.log_every, "0: no metric lines"),
        "run.sample_every": (cfg.run.sample_every, "0: a grid at the end only"),
        "run.ckpt_every": (cfg.run.ckpt_every, "0: a checkpoint at the end only"),
        "run.num_samples": (cfg.run.num_samples, "0: no sample grids"),
        "run.threads": (cfg.run.threads, "0: torch's default"),
        "data.num_workers": (cfg.data.num_workers, "0: load in the training process"),
        "optim.weight_decay": (cfg.optim.weight_decay, "0: none"),
    }
    for name, (v, meaning) in non_negative.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0 ({meaning}), got {v}")
    for name, v in positive.items():
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    for name, v, most in (("data.batch_size", cfg.data.batch_size, 1 << 20), ("run.steps", cfg.run.steps, 1 << 40),
                          ("data.image_size", cfg.data.image_size, 1 << 14), ("run.num_samples", cfg.run.num_samples,
                          1 << 12), ("optim.grad_accum", cfg.optim.grad_accum, 1 << 16)):  # fmt: skip
        if v > most:  # would allocate or loop for ever before saying anything useful
            raise ValueError(f"{name}={v} is beyond any machine (at most {most}); did you mean a smaller value?")
    if cfg.data.image_size < 1:
        raise ValueError(f"data.image_size must be at least 1 px, got {cfg.data.image_size}")
    if cfg.model.init_new and not cfg.model.init_from:
        raise ValueError("model.init_new names parts that model.init_from's file lacks: set model.init_from too")
    if any(not isinstance(n, str) or not n for n in cfg.model.init_new):
        raise ValueError(f"model.init_new must be a list of submodule names, got {cfg.model.init_new}")
    if any(not isinstance(n, str) or not n for n in cfg.model.train_only):
        raise ValueError(f"model.train_only must be a list of submodule names, got {cfg.model.train_only}")
    if not 0 <= cfg.run.seed < 2**63:
        raise ValueError(f"run.seed must lie in [0, 2**63), got {cfg.run.seed}")
    if cfg.optim.eps <= 0:
        raise ValueError(f"optim.eps must be positive, got {cfg.optim.eps}")
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ValueError(f"optim.betas must each lie in [0, 1), got {list(cfg.optim.betas)}")
    if cfg.data.batch_size % cfg.optim.grad_accum:
        raise ValueError(
            f"data.batch_size ({cfg.data.batch_size}) must be divisible by optim.grad_accum ({cfg.optim.grad_accum}): "
            "every micro-batch has the same size so accumulation equals one big batch"
        )
    if cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg.optim.lr}")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ValueError(f"optim.grad_clip must be positive or null (no clipping), got {cfg.optim.grad_clip}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ValueError(f"ema.decay must lie in [0, 1), got {cfg.ema.decay}")
    if cfg.ema.half_life is not None and cfg.ema.half_life <= 0:
        raise ValueError(f"ema.half_life must be a positive number of samples, got {cfg.ema.half_life}")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ValueError(f"schedule.min_lr_ratio must lie in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if cfg.schedule.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {cfg.schedule.warmup_steps}")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``to_dict`` output (e.g. the copy stored in a checkpoint)."""
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg
