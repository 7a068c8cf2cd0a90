"""Multi-process training: 2 processes (DDP on gloo) give the weights of 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from train_helpers import tiny_overrides

from t2i.io import load_weights
from t2i.train.config import load_config
from t2i.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny" / "flow_rf.yaml")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _final(out: Path, name: str, steps: int, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_weights(out / name / "checkpoints" / f"step_{steps:08d}" / file)


def test_two_processes_match_one_with_ddp_and_fsdp(tmp_path, quiet):
    steps, accum = 3, 2  # accumulation too: gradients must be reduced on the last micro-batch only, exactly once
    # Adam's eps is raised for the reason given in test_loop's accumulation test: fp rounding noise in
    # near-zero gradients would otherwise be normalised into full-size steps
    common = {"run.steps": steps, "optim.eps": 1e-4, "optim.grad_accum": accum, "ema.enabled": True}
    one = tiny_overrides(tmp_path, **{**common, "run.name": "one"})
    subprocess.run(
        [sys.executable, "-m", "t2i.cli.main", "train", CONFIG, *one], check=True, env=_env(), capture_output=True
    )
    w1 = _final(tmp_path, "one", steps)
    init = Trainer(load_config(None, one), out=quiet).model.state_dict()
    assert sum((w1[k] - init[k]).abs().sum() for k in w1) > 0.1  # the runs trained
    for wrapper in ("ddp", "fsdp"):
        two = tiny_overrides(tmp_path, **{**common, "run.name": wrapper, "run.distributed": wrapper})
        res = subprocess.run(
            [*_torchrun(2), "-m", "t2i.cli.main", "train", CONFIG, *two], env=_env(), capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr[-3000:]
        for file in ("model.safetensors", "ema.safetensors"):
            ref, got = _final(tmp_path, "one", steps, file), _final(tmp_path, wrapper, steps, file)
            assert ref.keys() == got.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{wrapper} {file}: {k}")
        # rank 0 alone wrote the run's files: one metrics line per step, not one per process; and its grid
        assert len((tmp_path / wrapper / "metrics.jsonl").read_text().splitlines()) == steps
        assert (tmp_path / wrapper / "samples" / f"step_{steps:08d}.png").exists()
