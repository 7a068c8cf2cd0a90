"""The on-disk layout of a ``t2i train`` run, read side: which checkpoints are complete and which weights to use.

A run folder holds ``checkpoints/step_00000120/`` per saved step (``t2i.train.checkpoint`` writes them, first as
``step_00000120.partial`` and renamed when complete, with ``state.json`` among the last files). Loading trained
weights (sampling, export, fine-tuning, distillation) needs only this read side, so it lives here, below every
layer that loads weights, and the trainer imports it rather than the other way round.
"""

from __future__ import annotations

from pathlib import Path

PARTIAL = ".partial"
STEP_PREFIX = "step_"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_step(ckpt: str | Path) -> int:
    """The step of a checkpoint folder ``step_00000120`` (120)."""
    return int(Path(ckpt).name[len(STEP_PREFIX) :].removesuffix(PARTIAL))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial folders and folders without state.json are skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(STEP_PREFIX)
        and not p.name.endswith(PARTIAL)
        and (p / "state.json").exists()
    ]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def trained_weights_file(path: str | Path) -> Path | None:
    """The weights file ``path`` names: a run folder's newest checkpoint or a checkpoint folder (its EMA weights
    when present), or the file itself; None when a run has no finished checkpoint."""
    p = Path(path)
    if not p.is_dir():
        return p
    ckpt = latest_checkpoint(p) if checkpoint_dir(p).is_dir() else p
    if ckpt is None:
        return None
    return ckpt / "ema.safetensors" if (ckpt / "ema.safetensors").exists() else ckpt / "model.safetensors"
