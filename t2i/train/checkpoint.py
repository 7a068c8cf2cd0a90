"""Training checkpoints: one folder per step, written atomically, keep-last-N, exact resume.

A checkpoint ``<run>/checkpoints/step_00000120/`` holds

- ``model.safetensors``: the trained weights, with the resolved config, schema version and git revision in its
  metadata (usable on its own for sampling or fine-tuning);
- ``ema.safetensors``: the EMA weights, when EMA is on;
- ``state.safetensors`` + ``state.json``: optimiser, lr schedule, EMA counter, grad-scaler, RNG states and the
  data position, through ``t2i.io.save_state`` (no pickle anywhere).

The folder is first written as ``step_00000120.partial`` and renamed when every file is on disk, so a crash at
any point leaves the previous checkpoints untouched and the half-written one invisible to ``latest_checkpoint``.

``checksums.json`` holds the SHA-256 of every other file, written last. Loading verifies it first, so a disk
that flipped bytes inside tensor data, or a file truncated or overwritten after the save, is caught before a
single weight is used; ``load_resumable`` then falls back to the newest checkpoint that verifies and says which
one it skipped. (Checkpoints written before checksums existed are loaded unverified.)
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2i.io import (
    CorruptFileError,
    atomic_write_text,
    check_state_dict,
    file_sha256,
    load_state,
    load_weights,
    read_metadata,
    save_state,
    save_weights,
)
from t2i.io.runs import PARTIAL, STEP_PREFIX, checkpoint_dir, latest_checkpoint, list_checkpoints, step_name
from t2i.io.safetensors_io import fsync_dir

CHECKSUMS = "checksums.json"

# -- RNG state ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load ----------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)  # one line each, for the user: skipped checkpoints, EMA restart


def write_checksums(folder: Path) -> None:
    """``checksums.json``: the SHA-256 of every file in ``folder`` (written last, atomically)."""
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    atomic_write_text(folder / CHECKSUMS, json.dumps({"sha256": sums}, indent=1, sort_keys=True))


def verify_checkpoint(folder: str | Path) -> bool:
    """Check every file of a checkpoint folder against its ``checksums.json``; raise ``CorruptFileError`` naming the
    first file that is missing or differs. Returns False (nothing verified) for a folder written without checksums.
    """
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.exists():
        return False
    try:
        sums = json.loads(listing.read_text())["sha256"]
        if not isinstance(sums, dict):
            raise TypeError("'sha256' is not a mapping")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{listing} is damaged ({err}); the checkpoint cannot be verified") from None
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing (listed in {CHECKSUMS}); the checkpoint is incomplete")
        if file_sha256(path) != digest:
            raise CorruptFileError(f"{path} fails its checksum: its bytes changed after it was saved")
    return True


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    state: dict[str, Any],
    config: dict[str, Any],
    ema: nn.Module | None = None,
    keep_last: int = 3,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically, then delete all but the newest ``keep_last``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / (step_name(step) + PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash
    tmp.mkdir()
    meta = {"step": str(step)}
    save_weights(tmp / "model.safetensors", model.state_dict(), config=config, metadata=meta)
    if ema is not None:
        save_weights(tmp / "ema.safetensors", ema.state_dict(), config=config, metadata={**meta, "ema": "1"})
    save_state(tmp / "state", {"step": step, **state}, metadata=meta)
    write_checksums(tmp)
    if final.exists():
        shutil.rmtree(final)  # re-saving a step (e.g. a final save right after a periodic one)
    tmp.rename(final)
    fsync_dir(root)
    _prune(run_dir, keep_last)
    return final


def _prune(run_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoint_dir(run_dir).glob(f"{STEP_PREFIX}*{PARTIAL}"):
        shutil.rmtree(partial, ignore_errors=True)


def resolve_resume(run_dir: str | Path, resume: str | bool) -> Path | None:
    """``True``/"latest" -> the newest checkpoint of ``run_dir`` (None if there is none); a path -> that folder."""
    if resume in (True, "latest", "auto"):
        return latest_checkpoint(run_dir)
    path = Path(str(resume))
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint folder (no state.json); pass --resume alone")
    return path


def _load_checked(module: nn.Module, weights: dict[str, Any]) -> None:
    check_state_dict(module.state_dict(), weights, what="model")
    module.load_state_dict(weights, strict=True)


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    ema: nn.Module | None = None,
    allow_pickle: bool = False,
    load_fn: Callable[[nn.Module, dict], None] | None = None,
) -> LoadedCheckpoint:
    """Load weights into ``model`` (and ``ema``) after checking every name and shape; return the training state.

    ``load_fn(module, weights)`` replaces the default whole-model check-and-load (a LoRA run saves adapters only).
    """
    path = Path(path)
    load_fn = load_fn or _load_checked
    verify_checkpoint(path)  # before any weight is used: a damaged file must not half-load a model
    state = load_state(path / "state")
    weights = load_weights(path / "model.safetensors", allow_pickle=allow_pickle)
    load_fn(model, weights)
    notes = []
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if ema_file.exists():
            load_fn(ema, load_weights(ema_file))
        else:
            # EMA switched on for a run that had none (or the file was lost): the average restarts from the weights
            ema.load_state_dict(model.state_dict(), strict=True)
            notes.append(f"warning: {path.name} has no ema.safetensors; the EMA restarts from the current weights")
    return LoadedCheckpoint(path, int(state["step"]), state, read_metadata(path / "model.safetensors"), notes)


def load_resumable(run_dir: str | Path, resume: str | bool, **load_kwargs: Any) -> LoadedCheckpoint | None:
    """Resume: ``True``/"latest" loads the newest checkpoint of ``run_dir`` that is intact, skipping damaged ones
    (each skip becomes a note); a path loads exactly that folder. None when the run has no checkpoint yet.

    A checkpoint that is intact but does not fit the model (``CheckpointMismatchError``) is not skipped: every
    older one would not fit either, and the config is what needs changing.
    """
    if resume not in (True, "latest", "auto"):
        return load_checkpoint(resolve_resume(run_dir, resume), **load_kwargs)
    skipped: list[str] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            loaded = load_checkpoint(path, **load_kwargs)
        except CorruptFileError as err:
            skipped.append(f"checkpoint {path.name} is damaged, skipped: {err}")
            continue
        if skipped:
            loaded.notes[:0] = [*skipped, f"resuming from {path.name}, the newest intact checkpoint"]
        return loaded
    if skipped:
        raise CorruptFileError(
            f"every checkpoint of {run_dir} is damaged; start a fresh run (without --resume) or restore one:\n  "
            + "\n  ".join(skipped)
        )
    return None
