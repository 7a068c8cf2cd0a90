"""unCLIP training tasks through the generic loop: every tiny config resolves and trains a few steps; precomputed
embeddings, trained-CLIP and VQ-GAN hand-over, learned variance, and the GAN's gradient separation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i.train.config import load_config
from t2i.train.loop import Trainer
from t2i.train.tasks import build_task, resolve_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["unclip_clip", "unclip_prior", "unclip_decoder", "unclip_sr", "unclip_vqgan", "unclip_latent"]


def cfg_for(name: str, tmp_path, **extra):
    over = {
        "run.out_dir": str(tmp_path),
        "run.steps": 2,
        "run.progress": False,
        "run.tensorboard": False,
        "run.log_every": 1,
        "run.num_samples": 4,
        "run.sample_steps": 2,
        "data.batch_size": 4,
        "data.num_samples": 16,
    }
    over.update(extra)
    return load_config(CONFIGS / "tiny" / f"{name}.yaml", [f"{k}={v}" for k, v in over.items()])


def fit(cfg) -> Trainer:
    trainer = Trainer(cfg, out=io.StringIO())
    result = trainer.fit()
    trainer.close()
    assert result["steps"] == cfg.run.steps and torch.isfinite(torch.tensor(result["loss"]))
    return trainer


@pytest.mark.parametrize("name", TINY + ["../unclip/" + p.stem for p in sorted((CONFIGS / "unclip").glob("*.yaml"))])
def test_configs_resolve(name, tmp_path):
    text = (CONFIGS / "tiny" / f"{name}.yaml").read_text()
    # the full-size configs read a trained CLIP / VQ-GAN from runs/; resolve them against a random tiny one here
    extra = {"task.params.clip_path": "null"} if "clip_path" in text else {}
    if name.endswith("latent"):
        pytest.skip("needs a trained VQ-GAN (exercised by test_vqgan_then_latent_decoder)")
    cfg = cfg_for(name, tmp_path, **extra)
    resolved = resolve_params(cfg)  # validates model.params and task.params against their dataclasses
    assert resolved.task.name in ("clip", "unclip_prior", "unclip_decoder", "vqgan")


def test_clip_then_prior_with_the_trained_clip(tmp_path):
    clip_run = fit(cfg_for("unclip_clip", tmp_path, **{"task.params.hard_negatives": "true"}))
    prior = fit(cfg_for("unclip_prior", tmp_path, **{"task.params.clip_path": str(clip_run.run_dir)}))
    task = prior.task
    # the frozen CLIP is the trained one and is not part of the optimised model
    trained = clip_run.model.state_dict()
    for k, v in task.embeddings.clip.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in task.embeddings.clip.parameters())
    assert all(not n.startswith("model.") for n, _ in prior.model.named_parameters())


def test_clip_with_hard_negative_images_renders_each_samples_counterfactual(tmp_path, monkeypatch):
    """The task hands the model one rendered counterfactual scene per sample that has one, the one its draw id
    picks, at the batch's size; a source without scenes is refused with a message that names the fix."""
    from t2i.data.dataset import ShapesDataset, to_tensor
    from t2i.shapes.scenes import counterfactual_scenes, render

    cfg = cfg_for("unclip_clip", tmp_path, **{"task.params.image_negatives": "true"})
    task = build_task(cfg)
    model = task.build_model()
    data = ShapesDataset("train", 32, seed=3)
    items = [data[i] for i in range(8)]
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "meta": [it["meta"] for it in items],
        "id": torch.arange(8) + 5,
    }
    seen = {}
    monkeypatch.setattr(type(model), "forward", lambda self, *a: seen.update(args=a) or torch.zeros(8))
    task.loss(model, batch)
    expected = []
    for i in range(8):
        sample = data.sample(i)
        options = counterfactual_scenes(sample.prompt.spec, sample.scene)
        if options:
            expected.append(render(options[(i + 5) % len(options)], 32))
    assert 0 < len(expected) < 8  # the mix holds both kinds of sample
    torch.testing.assert_close(seen["args"][4], to_tensor(np.stack(expected)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"data\.source: shapes"):  # refused before anything is built
        build_task(cfg_for("unclip_clip", tmp_path, **{"task.params.image_negatives": "true", "data.source": "toy"}))
    monkeypatch.undo()
    fit(cfg)  # and it trains through the loop


def test_clip_picture_loss_trains_the_image_side_from_a_trained_clips_towers(tmp_path):
    """``init_towers`` starts from a trained CLIP's towers (the picture head, which that CLIP lacks, starts fresh),
    ``freeze_text`` keeps its text side bit for bit (what the caption encoder and sd3 read), and the image side and
    the head train on the picture loss; a picture weight without a head is refused with the fix."""
    source = fit(cfg_for("unclip_clip", tmp_path / "src"))
    over = {"model.params.picture_grid": 4, "task.params.picture_weight": 5.0, "task.params.freeze_text": "true",
            "task.params.init_towers": str(source.run_dir)}  # fmt: skip
    cfg = cfg_for("unclip_clip", tmp_path / "pic", **over)
    start = build_task(cfg).build_model().state_dict()  # the fresh head the run starts from (same seed)
    run = fit(cfg)
    before, after = source.model.state_dict(), run.model.state_dict()
    for key, value in before.items():
        if key.startswith(("model.text_model.", "model.text_projection.")):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    vision = [k for k in before if k.startswith("model.vision_model.")]
    assert any(not torch.equal(after[k], before[k]) for k in vision)
    assert not torch.equal(after["picture_head.2.weight"], start["picture_head.2.weight"])
    with pytest.raises(ValueError, match="picture_grid"):
        build_task(cfg_for("unclip_clip", tmp_path, **{"task.params.picture_weight": 1.0}))


def test_prior_from_precomputed_embeddings_does_not_mutate_them(tmp_path):
    from t2i.data.dataset import ShapesDataset
    from t2i.train.tasks.unclip import load_clip, precompute_embeddings

    cache = tmp_path / "emb.safetensors"
    precompute_embeddings(load_clip(None, "tiny", 0), ShapesDataset("train", 32, length=16), str(cache), batch_size=8)
    cfg = cfg_for("unclip_prior", tmp_path, **{"task.params.cache_path": str(cache)})
    task = build_task(cfg)
    assert task.embeddings.clip is None  # no CLIP is built when embeddings are precomputed
    before = task.embeddings.cache["image_embed"].clone()
    model = task.build_model()
    batch = {"id": torch.arange(4), "index": torch.arange(4), "caption": ["x"] * 4}
    losses = task.loss(model, batch)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    torch.testing.assert_close(task.embeddings.cache["image_embed"], before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not in the embedding cache"):
        task.loss(model, {**batch, "index": torch.tensor([100, 1, 2, 3])})


def test_decoder_and_sr_stages_train_and_sample(tmp_path):
    base = fit(cfg_for("unclip_decoder", tmp_path))
    grid = base.task.sample(base.model, 2, seed=0, device=torch.device("cpu"), steps=2)
    assert grid.shape == (2, 3, 32, 32) and grid.abs().max() <= 1
    sr = fit(cfg_for("unclip_sr", tmp_path))
    assert sr.task.sample(sr.model, 2, seed=0, device=torch.device("cpu"), steps=2).shape == (2, 3, 32, 32)


def test_decoder_image_map_starts_as_the_clips_picture_head_and_trains(tmp_path):
    """``map_from_clip`` copies the trained CLIP's picture head into the Unet's image map, so the map is the coarse
    picture the embedding holds from step 0; a run started from trained weights (``model.init_from``) keeps their
    map; a CLIP without a head, or a map of another grid, is refused with the fix."""
    clip_run = fit(cfg_for("unclip_clip", tmp_path / "clip", **{"model.params.picture_grid": 4,
                                                                 "task.params.picture_weight": 1.0}))  # fmt: skip
    over = {"task.params.clip_path": str(clip_run.run_dir), "model.params.image_map_grid": 4,
            "task.params.map_from_clip": "true"}  # fmt: skip
    cfg = cfg_for("unclip_decoder", tmp_path / "dec", **over)
    task = build_task(cfg)
    model = task.build_model()
    e = torch.nn.functional.normalize(torch.randn(3, task.embeddings.embed_dim), dim=-1)
    picture = task.embeddings.clip.predict_picture(e)
    torch.testing.assert_close(model.image_to_map(e).view(3, 3, 4, 4), picture, rtol=0, atol=0)
    run = fit(cfg)
    trained = run.model.state_dict()
    assert not torch.equal(trained["map_conv.weight"], torch.zeros_like(trained["map_conv.weight"]))  # it trains
    assert not torch.equal(trained["image_to_map.2.weight"], model.state_dict()["image_to_map.2.weight"])
    weights = tmp_path / "trained.safetensors"
    run.model.save(weights)
    again = Trainer(cfg_for("unclip_decoder", tmp_path / "again", **over, **{"model.init_from": str(weights)}),
                    out=io.StringIO())  # fmt: skip
    for key in ("image_to_map.2.weight", "map_conv.weight"):
        torch.testing.assert_close(again.model.state_dict()[key], trained[key], rtol=0, atol=0)
    again.close()
    with pytest.raises(ValueError, match="image_map_grid=4"):
        build_task(cfg_for("unclip_decoder", tmp_path, **{**over, "model.params.image_map_grid": 2})).build_model()
    with pytest.raises(ValueError, match="picture_grid > 0"):
        build_task(cfg_for("unclip_decoder", tmp_path, **{**over, "task.params.clip_path": "null"})).build_model()


def test_decoder_shape_map_learns_the_scenes_shapes_and_starts_from_a_trained_decoder(tmp_path):
    """``shape_map_weight`` trains the Unet's shape map on each scene's shape coverage (logged beside the loss);
    ``model.init_new`` starts it fresh on a decoder trained without one; wrong setups are refused with the fix."""
    from t2i.shapes.scenes import shape_maps
    from t2i.shapes.world import Obj, Scene

    over = {"model.params.image_map_grid": 4, "model.params.image_shape_map_channels": 5,
            "task.params.shape_map_weight": 10.0, "run.steps": 3}  # fmt: skip
    run = fit(cfg_for("unclip_decoder", tmp_path / "map", **over))
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"shape_map_loss"' in line for line in lines) == 3
    # the target: a square filling the canvas's top-left quarter covers exactly that quarter's cells
    target = shape_maps(Scene((Obj("square", "red", 0.25, 0.25, 0.5),)), 4)
    assert target.shape == (5, 4, 4) and target[1, :2, :2].min() == 1.0 and target.sum() == 4.0
    plain = fit(cfg_for("unclip_decoder", tmp_path / "plain", **{"model.params.image_map_grid": 4}))
    weights = tmp_path / "plain.safetensors"
    plain.model.save(weights)
    grown = Trainer(cfg_for("unclip_decoder", tmp_path / "grown", **over, **{
        "model.init_from": str(weights), "model.init_new": "[image_to_shape_map, shape_map_conv]"}),
        out=io.StringIO())  # fmt: skip
    trained = plain.model.state_dict()
    for key, value in grown.model.state_dict().items():
        if key.startswith("shape_map_conv."):
            assert not value.any()  # fresh: the grown decoder starts drawing as the trained one
        elif not key.startswith("image_to_shape_map."):
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    grown.close()
    with pytest.raises(ValueError, match="image_shape_map_channels=5"):
        build_task(
            cfg_for("unclip_decoder", tmp_path, **{**over, "model.params.image_shape_map_channels": 3})
        ).build_model()
    with pytest.raises(ValueError, match=r"set model\.init_from too"):
        cfg_for("unclip_decoder", tmp_path, **{"model.init_new": "[shape_map_conv]"})


def test_decoder_text_map_is_the_caption_encoders_layout_hidden_with_the_caption(tmp_path):
    """``text_map_from``: the Unet's text map is the caption encoder's layout map of each training caption, dropped
    with the caption (drop_text); it trains from zero and samples; a Unet of another map size is refused."""
    from t2i.models.caption import CaptionEncoder
    from t2i.models.text import word_embeddings

    torch.manual_seed(0)
    encoder = CaptionEncoder(width=32, depth=1, heads=2, grid=4, shape_channels=5)
    encoder.save(tmp_path / "caption.safetensors")
    over = {"task.params.text_map_from": str(tmp_path / "caption.safetensors"), "model.params.text_map_grid": 4,
            "model.params.text_map_channels": 8, "run.steps": 3}  # fmt: skip
    run = fit(cfg_for("unclip_decoder", tmp_path / "run", **over))
    assert run.model.text_map_conv.weight.abs().sum() > 0  # started at zero, trained
    last = run.task._last
    clip = run.task.embeddings.clip
    assert last["text_map"].shape == (4, 8, 4, 4) and "drop_text" in last  # hidden with the caption
    ids, mask = clip.tokenize(["a red circle to the left of a blue square"])
    with torch.no_grad():
        want = encoder.layout_map(encoder(word_embeddings(clip, ids), mask), mask)
    torch.testing.assert_close(run.task._text_map(["a red circle to the left of a blue square"], "cpu"), want)
    grid = run.task.sample(run.model, 2, seed=0, device=torch.device("cpu"), steps=2)
    assert grid.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="set text_map_grid=4 and text_map_channels=8"):
        build_task(cfg_for("unclip_decoder", tmp_path, **{**over, "model.params.text_map_channels": 3})).build_model()
    with pytest.raises(ValueError, match=r"needs task\.params\.text_map_from"):
        build_task(cfg_for("unclip_decoder", tmp_path, **{"model.params.text_map_grid": 4})).build_model()
    CaptionEncoder(width=32, depth=1, heads=2, grid=4, shape_channels=5, shape_keyed=True).save(
        tmp_path / "k.safetensors"
    )
    keyed = {**over, "task.params.text_map_from": str(tmp_path / "k.safetensors")}
    with pytest.raises(ValueError, match="this CLIP has no picture head"):  # keyed maps read its colours
        build_task(cfg_for("unclip_decoder", tmp_path, **keyed)).build_model()


def test_decoder_task_refuses_mismatched_models(tmp_path):
    cfg = cfg_for("unclip_decoder", tmp_path, **{"task.params.lowres_size": 16})
    with pytest.raises(ValueError, match="lowres_cond must be true"):
        build_task(cfg).build_model()


def test_learned_variance_hybrid_loss(tmp_path):
    cfg = cfg_for(
        "unclip_decoder",
        tmp_path,
        **{
            "model.params.learned_variance": True,
            "task.params.vb_weight": 1.0,
            "task.params.num_train_timesteps": 100,
        },
    )
    trainer = fit(cfg)
    out = trainer.model.out_conv
    assert out.out_channels == 6 and out.weight.abs().sum() > 0  # the variance half is being trained


def test_vqgan_then_latent_decoder(tmp_path):
    vq = fit(cfg_for("unclip_vqgan", tmp_path, **{"task.params.gan_start": 0}))
    assert vq.task.sample(vq.model, 4, seed=0, device=torch.device("cpu")).shape == (4, 3, 32, 32)
    # the latent stage reads the VQ-GAN from its run folder, or from a VQGAN.save file
    fit(cfg_for("unclip_latent", tmp_path, **{"task.params.latent_path": str(vq.run_dir)}))
    vq.model.save(tmp_path / "vq.safetensors")
    fit(
        cfg_for(
            "unclip_latent",
            tmp_path,
            **{"task.params.latent_path": str(tmp_path / "vq.safetensors"), "run.name": "latent2"},
        )
    )


def test_vqgan_gan_terms_reach_only_their_own_parameters(tmp_path):
    cfg = cfg_for("unclip_vqgan", tmp_path, **{"task.params.gan_start": 0, "task.params.gan_weight": 1.0})
    task = build_task(cfg)
    model = task.build_model().eval()  # eval: the EMA codebook stays put, so both passes see the same codes
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"image": x, "id": torch.arange(2)}
    task.loss(model, batch).sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # reference: the discriminator's gradient comes only from its hinge loss on real vs detached fakes
    model.zero_grad()
    recon, _, _ = model(x)
    d = torch.relu(1 - model.discriminator(x)).flatten(1).mean(1) + torch.relu(
        1 + model.discriminator(recon.detach())
    ).flatten(1).mean(1)
    d.sum().backward()
    for n, p in model.discriminator.named_parameters():
        torch.testing.assert_close(full[f"discriminator.{n}"], p.grad, rtol=1e-4, atol=1e-6)
    # and the generator's adversarial term does reach the decoder
    no_gan = build_task(cfg_for("unclip_vqgan", tmp_path, **{"task.params.gan_weight": 0.0}))
    model.zero_grad()
    no_gan.loss(model, batch).sum().backward()
    assert not torch.allclose(full["decoder.0.weight"], model.decoder[0].weight.grad)


@pytest.mark.parametrize("name", ["unclip_clip", "unclip_prior", "unclip_sr", "unclip_vqgan"])
def test_bf16_autocast_steps(name, tmp_path):
    # autocast only when asked (run.precision); the codebook and schedule math stay in fp32 inside
    extra = {"run.precision": "bf16", "run.steps": 1}
    if name == "unclip_vqgan":
        extra["task.params.gan_start"] = 0
    fit(cfg_for(name, tmp_path, **extra))
