"""What every t2i network shares: strict configs and ``save`` / ``load`` in the one model-file format.

Configs are dataclasses; ``make_config`` builds one from keyword arguments and refuses unknown keys with the nearest
valid one, so a typo in a config never turns into a silently ignored ``**kwargs``. ``SavableModel`` gives a network
``save(path)`` / ``Class.load(path)`` over ``t2i.models.files`` (safetensors with the config in the metadata).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from t2i.errors import unknown_choice

C = TypeVar("C")


def make_config(cls: type[C], cfg: C | None = None, kwargs: dict[str, Any] | None = None) -> C:
    """``cfg`` or ``cls(**kwargs)``, rejecting unknown keys with the nearest valid one (no ``**kwargs`` sinks)."""
    kwargs = kwargs or {}
    if cfg is not None:
        if kwargs:
            raise ValueError(f"pass either a {cls.__name__} or keyword arguments, not both (got {sorted(kwargs)})")
        if not isinstance(cfg, cls):
            raise ValueError(f"expected a {cls.__name__}, got {type(cfg).__name__}")
        return cfg
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in valid:
            raise unknown_choice(f"{cls.__name__} argument", key, valid, cutoff=0.5)
    return cls(**kwargs)


def tuples_from_json(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config read back from JSON) with lists turned back into tuples where ``cls`` declares tuples."""
    hints = typing.get_type_hints(cls)
    return {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints.get(k, "")) else v for k, v in data.items()}


class SavableModel(nn.Module):
    """``save(path)`` writes the one model-file format; ``Class.load(path)`` rebuilds the network from it."""

    config_cls: type
    kind: str  # its name in t2i.models.MODELS

    def save(self, path: str | Path) -> None:
        from .files import save_model_file

        save_model_file(path, self.kind, self, dtype=None)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu"):
        from .files import load_model_file

        model, _ = load_model_file(path, expect=cls.kind)
        return model.train().requires_grad_(True).to(device)
