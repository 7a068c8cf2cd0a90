"""Shared helpers of the training tests (a plain module: conftest fixtures cannot be imported)."""

from __future__ import annotations


def tiny_overrides(out_dir, **extra) -> list[str]:
    base = {
        "run.out_dir": str(out_dir),
        "run.name": "t",
        "run.steps": 4,
        "run.progress": False,
        "run.threads": 1,
        "run.tensorboard": False,
        "run.log_every": 1,
        "run.num_samples": 4,
        "run.sample_steps": 2,
        "model.params": "{channels: 3, width: 8, depth: 1, time_dim: 16, num_classes: 4, groups: 4}",
        "data.image_size": 8,
        "data.batch_size": 8,
        "data.num_samples": 64,
        "task.params.path": "flow",
        "optim.lr": 0.01,
        "schedule.name": "constant",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
