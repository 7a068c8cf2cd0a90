"""LoRA fine-tuning as a task: any other task's model and objective, with only low-rank adapters trained.

The wrapped task (``base_task`` with ``base_params``) supplies the model, the loss and the samples; this task loads
nothing itself (``model.init_from`` holds the base weights, loaded by the loop), then injects adapters into the
layers matching ``targets`` and freezes everything else. Checkpoints hold the adapter alone, in the portable
``t2i.nn.lora.lora_state_dict`` layout (``{module}.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), so the
``model.safetensors`` of any LoRA checkpoint is directly a LoRA file for ``t2i lora`` and the pipelines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from t2i.nn.lora import inject_lora, lora_state_dict, mark_only_lora_trainable, set_lora_state_dict

from . import Task, build_task


@dataclass
class LoRATaskConfig:
    base_task: str = "diffusion"  # the task whose model and objective are fine-tuned
    base_params: dict[str, Any] = field(default_factory=dict)  # that task's task.params
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])  # dotted suffixes or globs
    rank: int = 4
    alpha: float | None = None  # scale alpha/rank; None = rank (scale 1)
    dropout: float = 0.0
    adapter: str = "default"  # adapter name inside the model
    require_base: bool = True  # refuse to train adapters on a randomly initialised model


class LoRATask(Task):
    """Train LoRA adapters on top of frozen base weights."""

    params_cls = LoRATaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        if p.base_task == "lora":
            raise ValueError("task.params.base_task cannot itself be 'lora'; name the task being fine-tuned")
        if p.require_base and not cfg.model.init_from:
            raise ValueError(
                "a LoRA run fine-tunes existing weights: set model.init_from=PATH.safetensors "
                "(or task.params.require_base=false to train adapters on a random model, e.g. in tests)"
            )
        inner_cfg = dataclasses.replace(
            cfg, task=dataclasses.replace(cfg.task, name=p.base_task, params=p.base_params)
        )
        self.inner = build_task(inner_cfg)

    def build_model(self) -> nn.Module:
        return self.inner.build_model()

    def setup_model(self, model: nn.Module) -> None:
        p = self.params
        inject_lora(model, p.targets, p.rank, alpha=p.alpha, dropout=p.dropout, name=p.adapter)
        mark_only_lora_trainable(model, [p.adapter])

    def saved_state(self, model: nn.Module) -> dict[str, Tensor]:
        return lora_state_dict(model, self.params.adapter)

    def load_saved_state(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        set_lora_state_dict(model, weights, name=self.params.adapter)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return self.inner.loss(model, batch)

    def sample(
        self, model: nn.Module, n: int, *, seed: int, device: torch.device, steps: int | None = None
    ) -> Tensor | None:
        return self.inner.sample(model, n, seed=seed, device=device, steps=steps)
