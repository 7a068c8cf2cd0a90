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
