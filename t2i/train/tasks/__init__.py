"""Training tasks: a model plus its objective, plugged into the one generic loop.

A task supplies what differs between models and nothing else:

- ``build_model()``: the network (by default the registered model named in ``cfg.model``, given what
  ``model_inputs()`` returns beside its config);
- ``loss(model, batch) -> [B]``: per-sample losses (the loop reduces them, so accumulation and multi-process
  averaging are the loop's business, never the task's);
- ``sample(model, n, seed=..., device=...)``: images in [-1, 1] for the periodic sample grids, or None when the
  task's outputs are not images.

Tasks register by name in ``TASKS``; configs select one with ``task.name`` and pass ``task.params``, which the task
validates against its own config dataclass (unknown keys are errors that name the nearest valid one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from t2i.models import build_model

from ..config import TrainConfig


def check_shape_target(cfg: TrainConfig, weight_key: str, weight: float, channels_key: str, channels: int) -> None:
    """The setup an auxiliary shape-map loss needs (``shape_map_target``): a weight >= 0 and, when it is on, one
    model channel per shape and data with scene metadata; each error names the config keys to set."""
    from t2i.shapes.world import SHAPES

    if weight < 0:
        raise ValueError(f"{weight_key} must be >= 0 (0: off), got {weight}")
    if weight == 0:
        return
    if channels != len(SHAPES):
        raise ValueError(f"{weight_key} trains one map per shape: set {channels_key}={len(SHAPES)}, got {channels}")
    if cfg.data.source != "shapes":
        raise ValueError(f"{weight_key} reads the scenes' metadata: it needs data.source=shapes")


def shape_map_target(batch: dict[str, Any], grid: int, device: torch.device) -> Tensor:
    """(B, len(SHAPES), grid, grid): each cell's coverage by each shape in the batch's scenes
    (``t2i.shapes.scenes.shape_maps`` of the ``meta`` lines the shapes data source attaches)."""
    import json

    import numpy as np

    from t2i.shapes.scenes import shape_maps
    from t2i.shapes.world import Scene

    maps = [shape_maps(Scene.from_dict(json.loads(m)["scene"]), grid) for m in batch["meta"]]
    return torch.from_numpy(np.stack(maps)).to(device)


class Task(ABC):
    """Base class of training tasks; subclasses set ``params_cls`` and implement ``loss`` and ``sample``."""

    params_cls: type

    def __init__(self, cfg: TrainConfig):
        from ..config import from_dict

        self.cfg = cfg
        self.params = from_dict(self.params_cls, cfg.task.params, "task.params.")
        # parts of the last loss a task wants logged beside it (e.g. an auxiliary loss), this process's last
        # micro-batch; the trainer adds them to the step's metrics
        self.extra_metrics: dict[str, float] = {}

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.model.name, self.cfg.model.params, **self.model_inputs())
        if self.cfg.model.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(
                    f"model {self.cfg.model.name!r} does not support gradient checkpointing; "
                    "set model.grad_checkpointing=false"
                )
            model.set_grad_checkpointing(True)
        return model

    def model_inputs(self) -> dict[str, Any]:
        """What the model's constructor needs beside its config (the CLIP task passes its tokenizer); none here."""
        return {}

    def setup_model(self, model: nn.Module) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Called once ``model.init_from`` is loaded, before the optimiser exists (LoRA injects adapters here)."""

    def saved_state(self, model: nn.Module) -> dict[str, Tensor]:
        """What a checkpoint's ``model.safetensors`` holds: the whole state dict unless a task trains a part."""
        return model.state_dict()

    def load_saved_state(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        """Inverse of ``saved_state``: check every name and shape, then load."""
        from t2i.io import check_state_dict

        check_state_dict(model.state_dict(), weights, what="model")
        model.load_state_dict(weights, strict=True)

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """Per-sample training losses ``[B]`` for one micro-batch."""

    @abstractmethod
    def sample(
        self, model: nn.Module, n: int, *, seed: int, device: torch.device, steps: int | None = None
    ) -> Tensor | None:
        """``n`` samples in [-1, 1] as ``(n, C, H, W)`` for a grid, or None if this task has no image output.

        ``steps`` overrides the sampler step count (``run.sample_steps``); ``seed`` fixes the samples, so grids of
        successive steps are comparable.
        """

    def caption_sampler(
        self, model: nn.Module, *, steps: int, device: torch.device
    ) -> Callable[[list[str], list[int]], Tensor] | None:
        """``fn(captions, seeds) -> (B, 3, H, W)`` images in [0, 1] drawn by ``model`` from captions alone, for
        scoring a run on the shapes benchmark while it trains (``run.eval_every``); None when this task cannot
        draw an image from a caption."""
        return None


def _registry() -> dict[str, type[Task]]:
    from .caption import CaptionTask
    from .controlnet import ControlNetTask
    from .diffusion import DiffusionTask
    from .distill import DistillTask
    from .lora import LoRATask
    from .sd3 import SD3Task
    from .unclip import ClipTask, DecoderTask, PriorTask, VQGANTask
    from .vae import VAETask

    return {
        "caption": CaptionTask,
        "controlnet": ControlNetTask,
        "diffusion": DiffusionTask,
        "distill": DistillTask,
        "lora": LoRATask,
        "clip": ClipTask,
        "unclip_prior": PriorTask,
        "unclip_decoder": DecoderTask,
        "vqgan": VQGANTask,
        "sd3": SD3Task,
        "vae": VAETask,
    }


def resolve_params(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` whose ``model.params`` and ``task.params`` list every field, defaults included.

    This is what ``--dry-run`` prints and what checkpoints store, so a checkpoint still describes its model exactly
    if a later release changes a default. It also validates both params mappings.
    """
    import dataclasses

    from t2i.models import model_config

    model_params = dataclasses.asdict(model_config(cfg.model.name, cfg.model.params))
    task_params = dataclasses.asdict(build_task(cfg).params)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, params=model_params),
        task=dataclasses.replace(cfg.task, params=task_params),
    )


def build_task(cfg: TrainConfig) -> Task:
    """The task named by ``cfg.task.name``, constructed from the whole config."""
    from t2i.errors import check_choice

    tasks = _registry()
    check_choice("task.name", cfg.task.name, tasks)
    return tasks[cfg.task.name](cfg)
