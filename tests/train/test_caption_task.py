"""The ``caption`` task: a caption encoder trained on a frozen CLIP's tokens to predict the coarse picture."""

from __future__ import annotations

import pytest
import torch

from t2i.train.config import load_config
from t2i.train.tasks import build_task

SHIPPED_CLIP = "models/sd3-shapes/clip.safetensors"  # the shapes CLIP (128 wide) that ships with the repo
SMALL = ["model.params.depth=1", f"task.params.clip={SHIPPED_CLIP}", "data.batch_size=8", "run.threads=0"]


def test_config_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"task\.params\.clip is required"):
        build_task(load_config("configs/default/caption.yaml", ["task.params.clip=null"]))
    with pytest.raises(FileNotFoundError, match="train the CLIP first"):
        build_task(load_config("configs/default/caption.yaml", [f"task.params.clip={tmp_path}/missing"]))
    task = build_task(load_config("configs/default/caption.yaml", [*SMALL, "model.params.width=64"]))
    with pytest.raises(ValueError, match=r"width=64 must equal the CLIP's text width \(128\)"):
        task.build_model()


def test_loss_and_sample_grid():
    """Per-sample losses of a batch of rendered scenes, and sample grids that blow each cell up to the image."""
    from t2i.data.dataset import ShapesDataset

    cfg = load_config("configs/default/caption.yaml", SMALL)
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    ds = ShapesDataset("train", 32)
    items = [ds[i] for i in range(4)]
    batch = {"caption": [it["caption"] for it in items], "image": torch.stack([it["image"] for it in items])}
    loss = task.loss(model, batch)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    assert model.cells.grad is not None and model.blocks[0].qkv.weight.grad.abs().sum() > 0
    grid = task.sample(model, 4, seed=0, device=torch.device("cpu"))
    assert grid.shape == (4, 3, 32, 32) and grid.min() >= -1 and grid.max() <= 1
    cells = grid[:, :, ::4, ::4]  # each of the 8 x 8 cells is one flat colour
    torch.testing.assert_close(grid, cells.repeat_interleave(4, -1).repeat_interleave(4, -2))


def _task_model_batch(overrides: list[str], size: int):
    """The caption task of ``overrides``, a fresh model (seed 0) and a batch of four train-stream scenes."""
    from t2i.data.dataset import ShapesDataset

    task = build_task(load_config("configs/default/caption.yaml", overrides))
    torch.manual_seed(0)
    model = task.build_model()
    items = [ShapesDataset("train", size)[i] for i in range(4)]
    batch = {"caption": [it["caption"] for it in items], "image": torch.stack([it["image"] for it in items]),
             "meta": [it["meta"] for it in items]}  # fmt: skip
    return task, model, batch


def test_shape_maps_are_trained_on_the_scenes_shapes():
    """``shape_weight`` adds the shape maps' error against each scene's shape coverage (from its metadata), logged as
    ``shape_loss``; an encoder without one map per shape, or data without scenes, is refused with the fix."""
    from t2i.shapes.scenes import shape_maps
    from t2i.shapes.world import Scene

    over = [*SMALL, "model.params.shape_channels=5", "task.params.shape_weight=1.0"]
    task, model, batch = _task_model_batch(over, 32)
    loss = task.loss(model, batch)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and task.extra_metrics["shape_loss"] > 0
    plain = build_task(load_config("configs/default/caption.yaml", SMALL)).loss(model, batch)
    assert (loss > plain).all()  # the colour picture's error plus the shape maps'
    loss.mean().backward()
    assert model.shape_head_out.weight.grad.abs().sum() > 0
    import json

    target = shape_maps(Scene.from_dict(json.loads(batch["meta"][0])["scene"]), 8)
    assert target.shape == (5, 8, 8) and target.max() <= 1
    with pytest.raises(ValueError, match="shape_channels=5"):
        build_task(load_config("configs/default/caption.yaml", [*SMALL, "task.params.shape_weight=1.0"])).build_model()
    with pytest.raises(ValueError, match=r"shape_weight must be >= 0"):
        build_task(load_config("configs/default/caption.yaml", [*over, "task.params.shape_weight=-1"])).build_model()


