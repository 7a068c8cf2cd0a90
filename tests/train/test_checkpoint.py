"""Checkpoints: atomic folders, keep-last-N, exact resume (in process and after SIGKILL), clear mismatch errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_overrides

from t2i.io import CheckpointMismatchError, load_weights, read_config
from t2i.train import checkpoint as ckpt_mod
from t2i.train.checkpoint import latest_checkpoint, list_checkpoints
from t2i.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_contents_and_keep_last(tiny_cfg, quiet):
    cfg = tiny_cfg(**{"run.steps": 6, "run.ckpt_every": 1, "run.keep_last": 2, "ema.enabled": True})
    tr = Trainer(cfg, out=quiet)
    tr.fit()
    found = list_checkpoints(tr.run_dir)
    assert [p.name for p in found] == ["step_00000005", "step_00000006"]
    files = sorted(os.listdir(found[-1]))
    assert files == ["ema.safetensors", "model.safetensors", "state.json", "state.safetensors"]
    assert read_config(found[-1] / "model.safetensors")["run"]["steps"] == 6
    assert not any(p.suffix == ".pkl" or p.suffix == ".pt" for p in tr.run_dir.rglob("*"))


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tiny_cfg, quiet, monkeypatch):
    cfg = tiny_cfg(**{"run.steps": 2, "run.ckpt_every": 1})
    tr = Trainer(cfg, out=quiet)
    tr.train_step()
    tr.save()
    good = latest_checkpoint(tr.run_dir)
    tr.train_step()

    def dies_half_way(*args, **kwargs):
        raise OSError("disk full")  # the model file is written, the state file is not

    monkeypatch.setattr(ckpt_mod, "save_state", dies_half_way)
    with pytest.raises(OSError):
        tr.save()
    assert (tr.run_dir / "checkpoints" / "step_00000002.partial" / "model.safetensors").exists()
    assert latest_checkpoint(tr.run_dir) == good  # the half-written step is invisible
    monkeypatch.undo()
    resumed = Trainer(cfg, out=quiet, resume=True)
    assert resumed.step == 1 and resumed.resumed_from == good
    explicit = Trainer(cfg, out=quiet, resume=str(good))  # what --resume-from CKPT passes
    assert explicit.step == 1
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Trainer(cfg, out=quiet, resume=str(good.parent / "step_00000002.partial"))


@pytest.mark.parametrize(("precision", "accum"), [("fp32", 1), ("bf16", 2)])
def test_resume_in_process_is_bit_exact(tiny_cfg, quiet, precision, accum):
    over = {
        "run.steps": 6,
        "run.precision": precision,
        "optim.grad_accum": accum,
        "ema.enabled": True,
        "schedule.name": "cosine",
        "schedule.warmup_steps": 2,
    }
    full = Trainer(tiny_cfg(**{**over, "run.name": "full"}), out=quiet)
    full.fit()
    first = Trainer(tiny_cfg(**{**over, "run.name": "part", "run.steps": 3}), out=quiet)
    first.fit()  # saves at step 3; its lr schedule was built for 3 steps, but only the step count is restored
    part = Trainer(tiny_cfg(**{**over, "run.name": "part"}), out=quiet, resume=True)
    assert part.step == 3
    part.fit()
    assert "config changed since that checkpoint: run.steps: 3 -> 6" in quiet.getvalue()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, part.model.state_dict()[k]), k
    for k, v in full.ema.module.state_dict().items():
        assert torch.equal(v, part.ema.module.state_dict()[k]), k


def test_resume_into_a_different_model_lists_every_mismatch(tiny_cfg, quiet):
    Trainer(tiny_cfg(**{"run.steps": 1}), out=quiet).fit()
    wider = "{channels: 3, width: 12, depth: 1, time_dim: 16, num_classes: 4, groups: 4}"
    with pytest.raises(CheckpointMismatchError) as err:
        Trainer(tiny_cfg(**{"model.params": wider}), out=quiet, resume=True)
    msg = str(err.value)
    assert "shape mismatch" in msg and "stem.weight: checkpoint (8, 3, 3, 3) vs model (12, 3, 3, 3)" in msg


def _train_cmd(out_dir: Path, name: str, steps: int, resume: bool = False) -> list[str]:
    over = tiny_overrides(out_dir, **{"run.name": name, "run.steps": steps, "run.ckpt_every": 2, "ema.enabled": True})
    cmd = [sys.executable, "-m", "t2i.cli.main", "train", str(ROOT / "configs" / "tiny" / "flow_rf.yaml"), *over]
    return [*cmd, "--resume"] if resume else cmd


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_at_random_step_then_resume_is_bit_exact(tmp_path):
    steps = 10
    subprocess.run(_train_cmd(tmp_path, "ref", steps), check=True, env=_env(), capture_output=True, timeout=120)

    kill_at = random.Random().randint(3, steps - 2)  # any step: the last checkpoint may be 0 or 1 steps back
    proc = subprocess.Popen(_train_cmd(tmp_path, "killed", steps), stdout=subprocess.PIPE, text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {kill_at} "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    last = latest_checkpoint(tmp_path / "killed")
    assert last is not None and int(last.name[5:]) < steps

    out = subprocess.run(
        _train_cmd(tmp_path, "killed", steps, resume=True), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"resumed from {last}" in out.stdout
    for file in ("model.safetensors", "ema.safetensors"):
        ref = load_weights(tmp_path / "ref" / "checkpoints" / f"step_{steps:08d}" / file)
        got = load_weights(tmp_path / "killed" / "checkpoints" / f"step_{steps:08d}" / file)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"{file} differs after resume (killed at {kill_at})"


def test_init_from_weights_refuses_pickle_without_the_flag(tiny_cfg, quiet, tmp_path):
    src = Trainer(tiny_cfg(**{"run.name": "src"}), out=quiet)
    torch.save(src.model.state_dict(), tmp_path / "init.pt")
    cfg = tiny_cfg(**{"run.name": "ft", "model.init_from": str(tmp_path / "init.pt"), "run.seed": 7})
    with pytest.raises(ValueError, match="pickle file"):
        Trainer(cfg, out=quiet)
    ft = Trainer(cfg, out=quiet, allow_pickle=True)
    assert all(torch.equal(v, src.model.state_dict()[k]) for k, v in ft.model.state_dict().items())
