"""t2i.io: atomic writes, weights with metadata, pickle refusal, mismatch reports, pickle-free nested state."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from t2i.io import (
    CheckpointMismatchError,
    atomic_open,
    check_state_dict,
    load_into,
    load_state,
    load_weights,
    read_config,
    read_metadata,
    save_state,
    save_weights,
)


def test_weights_roundtrip_with_metadata(tmp_path):
    w = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_weights(tmp_path / "m.safetensors", w, config={"optim": {"lr": 3e-4}}, metadata={"step": 7})
    back = load_weights(tmp_path / "m.safetensors")
    assert back.keys() == w.keys() and all(torch.equal(back[k], w[k]) for k in w)
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["t2i_schema_version"] == "1" and meta["step"] == "7" and meta["git_revision"]
    assert read_config(tmp_path / "m.safetensors") == {"optim": {"lr": 3e-4}}


def test_shared_storage_tensors_are_saved(tmp_path):
    # tied weights share storage; safetensors refuses that unless each key gets its own copy
    base = torch.randn(4, 4)
    save_weights(tmp_path / "t.safetensors", {"x": base, "y": base[:2]})
    back = load_weights(tmp_path / "t.safetensors")
    assert torch.equal(back["y"], base[:2])


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half of the new cont")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary left behind


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    # the temporary file is private (0600) while written; the finished file follows the umask like open() would
    old = os.umask(0o027)
    try:
        save_weights(tmp_path / "w.safetensors", {"a": torch.ones(2)})
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o640


def test_pickle_refused_without_flag_and_weights_only_with_it(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="pickle"):
        load_weights(path)
    assert torch.equal(load_weights(path, allow_pickle=True)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported|global"):
        load_weights(tmp_path / "evil.pt", allow_pickle=True)


def test_mismatch_error_lists_every_problem(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    found = {
        "0.weight": torch.zeros(4, 3),
        "0.bias": torch.zeros(5),
        "1.weight": torch.zeros(2, 4),
        "extra": torch.zeros(1),
    }
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(model.state_dict(), found)
    msg = str(err.value)
    assert "1.bias" in msg and "extra" in msg and "0.bias: checkpoint (5,) vs model (4,)" in msg
    save_weights(tmp_path / "bad.safetensors", found)
    with pytest.raises(CheckpointMismatchError):
        load_into(model, tmp_path / "bad.safetensors")


def test_load_into_roundtrip(tmp_path):
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    save_weights(tmp_path / "a.safetensors", a.state_dict())
    load_into(b, tmp_path / "a.safetensors")
    assert torch.equal(a.weight, b.weight)


def test_load_into_keeps_new_parts_as_initialised_and_checks_the_rest(tmp_path):
    trained = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_weights(tmp_path / "old.safetensors", trained.state_dict())
    grown = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))  # a part added after training
    fresh = grown[2].weight.detach().clone()
    load_into(grown, tmp_path / "old.safetensors", new=["2"])
    assert torch.equal(grown[0].weight, trained[0].weight) and torch.equal(grown[2].weight, fresh)
    with pytest.raises(CheckpointMismatchError, match="missing key"):  # not named new: the file must hold it
        load_into(grown, tmp_path / "old.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"'3' .* is not in the model"):
        load_into(grown, tmp_path / "old.safetensors", new=["2", "3"])
    partial = {k: v for k, v in trained.state_dict().items() if not k.startswith("1.")}
    save_weights(tmp_path / "partial.safetensors", partial)
    with pytest.raises(CheckpointMismatchError, match=r"1\.weight"):  # only the named parts may be missing
        load_into(grown, tmp_path / "partial.safetensors", new=["2"])
    grown.register_parameter("queries", nn.Parameter(torch.ones(3)))  # a bare parameter, named as it is
    load_into(grown, tmp_path / "old.safetensors", new=["2", "queries"])
    assert torch.equal(grown.queries, torch.ones(3))


def test_nested_state_roundtrip_without_pickle(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 3, "name": "x", "nothing": None, "ratio": 0.1}
    save_state(tmp_path / "state", state)
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["t2i_schema_version"] == 1
    back = load_state(tmp_path / "state")
    assert back["step"] == 3 and back["nothing"] is None and back["ratio"] == 0.1
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(back["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for k in s1["state"][0]:
        assert torch.equal(s1["state"][0][k], s2["state"][0][k])


def test_state_schema_version_checked(tmp_path):
    save_state(tmp_path / "s", {"a": 1})
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["t2i_schema_version"] = 99
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="schema version 99"):
        load_state(tmp_path / "s")


def test_io_is_a_leaf_package():
    import ast
    from pathlib import Path

    import t2i.io

    for f in Path(t2i.io.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("t2i.train", "t2i.models")), f"{f.name} imports {node.module}"