def test_keyed_shape_maps_are_trained_on_the_clip_picture_heads_colours():
    """``shape_keyed``: the shape head reads the colours the CLIP's picture head sees in each image's embedding (the
    reading a decoder gets from the prior's sample) and learns through that input; a CLIP without a picture head of
    the encoder's grid is refused with the fix."""
    keyed = ["model.params.depth=1", "task.params.clip=models/unclip-shapes/clip.safetensors", "data.batch_size=4",
             "run.threads=0", "model.params.shape_channels=5", "model.params.shape_keyed=true",
             "task.params.shape_weight=1.0"]  # fmt: skip
    task, model, batch = _task_model_batch(keyed, 64)
    key = task._key_picture(batch["image"])
    torch.testing.assert_close(key, task.clip.predict_picture(task.clip.embed_image(batch["image"])))
    loss = task.loss(model, batch)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and model.shape_colour_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs a CLIP with picture_grid=8"):
        build_task(
            load_config("configs/default/caption.yaml", [*keyed, f"task.params.clip={SHIPPED_CLIP}"])
        ).build_model()


def test_a_shape_head_trains_alone_on_a_trained_encoder(tmp_path):
    """``model.init_new`` + ``model.train_only``: the shape head is added to a trained encoder and trained while
    everything else, which a prior reads, stays bit-for-bit as loaded; a name the model lacks is refused."""
    from t2i.train.loop import Trainer

    run = [f"run.out_dir={tmp_path}", "run.steps=2", "run.progress=false", "run.tensorboard=false",
           "run.sample_every=0", "run.log_every=1", "data.num_samples=16"]  # fmt: skip
    trained = Trainer(load_config("configs/default/caption.yaml", [*SMALL, *run, "run.name=plain"]))
    trained.fit()
    trained.close()
    weights = tmp_path / "plain.safetensors"
    trained.model.save(weights)
    head = ["shape_cells", "shape_q", "shape_kv", "shape_head_out"]
    grown_cfg = [*SMALL, *run, "run.name=grown", "model.params.shape_channels=5", "task.params.shape_weight=1.0",
                 f"model.init_from={weights}", f"model.init_new=[{', '.join(head)}]",
                 f"model.train_only=[{', '.join(head)}]"]  # fmt: skip
    grown = Trainer(load_config("configs/default/caption.yaml", grown_cfg))
    start = {k: v.clone() for k, v in grown.model.state_dict().items()}
    grown.fit()
    grown.close()
    for key, value in grown.model.state_dict().items():
        if key.split(".")[0] in head:
            assert not torch.equal(value, start[key]), key  # the head trains
        else:
            torch.testing.assert_close(value, trained.model.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"model\.train_only names \['shape_heads'\]"):
        Trainer(load_config("configs/default/caption.yaml", [*grown_cfg[:-1], "model.train_only=[shape_heads]"]))


@pytest.mark.slow
def test_learns_which_side_a_relation_puts_each_object(tmp_path):
    """Trained on position prompts alone for a thousand steps, the encoder's pictures follow the relation's
    direction on the benchmark's `eval` prompts (0.5 for an encoder blind to it)."""
    from t2i.models.files import load_trained
    from t2i.train.loop import train
    from t2i.train.tasks.caption import score_caption_encoder

    weights = ("{single_object: 0, colors: 0, two_objects: 0, counting: 0, position: 1, color_attribution: 0, "
               "text: 0}")  # fmt: skip
    cfg = load_config("configs/default/caption.yaml", [
        f"run.out_dir={tmp_path}", "run.steps=1000", "ema.enabled=false", "run.sample_every=0", "run.ckpt_every=0",
        "run.threads=0", "run.log_every=100", "model.params.depth=2", f"task.params.clip={SHIPPED_CLIP}",
        "data.batch_size=64", f"data.shapes_weights={weights}"])  # fmt: skip
    train(cfg)
    encoder = load_trained(tmp_path / cfg.run.name, "caption_encoder").eval()
    clip = load_trained(SHIPPED_CLIP, "clip").eval()
    with torch.no_grad():
        score = score_caption_encoder(encoder, clip, size=32)
    assert score["prompts"] == 120 and score["relation_accuracy"] > 0.8, score
