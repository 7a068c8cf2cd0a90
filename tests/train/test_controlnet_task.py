"""The ``controlnet`` task end to end on a tiny model folder: train a few steps with `t2i train`, export into the
folder, generate with `--control`, and run the placement benchmark; plus what the task trains and refuses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_folders import tiny_sd3_folder
from PIL import Image

from t2i.cli.main import main
from t2i.train.config import load_config
from t2i.train.data import build_dataset, collate
from t2i.train.tasks import build_task

pytest.importorskip("cv2")
CONFIG = "configs/controlnet/sd3_shapes_outlines.yaml"


def _overrides(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"task.params.base={folder}",
        "model.params={depth: 2, num_heads: 2, head_dim: 8, patch_size: 2, in_channels: 4, pooled_dim: 32, "
        "qk_norm: rms, control_type: canny, input_range: signed}",
        "data.image_size=32", "data.batch_size=4", "run.steps=3", "run.precision=fp32", f"run.out_dir={out}",
        "run.log_every=1", "run.sample_every=3", "run.num_samples=2", "run.ckpt_every=3", "task.params.sample_steps=2",
        "schedule.warmup_steps=0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd3_folder(tmp_path_factory.mktemp("ctl_base"))


def test_the_task_trains_only_the_controlnet_and_starts_as_the_base(folder, tmp_path):
    cfg = load_config(CONFIG, _overrides(folder, tmp_path))
    task = build_task(cfg)
    net = task.build_model()
    assert not any(p.requires_grad for p in task.base_model.parameters())
    ds = build_dataset(cfg.data, 0)
    batch = collate([{**ds[i], "id": i} for i in range(4)])
    ctrl = task.control_images(batch["image"], "canny")
    assert ctrl.shape == (4, 3, 32, 32) and set(ctrl.unique().tolist()) <= {0.0, 1.0} and ctrl.mean() > 0.01
    loss = task.loss(net, batch)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    torch.testing.assert_close(task.loss(net, batch), loss)  # draws seeded per sample
    loss.mean().backward()
    assert net.controlnet_blocks[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.base_model.parameters())
    # zero-initialised outputs: the loss equals the plain sd3 loss of the base on the same draws
    plain = task.sd3.loss(task.base_model, batch)
    torch.testing.assert_close(loss.detach(), plain, atol=1e-6, rtol=0)


def test_bad_configs_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match=r"set model\.params to match"):
        build_task(load_config(CONFIG, _overrides(folder, tmp_path, "model.params.head_dim=4"))).build_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_task(load_config(CONFIG, _overrides(folder, tmp_path, "task.params.base=/nonexistent")))
    with pytest.raises(ValueError, match="input_range: signed"):
        build_task(
            load_config(CONFIG, _overrides(folder, tmp_path, "model.params.input_range=reference"))
        ).build_model()


def test_train_export_generate_and_benchmark(folder, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", CONFIG, *_overrides(folder, out)]) == 0
    run = out / "controlnet_shapes_outlines"
    assert (run / "samples" / "step_00000003.png").is_file()
    assert main(["export", "controlnet", "--run", str(run), "--out", str(folder)]) == 0
    spec = json.loads((folder / "model.json").read_text())
    assert spec["training"]["controlnet"]["control_type"] == "canny" and (folder / "controlnet.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "| controlnet | ControlNet (`--control`) | `configs/controlnet/sd3_shapes_outlines.yaml` |" in card
    arr = np.full((32, 32, 3), 235, np.uint8)
    arr[8:20, 6:18] = (200, 30, 30)
    Image.fromarray(arr).save(tmp_path / "scene.png")
    images = tmp_path / "images"
    argv = [
        "generate",
        "a red square",
        "--model",
        str(folder),
        "-o",
        str(images),
        "--quiet",
        "--steps",
        "2",
        "--control",
        f"canny:{tmp_path / 'scene.png'}",
        "--controlnet",
        str(folder / "controlnet.safetensors"),
    ]
    assert main(argv) == 0  # the folder's own ControlNet, named again, is loaded once
    spec_path = Path(__file__).resolve().parents[2] / "benchmarks" / "controlnet_shapes.py"
    mod_spec = importlib.util.spec_from_file_location("controlnet_shapes", spec_path)
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    capsys.readouterr()
    results = bench.main(["--model", str(folder), "--n", "3", "--steps", "2", "--scales", "1,2",
                          "--grid", str(tmp_path / "grid.png")])  # fmt: skip
    table = capsys.readouterr().out
    assert "| without control |" in table and "| outlines, scale 2 |" in table
    assert set(results) == {"without control", "outlines, scale 1", "outlines, scale 2"}
    assert all(0 <= r["placed"] <= 1 and 0 <= r["iou"] <= 1 for r in results.values())
    assert Image.open(tmp_path / "grid.png").size == (32 * 5, 32 * 3)


def test_placement_scoring_by_hand():
    from t2i.shapes.detect import Detection
    from t2i.shapes.world import Obj

    spec = importlib.util.spec_from_file_location(
        "controlnet_shapes", Path(__file__).resolve().parents[2] / "benchmarks" / "controlnet_shapes.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = (Obj("circle", "red", 0.25, 0.25, 0.2), Obj("square", "blue", 0.75, 0.5, 0.2))
    found = [
        Detection("circle", "red", 0.25, 0.3, 0.2, 0.2, 0.9),
        Detection("square", "green", 0.75, 0.5, 0.2, 0.2, 1),
    ]
    (iou_a, err_a), (iou_b, err_b) = bench.placement(truth, found)
    assert iou_a == pytest.approx(0.15 / 0.25) and err_a == pytest.approx(0.05)  # shifted by a quarter of its side
    assert (iou_b, err_b) == (0.0, 0.5)  # no blue object: unmatched


def test_a_controlnet_reads_the_text_the_way_its_base_folder_does():
    """The task's sd3 params come from the folder's model.json: the shipped sd3-shapes' caption encoder and shift
    included, so a ControlNet trains on the context the base model is sampled with."""
    from pathlib import Path

    from t2i.train.tasks.controlnet import _folder_params

    params = _folder_params(Path("models/sd3-shapes"))
    assert params["caption_encoder"] == "models/sd3-shapes/caption.safetensors"
    assert params["text_words"] is True and params["text_chars"] == 8 and params["shift"] == 3.0
