"""Model folders: component round trips, generators of both families, export from training runs."""

from __future__ import annotations

import json

import pytest
import torch
from model_folders import TINY_VAE, tiny_clip, tiny_sd3_folder, tiny_unclip_folder, train_default, train_tiny_sd3

from t2i.pipelines.shipped import (
    SD3Generator,
    Settings,
    UnCLIPGenerator,
    export_sd3,
    export_unclip,
    load_component,
    load_generator,
    save_component,
)


def test_component_round_trip_keeps_config_and_fp16_weights(tmp_path):
    from t2i.models import build_model

    net = build_model("unclip_prior", dict(embed_dim=16, depth=1, heads=2, head_dim=8))
    save_component(tmp_path / "p.safetensors", "unclip_prior", net, note={"a": 1})
    back, extra = load_component(tmp_path / "p.safetensors")
    assert extra == {"note": {"a": 1}}
    assert back.cfg == net.cfg and not back.training
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items(), strict=True):
        assert b.dtype == torch.float32, k
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)


def test_clip_component_keeps_its_tokenizer(tmp_path):
    clip = tiny_clip()
    from t2i.pipelines.shipped import _clip_extra

    save_component(tmp_path / "c.safetensors", "clip", clip, **_clip_extra(clip))
    back, _ = load_component(tmp_path / "c.safetensors")
    assert back.tokenizer.vocab == clip.tokenizer.vocab
    ids, _ = back.tokenize(["a red circle"])
    torch.testing.assert_close(ids, clip.tokenize(["a red circle"])[0])
    with torch.no_grad():
        a = clip.embed_text(["a red circle"])[0]
        b = back.embed_text(["a red circle"])[0]
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # fp16 storage


def test_load_component_refuses_other_files(tmp_path):
    from t2i.io import save_weights

    save_weights(tmp_path / "x.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a t2i model component"):
        load_component(tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def sd3_gen(tmp_path_factory):
    return load_generator(str(tiny_sd3_folder(tmp_path_factory.mktemp("sd3"))))


@pytest.fixture(scope="module")
def unclip_gen(tmp_path_factory):
    return load_generator(str(tiny_unclip_folder(tmp_path_factory.mktemp("unclip"))))


def test_sd3_folder_generates_deterministically_per_seed(sd3_gen):
    assert isinstance(sd3_gen, SD3Generator) and sd3_gen.name == "tiny-sd3"
    s = sd3_gen.defaults
    a = sd3_gen.generate(["a red circle", "a blue square"], [3, 4], s)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    b = sd3_gen.generate(["a blue square"], [4], s)  # same seed alone in its batch: same image
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)
    c = sd3_gen.generate(["a blue square"], [5], s)
    assert (c - b).abs().max() > 1e-3


def test_sd3_folder_presets_and_sizes(sd3_gen):
    assert sd3_gen.presets()["fast"].steps == 1 and sd3_gen.presets()["fast"].cfg == 1.0
    sd3_gen.check_size(32)
    sd3_gen.check_size(48)
    for bad in (30, 4, 1024):
        with pytest.raises(ValueError, match="makes square images"):
            sd3_gen.check_size(bad)


def test_sd3_negative_prompt_changes_the_image(sd3_gen):
    s = sd3_gen.defaults
    a = sd3_gen.generate(["a red circle"], [0], s)
    b = sd3_gen.generate(["a red circle"], [0], s, negative="a blue square")
    assert (a - b).abs().max() > 1e-4


def test_unclip_folder_generates_each_stage_size(unclip_gen):
    assert isinstance(unclip_gen, UnCLIPGenerator)
    s = unclip_gen.defaults
    full = unclip_gen.generate(["a red circle"], [1], s)
    assert full.shape == (1, 3, 32, 32)
    from dataclasses import replace

    base = unclip_gen.generate(["a red circle"], [1], replace(s, size=16))
    assert base.shape == (1, 3, 16, 16)
    again = unclip_gen.generate(["a red circle"], [1], s)
    torch.testing.assert_close(full, again)
    with pytest.raises(ValueError, match="16 or 32 px"):
        unclip_gen.check_size(64)
    with pytest.raises(ValueError, match="negative"):
        unclip_gen.generate(["a red circle"], [1], s, negative="blue")


