"""Model folders: loading, format errors, and files a model.json may name."""

from __future__ import annotations

import json

import pytest
from model_folders import tiny_sd3_folder

from t2i.pipelines.folders import load_generator, model_folder


def test_unknown_models_get_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped name"):
        load_generator(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_generator(str(bad))


def test_model_folder_names_folders_only(tmp_path):
    assert model_folder(str(tmp_path)) is None
    (tmp_path / "model.json").write_text("{}")
    assert model_folder(str(tmp_path)) == tmp_path


def test_a_component_with_a_damaged_key_name_is_one_error_naming_it(tmp_path):
    """Found by the fuzz suite: a flipped byte inside a key name made load_state_dict raise a RuntimeError."""
    import shutil

    from t2i.io import CheckpointMismatchError

    folder = tmp_path / "m"
    shutil.copytree(tiny_sd3_folder(tmp_path / "src"), folder)
    blob = (folder / "clip.safetensors").read_bytes()
    key = b"model.text_model.encoder.layers.0.self_attn.k_proj.bias"
    assert key in blob
    (folder / "clip.safetensors").write_bytes(blob.replace(key, b"l" + key[1:], 1))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)clip\.safetensors: .*missing key.*k_proj\.bias"):
        load_generator(str(folder))


def _set_precision(folder, precision):
    spec = json.loads((folder / "model.json").read_text())
    spec["precision"] = precision
    (folder / "model.json").write_text(json.dumps(spec))


@pytest.fixture
def native_bf16(monkeypatch):
    """As on a CPU with native bf16 matmuls (AVX-512 BF16, AMX), whatever this machine has."""
    monkeypatch.setattr("t2i.pipelines.folders.bf16_is_native", lambda device_type="cpu": True)


def test_precision_comes_from_model_json_and_can_be_overridden(tmp_path, native_bf16):
    import torch
    from model_folders import tiny_unclip_folder

    sd3 = tiny_sd3_folder(tmp_path / "sd3")
    assert load_generator(str(sd3)).precision == "fp32"  # folders written before the field: fp32
    assert load_generator(str(sd3)).pipe.autocast is None
    _set_precision(sd3, "bf16")
    gen = load_generator(str(sd3))
    assert gen.precision == "bf16" and gen.pipe.autocast == torch.bfloat16
    assert load_generator(str(sd3), precision="fp32").pipe.autocast is None

    unclip = tiny_unclip_folder(tmp_path / "unclip")
    _set_precision(unclip, "bf16")
    gen = load_generator(str(unclip))
    assert gen.precision == "bf16" and gen.pipe.autocast == torch.bfloat16
    for st in gen.pipe.stages:  # bf16 convolutions run channels-last
        assert st.net.init_conv.weight.is_contiguous(memory_format=torch.channels_last)
    s = gen.settings(steps=2)
    fast = gen.generate(["a red circle"], [0], s)
    plain = load_generator(str(unclip), precision="fp32").generate(["a red circle"], [0], s)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert (fast - plain).abs().mean() < 0.05  # random tiny nets: the same image up to bf16 rounding


def test_a_folders_bf16_runs_fp32_where_bf16_is_emulated_unless_asked_for(tmp_path, monkeypatch):
    """A folder's bf16 is a speed choice: on a CPU that emulates bf16 matmuls (an AVX2-only one, where they measure
    tens of times slower than fp32) it runs fp32 and says why; an explicit precision is always honoured."""
    import torch

    monkeypatch.setattr("t2i.pipelines.folders.bf16_is_native", lambda device_type="cpu": False)
    sd3 = tiny_sd3_folder(tmp_path / "sd3")
    _set_precision(sd3, "bf16")
    gen = load_generator(str(sd3))
    assert gen.precision == "fp32" and gen.pipe.autocast is None
    assert "not the folder's bf16" in gen.precision_note and "no native bf16 matmul" in gen.precision_note
    forced = load_generator(str(sd3), precision="bf16")
    assert forced.precision == "bf16" and forced.pipe.autocast == torch.bfloat16 and forced.precision_note == ""


def test_the_bf16_check_asks_the_cpu_and_measures_where_it_cannot(monkeypatch):
    from t2i.nn import precision
    from t2i.nn.precision import NATIVE_THRESHOLD, bf16_is_native, bf16_slowdown, x86_bf16_units

    slow = bf16_slowdown("cpu")
    assert slow > 0 and bf16_slowdown("cpu") == slow  # measured once per process
    units = x86_bf16_units()
    assert bf16_is_native("cpu") == (units if units is not None else slow <= NATIVE_THRESHOLD)
    # the CPU's flags decide where PyTorch reports them, whatever a (noisy) timing says
    monkeypatch.setattr(precision, "bf16_slowdown", lambda device_type="cpu": 0.5)
    monkeypatch.setattr(precision, "x86_bf16_units", lambda: False)
    assert not precision.bf16_is_native("cpu")
    monkeypatch.setattr(precision, "bf16_slowdown", lambda device_type="cpu": 9.0)
    monkeypatch.setattr(precision, "x86_bf16_units", lambda: True)
    assert precision.bf16_is_native("cpu")
    monkeypatch.setattr(precision, "x86_bf16_units", lambda: None)  # another architecture: the timing decides
    assert not precision.bf16_is_native("cpu")
    monkeypatch.setattr(precision, "bf16_slowdown", lambda device_type="cpu": 1.1)
    assert precision.bf16_is_native("cpu")


def test_the_bf16_timing_keeps_the_best_round_of_repeated_products():
    from t2i.nn.precision import _ROUND_SECONDS, _ROUNDS, _per_call_seconds

    calls, now = [0], [0.0]
    # a fake product of 1 ms, except its 2nd call (the first timed round's), which meets another job: 10 ms
    costs = iter([1e-3, 10e-3] + [1e-3] * 1000)

    class Product:
        def __matmul__(self, other):
            calls[0] += 1
            now[0] += next(costs)

    seconds = _per_call_seconds(Product(), None, clock=lambda: now[0])
    assert seconds == pytest.approx(1e-3)  # the disturbed round is not the one kept
    assert calls[0] >= 1 + _ROUNDS * round(_ROUND_SECONDS / 1e-3) - 2


def test_benchmarks_time_bf16_only_where_it_is_native(monkeypatch):
    from t2i.nn import precision

    monkeypatch.setattr(precision, "bf16_is_native", lambda device_type="cpu": False)
    assert precision.timed_precisions() == ["fp32"]
    monkeypatch.setattr(precision, "bf16_is_native", lambda device_type="cpu": True)
    assert precision.timed_precisions("cuda") == ["fp32", "bf16"]


def test_a_bad_precision_is_a_clear_error(tmp_path):
    sd3 = tiny_sd3_folder(tmp_path / "sd3")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        load_generator(str(sd3), precision="fp16")
    _set_precision(sd3, "half")
    with pytest.raises(ValueError, match=r"model.json: precision must be one of \['bf16', 'fp32'\], got 'half'"):
        load_generator(str(sd3))
