"""Checkpoints: atomic folders, keep-last-N, exact resume (in process and after SIGKILL), clear mismatch errors."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_overrides

from t2i.io import CheckpointMismatchError, CorruptFileError, load_weights, read_config
from t2i.train import checkpoint as ckpt_mod
from t2i.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from t2i.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_contents_and_keep_last(tiny_cfg, quiet):
    cfg = tiny_cfg(**{"run.steps": 6, "run.ckpt_every": 1, "run.keep_last": 2, "ema.enabled": True})
    tr = Trainer(cfg, out=quiet)
    tr.fit()
    found = list_checkpoints(tr.run_dir)
    assert [p.name for p in found] == ["step_00000005", "step_00000006"]
    files = sorted(os.listdir(found[-1]))
    assert files == ["checksums.json", "ema.safetensors", "model.safetensors", "state.json", "state.safetensors"]
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


def _flip_byte(path: Path, offset_from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40  # inside the tensor data, past the header: safetensors itself cannot notice
    path.write_bytes(bytes(data))


def _damaged_run(tiny_cfg, quiet, **extra):
    cfg = tiny_cfg(**{"run.steps": 3, "run.ckpt_every": 1, "run.keep_last": 3, "ema.enabled": True, **extra})
    tr = Trainer(cfg, out=quiet)
    tr.fit()
    return cfg, list_checkpoints(tr.run_dir)


@pytest.mark.parametrize("damage", ["flipped_tensor_byte", "truncated", "garbage", "state_json", "ema_missing_listed"])
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(tiny_cfg, quiet, damage):
    cfg, (_, second, newest) = _damaged_run(tiny_cfg, quiet)
    assert verify_checkpoint(newest)
    if damage == "flipped_tensor_byte":
        _flip_byte(newest / "model.safetensors")
    elif damage == "truncated":
        f = newest / "ema.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        (newest / "state.safetensors").write_bytes(os.urandom(256))
    elif damage == "state_json":
        (newest / "state.json").write_text("{")
    else:
        (newest / "ema.safetensors").unlink()
    with pytest.raises(CorruptFileError, match=str(newest)):
        verify_checkpoint(newest)
    log = io.StringIO()
    resumed = Trainer(cfg, out=log, resume=True)
    assert resumed.step == 2 and resumed.resumed_from == second
    said = log.getvalue().splitlines()
    assert said[0].startswith("checkpoint step_00000003 is damaged, skipped:") and "step_00000003" in said[0]
    assert said[1] == "resuming from step_00000002, the newest intact checkpoint"
    ref = load_weights(second / "model.safetensors")
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in ref.items())


def test_every_checkpoint_damaged_or_one_named_is_a_clear_error(tiny_cfg, quiet):
    cfg, found = _damaged_run(tiny_cfg, quiet)
    _flip_byte(found[-1] / "model.safetensors")
    with pytest.raises(CorruptFileError, match="fails its checksum"):  # an explicit --resume-from does not fall back
        Trainer(cfg, out=quiet, resume=str(found[-1]))
    for path in found[:-1]:
        _flip_byte(path / "state.safetensors")
    with pytest.raises(CorruptFileError, match=r"every checkpoint .* is damaged; start a fresh run"):
        Trainer(cfg, out=quiet, resume=True)


def test_checkpoint_without_checksums_still_loads_and_a_missing_ema_warns(tiny_cfg, quiet):
    cfg, found = _damaged_run(tiny_cfg, quiet)
    (found[-1] / "checksums.json").unlink()  # written before checksums existed
    (found[-1] / "ema.safetensors").unlink()
    assert verify_checkpoint(found[-1]) is False
    log = io.StringIO()
    resumed = Trainer(cfg, out=log, resume=True)
    assert resumed.step == 3
    assert "step_00000003 has no ema.safetensors; the EMA restarts from the current weights" in log.getvalue()


def test_unreadable_weights_file_is_named_in_one_error(tmp_path):
    from t2i.io import load_state

    bad = tmp_path / "w.safetensors"
    for content in (b"", os.urandom(64), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"):
        bad.write_bytes(content)
        with pytest.raises(CorruptFileError, match=r"w\.safetensors is not a readable safetensors file"):
            load_weights(bad)
    (tmp_path / "s.json").write_text('{"t2i_schema_version": 1, "state": {"a": {"__tensor__": "a"}}}')
    (tmp_path / "s.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CorruptFileError, match="do not match"):
        load_state(tmp_path / "s")


@pytest.mark.parametrize(("precision", "accum"), [("fp32", 1), ("bf16", 2)])
def test_resume_in_process_is_bit_exact(tiny_cfg, quiet, precision, accum):
    over = {
        "run.steps": 6,
        "run.precision": precision,
        "run.channels_last": precision == "bf16",  # also: optimizer state resumed in its parameter's layout
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


def _split_run_matches_whole(config: str, tmp_path, quiet, *extra: str) -> None:
    """6 steps in one go, or 3 steps then a resume to 6: every weight and EMA weight must be bitwise equal."""
    from t2i.train.config import load_config

    def cfg(name, steps):
        over = [f"run.out_dir={tmp_path}", f"run.name={name}", f"run.steps={steps}", "run.sample_every=0",
                "run.num_samples=0", "run.ckpt_every=0", "run.log_every=1", "run.tensorboard=false",
                "run.precision=fp32", "schedule.name=constant", "schedule.warmup_steps=0", *extra]  # fmt: skip
        return load_config(str(ROOT / "configs" / "tiny" / config), over)

    full = Trainer(cfg("full", 6), out=quiet)
    full.fit()
    Trainer(cfg("part", 3), out=quiet).fit()
    part = Trainer(cfg("part", 6), out=quiet, resume=True)
    assert part.step == 3
    part.fit()
    for name, a, b in (("model", full.model, part.model), ("ema", full.ema.module, part.ema.module)):
        got = b.state_dict()
        for k, v in a.state_dict().items():
            assert torch.equal(v, got[k]), f"{name} {k}"


def test_resume_with_dropout_is_bit_exact(tmp_path, quiet):
    # dropout draws from the global generator during training: nothing may draw from it between the restore of
    # the saved RNG state and the first resumed step (the data loader's seed once did)
    _split_run_matches_whole("unclip_prior.yaml", tmp_path, quiet, "model.params.dropout=0.1")


def test_resume_of_a_distillation_run_is_bit_exact(tmp_path, quiet):
    base = "{path: flow, cfg_dropout: 0.1, guidance: 2.0}"
    params = (f"task.params={{method: adversarial, base_task: diffusion, base_params: {base}, guidance: 2.0, "
              "student_steps: 2, teacher_steps: 4, feature_layers: [mid.0], require_teacher: false}")  # fmt: skip
    _split_run_matches_whole("flow_rf.yaml", tmp_path, quiet, "task.name=distill", params, "data.num_samples=64")


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