def test_unknown_models_get_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped name"):
        load_generator(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_generator(str(bad))


def test_settings_extra_is_per_instance():
    a = Settings(1, 1.0, "euler", 32)
    a.extra["x"] = 1
    assert Settings(1, 1.0, "euler", 32).extra == {}


# -- export from `t2i train` runs -----------------------------------------------------------------------------------


def test_export_with_glyph_tokens_and_an_existing_folders_components(tmp_path):
    from PIL import Image

    from t2i.pipelines.model_card import card_text

    sd3, vae, clip = train_tiny_sd3(tmp_path, text_chars=8, text_words=True)
    Image.new("RGB", (8, 8), "white").save(f"{sd3}/eval_curve.png")  # as a run scored while training leaves it
    first = export_sd3(tmp_path / "first", transformer=sd3, vae=vae, clip=clip, defaults={"steps": 2})
    spec = json.loads((first / "model.json").read_text())
    assert spec["text_chars"] == 8 and spec["text_words"] is True
    assert spec["training"]["transformer"]["cpu_seconds"] > 0  # the loop's CPU-seconds reach the record
    assert (first / "learning_curve.png").is_file()
    card = card_text(first, None)
    assert (
        "8 character tokens" in card and "input embeddings" in card and "![learning curve](learning_curve.png)" in card
    )
    assert "| threads | time | CPU time |" in card
    gen = load_generator(str(first))
    assert gen.pipe.text_encoder.chars == 8 and gen.pipe.text_encoder.words
    context, _ = gen.pipe.encode_prompt(['the word "CAT"'])
    assert context.shape[1] == 24 + 24 + 8  # the CLIP's states, its input embeddings, then the spelled-out word
    image = gen.generate(['the word "CAT"'], [0], gen.defaults)
    # a transformer trained against an existing folder's VAE and CLIP files: their training records carry over
    again = export_sd3(tmp_path / "again", transformer=sd3, vae=str(first / "vae.safetensors"),
                       clip=str(first / "clip.safetensors"), defaults={"steps": 2})  # fmt: skip
    spec2 = json.loads((again / "model.json").read_text())
    for part in ("vae", "clip"):
        assert spec2["training"][part] == spec["training"][part]
    torch.testing.assert_close(load_generator(str(again)).generate(['the word "CAT"'], [0], gen.defaults), image)


def test_export_from_training_runs_round_trips(tmp_path):
    sd3, vae, clip = train_tiny_sd3(tmp_path)
    out = export_sd3(tmp_path / "m_sd3", transformer=sd3, vae=vae, clip=clip, defaults={"steps": 2})
    spec = json.loads((out / "model.json").read_text())
    assert spec["training"]["transformer"]["step"] == 2 and spec["defaults"]["steps"] == 2
    gen = load_generator(str(out))
    assert gen.pipe.vae.latent_format.scale == 1.5
    image = gen.generate(["a red circle"], [0], gen.defaults)
    assert image.shape == (1, 3, 64, 64)
    # a second folder sharing the first one's VAE and CLIP files: no copies, the same images
    twin = export_sd3(tmp_path / "twin", transformer=sd3, vae=vae, clip=clip, defaults={"steps": 2},
                      share_from=out)  # fmt: skip
    spec = json.loads((twin / "model.json").read_text())
    assert spec["components"] == {"vae": "../m_sd3/vae.safetensors", "clip": "../m_sd3/clip.safetensors"}
    assert sorted(f.name for f in twin.glob("*.safetensors")) == ["transformer.safetensors"]
    torch.testing.assert_close(load_generator(str(twin)).generate(["a red circle"], [0], gen.defaults), image)
    other_vae = train_default(tmp_path / "other", "vae", [*TINY_VAE, "data.batch_size=2", "run.seed=1"])
    with pytest.raises(ValueError, match="does not hold the weights of the vae run"):
        export_sd3(tmp_path / "bad", transformer=sd3, vae=other_vae, clip=clip, share_from=out)
    (out / "clip.safetensors").rename(out / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"names '\.\./m_sd3/clip\.safetensors' for components\.clip"):
        load_generator(str(twin))
    (out / "gone.safetensors").rename(out / "clip.safetensors")
    # a model.json must not reach files outside its folder and the model folders beside it
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "vae.safetensors").write_bytes((out / "vae.safetensors").read_bytes())  # a folder without model.json
    good = (twin / "model.json").read_text()
    for rel, match in (("../elsewhere/vae.safetensors", "points outside"), ("../../vae.safetensors", "points outside"),
                       (str(out / "vae.safetensors"), "relative to the model folder"),
                       ("../m_sd3/model.json", "must name a .safetensors file"), ("", "relative")):  # fmt: skip
        bad = json.loads(good)
        bad["components"]["vae"] = rel
        (twin / "model.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_generator(str(twin))
    (twin / "model.json").write_text(good)

    unet = (
        "model.params={dim: 8, dim_mults: [1, 2], num_res_blocks: 1, attn_levels: [false, true], "
        "self_attn: [false, false], heads: 2, head_dim: 8, groups: 4, image_embed_dim: 32, text_embed_dim: 32}"
    )
    prior_model = ["model.params.embed_dim=32", "model.params.text_token_dim=32", "model.params.depth=1"]
    prior = train_default(tmp_path, "prior", [f"task.params.clip_path={clip}", *prior_model, "data.batch_size=2"])
    dec = train_default(tmp_path, "decoder", [f"task.params.clip_path={clip}", unet, "data.batch_size=2"])
    sr_unet = (
        "model.params={dim: 8, dim_mults: [1, 2], num_res_blocks: 1, attn_levels: [false, false], "
        "self_attn: [false, false], groups: 4, lowres_cond: true, lowres_noise_cond: true}"
    )
    sr = train_default(tmp_path, "sr", [sr_unet, "data.batch_size=2"])
    out = export_unclip(
        tmp_path / "m_unclip", clip=clip, prior=prior, decoder=dec, sr=sr, defaults={"steps": 2},
        prior_settings={"steps": 2},
    )  # fmt: skip
    spec = json.loads((out / "model.json").read_text())
    assert [st["size"] for st in spec["stages"]] == [32, 64]
    assert spec["stages"][0]["prediction"] == "eps" and spec["stages"][1]["prediction"] == "v"
    gen = load_generator(str(out))
    assert gen.generate(["a red circle"], [0], gen.defaults).shape == (1, 3, 64, 64)


def test_export_needs_a_pinned_latent_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_sd3(tmp_path / "x", transformer=str(tmp_path), vae=str(tmp_path), clip=str(tmp_path))


def test_a_second_stage_run_exports_with_both_stages_on_its_card(tmp_path):
    """configs/default/sd3_binding.yaml continues sd3.yaml's run (model.init_from): the exported record and card
    carry the first stage's steps and CPU time beside the second's."""
    from model_folders import TINY_MMDIT

    from t2i.pipelines.model_card import card_text

    stage1, vae, clip = train_tiny_sd3(tmp_path)
    init = f"{stage1}/checkpoints/step_00000002/ema.safetensors"
    task = [f"task.params.vae={vae}", f"task.params.text={clip}", "task.params.text_chars=0"]
    stage2 = train_default(tmp_path, "sd3_binding", [*task, *TINY_MMDIT, f"model.init_from={init}",
                                                     "data.batch_size=2", "run.eval_every=0"])  # fmt: skip
    out = export_sd3(tmp_path / "m", transformer=stage2, vae=vae, clip=clip)
    rec = json.loads((out / "model.json").read_text())["training"]["transformer"]
    assert rec["run"] == "default_sd3_binding" and rec["started_from"]["run"] == "default_sd3"
    assert rec["started_from"]["step"] == 2 and rec["started_from"]["cpu_seconds"] > 0
    card = card_text(out, None)
    assert "| transformer, stage 1 |" in card and "`configs/default/sd3.yaml`" in card
    assert "| transformer, stage 2 |" in card and "`configs/default/sd3_binding.yaml`" in card
    # configs/default/sd3_words.yaml continues the second stage: the record nests, the card lists all three
    init = f"{stage2}/checkpoints/step_00000002/ema.safetensors"
    stage3 = train_default(tmp_path, "sd3_words", [*task, *TINY_MMDIT, f"model.init_from={init}",
                                                   "data.batch_size=2", "run.eval_every=0"])  # fmt: skip
    out = export_sd3(tmp_path / "m3", transformer=stage3, vae=vae, clip=clip)
    rec = json.loads((out / "model.json").read_text())["training"]["transformer"]
    assert [rec["run"], rec["started_from"]["run"], rec["started_from"]["started_from"]["run"]] == [
        "default_sd3_words", "default_sd3_binding", "default_sd3"]  # fmt: skip
    card = card_text(out, None)
    assert "| transformer, stage 2 |" in card and "| transformer, stage 3 |" in card
    assert "`configs/default/sd3_words.yaml`" in card and "input embeddings" in card


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
