"""``t2i export``: model folders from training runs, their records and cards, shared components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_folders import TINY_VAE, train_default, train_tiny_sd3

from t2i.pipelines.folders import load_generator
from t2i.train.export import export_sd3, export_unclip


def test_export_with_glyph_tokens_and_an_existing_folders_components(tmp_path):
    from PIL import Image

    from t2i.pipelines.model_card import card_text

    sd3, vae, clip = train_tiny_sd3(tmp_path, text_chars=8, text_words=True, word_positions=0.5,
                                     word_prefix=0.25, caption=True)  # fmt: skip
    Image.new("RGB", (8, 8), "white").save(f"{sd3}/eval_curve.png")  # as a run scored while training leaves it
    first = export_sd3(tmp_path / "first", transformer=sd3, vae=vae, clip=clip, defaults={"steps": 2})
    spec = json.loads((first / "model.json").read_text())
    assert spec["text_chars"] == 8 and spec["text_words"] is True and spec["text_word_positions"] == 0.5
    assert spec["text_word_prefix"] == 0.25 and spec["caption_encoder"] is True
    assert (first / "caption.safetensors").is_file() and spec["training"]["caption"]["step"] == 2
    metrics = [json.loads(line) for line in (Path(sd3) / "metrics.jsonl").read_text().splitlines()]
    cpu = [r["cpu_seconds"] for r in metrics if "cpu_seconds" in r][-1]  # the loop's CPU-seconds reach the record
    assert cpu > 0 and spec["training"]["transformer"]["cpu_seconds"] == round(cpu, 1)
    assert (first / "learning_curve.png").is_file()
    card = card_text(first, None)
    assert (
        "8 character tokens" in card and "input embeddings" in card and "![learning curve](learning_curve.png)" in card
    )
    assert "sincos code" in card and "the mean of the words before it" in card
    assert "caption encoder" in card and "configs/default/caption.yaml" in card
    assert "| threads | precision | time | CPU time |" in card and "| 0 | fp32 |" in card  # run.threads=0: all
    gen = load_generator(str(first))
    assert gen.pipe.text_encoder.chars == 8 and gen.pipe.text_encoder.words
    assert gen.pipe.text_encoder.word_positions == 0.5 and gen.pipe.text_encoder.word_prefix == 0.25
    assert gen.pipe.text_encoder.caption is not None and not gen.pipe.text_encoder.caption.training
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
    # sharing the first folder's files shares its caption encoder too
    twin = export_sd3(tmp_path / "twin", transformer=sd3, vae=vae, clip=clip, defaults={"steps": 2},
                      share_from=first)  # fmt: skip
    assert json.loads((twin / "model.json").read_text())["components"]["caption"] == "../first/caption.safetensors"
    torch.testing.assert_close(load_generator(str(twin)).generate(['the word "CAT"'], [0], gen.defaults), image)


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
    # the default prior reads a caption encoder and the default decoder starts its map from a CLIP picture head:
    # this tiny CLIP has neither, so both read the CLIP alone here
    plain = ["task.params.text_words=false", "task.params.caption_encoder=null"]
    prior = train_default(tmp_path, "prior", [f"task.params.clip_path={clip}", *plain, *prior_model,
                                              "data.batch_size=2"])  # fmt: skip
    dec = train_default(tmp_path, "decoder", [f"task.params.clip_path={clip}", unet, "task.params.map_from_clip=false",
                                              "data.batch_size=2"])  # fmt: skip
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


def test_export_cli_writes_skip_layer_guidance_into_the_defaults(tmp_path, capsys):
    from t2i.cli.main import main

    sd3, vae, clip = train_tiny_sd3(tmp_path)
    base = ["export", "sd3", "--transformer", sd3, "--vae", vae, "--clip", clip, "--steps", "2"]
    assert main([*base, "--out", str(tmp_path / "m"), "--slg-scale", "2.5", "--slg-layers", "0"]) == 0
    d = json.loads((tmp_path / "m" / "model.json").read_text())["defaults"]
    assert d["slg_scale"] == 2.5 and d["slg_layers"] == [0]
    # fp32: under bf16 autocast (the default where the CPU has bf16 matmuls) this tiny model's SLG delta rounds away
    gen = load_generator(str(tmp_path / "m"), precision="fp32")
    assert gen.defaults.options["slg_layers"] == (0,)
    s = gen.defaults.replace(steps=10)  # SLG acts in the first steps after 1% of them: not in 2 steps
    plain = gen.generate(["a red circle"], [0], s.replace(extra={"slg_scale": 0.0}))
    assert not torch.equal(gen.generate(["a red circle"], [0], s), plain)  # SLG acts on the image
    assert main([*base, "--out", str(tmp_path / "bad"), "--slg-layers", "0"]) != 0
    assert "--slg-layers needs --slg-scale" in capsys.readouterr().err
    # a block the 1-block MMDiT lacks: refused at export, before a folder every generate would reject is written
    assert main([*base, "--out", str(tmp_path / "bad"), "--slg-scale", "2", "--slg-layers", "1"]) != 0
    assert "has 1 MMDiT blocks, use indices in 0..0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "bad"), "--slg-scale", "2", "--slg-layers", "two"])
    assert "expected block indices like 2,3" in capsys.readouterr().err
    # the guidance interval: written to the defaults, named on the card, used by generate; a bad one refused
    assert main([*base, "--out", str(tmp_path / "gi"), "--guidance-interval", "0,0.8"]) == 0
    assert json.loads((tmp_path / "gi" / "model.json").read_text())["defaults"]["guidance_interval"] == [0.0, 0.8]
    assert "guidance only while the noise level lies in 0.0-0.8" in (tmp_path / "gi" / "README.md").read_text()
    gen = load_generator(str(tmp_path / "gi"), precision="fp32")  # as above: bf16 rounds the tiny delta away
    s = gen.defaults.replace(steps=6)
    unlimited = gen.generate(["a red circle"], [0], s.replace(extra={"guidance_interval": None}))
    assert not torch.equal(gen.generate(["a red circle"], [0], s), unlimited)
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "bad"), "--guidance-interval", "0.8,0.2"])
    assert "write it as LOW,HIGH" in capsys.readouterr().err
    with pytest.raises(ValueError, match="guidance_interval must satisfy"):  # the Python API checks it too
        export_sd3(tmp_path / "bad", transformer=sd3, vae=vae, clip=clip, defaults={"guidance_interval": [0.5, 0.2]})
    assert not (tmp_path / "bad").exists()


def test_export_needs_a_pinned_latent_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_sd3(tmp_path / "x", transformer=str(tmp_path), vae=str(tmp_path), clip=str(tmp_path))


def _next_stage(tmp_path, vae: str, clip: str, init: str, name: str) -> tuple[dict, str]:
    """A tiny sd3 run continuing ``init`` (model.init_from) as run ``name``, exported: its transformer record and
    model card."""
    from model_folders import TINY_MMDIT

    from t2i.pipelines.model_card import card_text

    task = [f"task.params.vae={vae}", f"task.params.text={clip}", "task.params.text_chars=0"]
    run = train_default(tmp_path, "sd3", [*task, *TINY_MMDIT, f"model.init_from={init}", f"run.name={name}",
                                          "task.params.caption_encoder=null", "data.batch_size=2"])  # fmt: skip
    out = export_sd3(tmp_path / f"m_{name}", transformer=run, vae=vae, clip=clip)
    return json.loads((out / "model.json").read_text())["training"]["transformer"], card_text(out, None)


def test_a_second_stage_run_exports_with_both_stages_on_its_card(tmp_path):
    """A run that continues another (model.init_from; the previous recipe's sd3_refine stage): the exported record
    and card carry the first stage's steps and CPU time beside the second's."""
    stage1, vae, clip = train_tiny_sd3(tmp_path)
    rec, card = _next_stage(tmp_path, vae, clip, f"{stage1}/checkpoints/step_00000002/ema.safetensors",
                            "default_sd3_refine")  # fmt: skip
    assert rec["run"] == "default_sd3_refine" and rec["started_from"]["run"] == "default_sd3"
    # the first stage's CPU time as its metrics file has it (two tiny steps may round to 0.0 s on a fast machine)
    cpu = [r["cpu_seconds"] for r in map(json.loads, (Path(stage1) / "metrics.jsonl").read_text().splitlines())
           if r.get("step", 0) <= 2 and "cpu_seconds" in r]  # fmt: skip
    assert rec["started_from"]["step"] == 2 and rec["started_from"]["cpu_seconds"] == round(cpu[-1], 1) >= 0
    # the stage it started from keeps its own precision and time, up to the checkpoint it was continued from
    assert rec["started_from"]["precision"] == "fp32" and rec["started_from"]["train_seconds"] is not None
    assert "| transformer, stage 1 |" in card and "`configs/default/sd3.yaml`" in card
    # each stage names the config whose run.name it has (that recipe now lives with the earlier experiments)
    assert "| transformer, stage 2 |" in card and "`configs/experiments/previous/sd3_refine.yaml`" in card
    # a third stage continuing the second: the record nests, the card lists all three
    rec, card = _next_stage(tmp_path, vae, clip, f"{tmp_path}/default_sd3_refine/checkpoints/step_00000002/"
                            "ema.safetensors", "again")  # fmt: skip
    assert [rec["run"], rec["started_from"]["run"], rec["started_from"]["started_from"]["run"]] == [
        "again", "default_sd3_refine", "default_sd3"]  # fmt: skip
    assert "| transformer, stage 2 |" in card and "| transformer, stage 3 |" in card
    assert "`configs/default/again.yaml`" in card  # no config names it: the default recipes' convention
    assert "input embeddings" in card


def test_a_run_resumed_from_another_runs_checkpoint_is_a_stage_with_its_own_counts(tmp_path):
    """`t2i train --resume-from <other run's checkpoint>` into a new run (the turbo's last stage): the run notes where
    it started, and its exported record and card row count only its own steps, images and CPU time, after the row
    of the run it continued."""
    from model_folders import TINY_MMDIT

    from t2i.pipelines.model_card import card_text
    from t2i.train.config import load_config
    from t2i.train.loop import train

    stage1, vae, clip = train_tiny_sd3(tmp_path)
    first = f"{stage1}/checkpoints/step_00000002"
    over = [
        f"run.out_dir={tmp_path}",
        "run.log_every=1",
        "run.sample_every=0",
        "run.ckpt_every=0",
        "run.threads=0",
        "run.precision=fp32",
        "run.eval_every=0",
        f"task.params.vae={vae}",
        f"task.params.text={clip}",
        "task.params.latent_scale=1.5",
        "task.params.latent_shift=0.1",
        "task.params.text_chars=0",
        "task.params.caption_encoder=null",
        *TINY_MMDIT,
        "data.batch_size=2",
        "run.name=later",
        "run.steps=5",
    ]
    train(load_config("configs/default/sd3.yaml", over), resume=first)
    later = tmp_path / "later"
    assert json.loads((later / "continued_from.json").read_text()) == {"checkpoint": first, "step": 2}
    train(load_config("configs/default/sd3.yaml", [*over, "run.steps=6"]), resume=True)  # its own resume: kept
    assert json.loads((later / "continued_from.json").read_text())["step"] == 2
    out = export_sd3(tmp_path / "m_later", transformer=str(later), vae=vae, clip=clip)
    rec = json.loads((out / "model.json").read_text())["training"]["transformer"]
    assert rec["step"] == 6 and rec["steps"] == 4 and rec["samples"] == 8 and rec["continued"]
    assert rec["started_from"]["run"] == "default_sd3" and rec["started_from"]["step"] == 2
    metrics = [json.loads(line) for line in (later / "metrics.jsonl").read_text().splitlines()]
    total = next(r["cpu_seconds"] for r in reversed(metrics) if "cpu_seconds" in r)  # carried over the resume
    assert rec["cpu_seconds"] == pytest.approx(total - rec["started_from"]["cpu_seconds"], abs=0.11)
    card = card_text(out, None)
    assert "| transformer, stage 1 |" in card and "| transformer, stage 2 (continues stage 1) |" in card
    row = next(line for line in card.splitlines() if "stage 2 (continues" in line)
    assert "`configs/default/sd3.yaml`" in row and "| 4 | 2 | 8 |" in row
    assert "make train-defaults" in card


def _stage_runs(rec: dict) -> list[str]:
    """The run names of a transformer record and the stages it started from, latest first."""
    return [rec["run"], *(_stage_runs(rec["started_from"]) if rec.get("started_from") else [])]


def test_a_run_continuing_a_model_folder_counts_the_folders_stages(tmp_path):
    """A stage that continued a shipped folder's transformer (model.init_from=models/<name>/transformer.safetensors,
    as on a machine without the first stage's run): its record starts from the folder's record of that file."""
    stage1, vae, clip = train_tiny_sd3(tmp_path)
    first = export_sd3(tmp_path / "first", transformer=stage1, vae=vae, clip=clip)
    shipped = json.loads((first / "model.json").read_text())["training"]["transformer"]
    rec, card = _next_stage(tmp_path, vae, clip, f"{first}/transformer.safetensors", "default_sd3_polish")
    assert rec["run"] == "default_sd3_polish" and rec["started_from"] == shipped
    assert "| transformer, stage 1 |" in card and "`configs/default/sd3.yaml`" in card
    assert "| transformer, stage 2 |" in card and "`configs/default/sd3_polish.yaml`" in card
    # the folder re-exported from that second stage, then a third stage from its checkpoint: the second stage's
    # record (read back from the folder it started from, now its own) is listed once, not twice
    export_sd3(first, transformer=str(tmp_path / "default_sd3_polish"), vae=vae, clip=clip)
    polish_ckpt = f"{tmp_path}/default_sd3_polish/checkpoints/step_00000002/ema.safetensors"
    rec, card = _next_stage(tmp_path, vae, clip, polish_ckpt, "default_sd3_words")
    assert _stage_runs(rec) == ["default_sd3_words", "default_sd3_polish", "default_sd3"]
    assert rec["started_from"]["started_from"] == shipped
    assert "| transformer, stage 3 |" in card and "| transformer, stage 4 |" not in card
    # and once more: the folder re-exported from that third stage, a fourth from the third's checkpoint
    export_sd3(first, transformer=str(tmp_path / "default_sd3_words"), vae=vae, clip=clip)
    words_ckpt = f"{tmp_path}/default_sd3_words/checkpoints/step_00000002/ema.safetensors"
    rec, card = _next_stage(tmp_path, vae, clip, words_ckpt, "default_sd3_words_more")
    assert _stage_runs(rec) == ["default_sd3_words_more", "default_sd3_words", "default_sd3_polish", "default_sd3"]
    assert "| transformer, stage 4 |" in card and "| transformer, stage 5 |" not in card


def test_export_of_one_checkpoint_folder_takes_that_steps_weights_and_record(tmp_path):
    """``--transformer runs/x/checkpoints/step_N``: an earlier checkpoint than the newest (to compare steps of a
    run), with the record and CPU time up to that step."""
    from model_folders import TINY_MMDIT
    from safetensors.torch import load_file

    _, vae, clip = train_tiny_sd3(tmp_path)
    task = [f"task.params.vae={vae}", f"task.params.text={clip}", "task.params.text_chars=0",
            "task.params.caption_encoder=null"]  # fmt: skip
    run = train_default(tmp_path, "sd3", [*task, *TINY_MMDIT, "run.name=two_ckpts", "run.ckpt_every=1",
                                          "data.batch_size=2"])  # fmt: skip
    first = Path(run) / "checkpoints" / "step_00000001"
    out = export_sd3(tmp_path / "m_first", transformer=str(first), vae=vae, clip=clip)
    newest = export_sd3(tmp_path / "m_newest", transformer=run, vae=vae, clip=clip)
    rec = json.loads((out / "model.json").read_text())["training"]["transformer"]
    rec_newest = json.loads((newest / "model.json").read_text())["training"]["transformer"]
    assert (rec["run"], rec["checkpoint"], rec["step"], rec["samples"]) == ("two_ckpts", "step_00000001", 1, 2)
    assert rec_newest["step"] == 2 and rec["cpu_seconds"] <= rec_newest["cpu_seconds"]
    cpu = [r["cpu_seconds"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
           if r.get("step", 2) <= 1 and "cpu_seconds" in r]  # fmt: skip
    assert rec["cpu_seconds"] == round(cpu[-1], 1)
    ema, exported = load_file(first / "ema.safetensors"), load_file(out / "transformer.safetensors")
    assert set(ema) == set(exported)
    for k, v in ema.items():  # that step's EMA weights, stored in fp16
        torch.testing.assert_close(exported[k].float(), v.half().float())
    first.rename(first.with_name("step_00000001.partial"))  # as an interrupted write leaves it
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        export_sd3(tmp_path / "m_partial", transformer=str(first.with_name("step_00000001.partial")), vae=vae,
                   clip=clip)  # fmt: skip
    assert not (tmp_path / "m_partial").exists()


def test_export_cli_sets_the_priors_and_upsamplers_own_settings(tmp_path, capsys):
    """--prior-* and --upsampler-steps / --upsampler-sampler write the prior's and the super-resolution stage's own
    settings, which generate then uses (the call's steps and sampler are the base stage's); bad values are refused
    before anything is written."""
    from model_folders import tiny_unclip_folder

    from t2i.cli.main import main

    base = tiny_unclip_folder(tmp_path / "base")
    parts = ["export", "unclip", *(x for k in ("clip", "prior", "decoder", "sr")
                                   for x in (f"--{k}", str(base / f"{k}.safetensors")))]  # fmt: skip
    args = [
        *parts,
        "--out",
        str(tmp_path / "m"),
        "--upsampler-steps",
        "3",
        "--upsampler-sampler",
        "euler",
        "--prior-steps",
        "5",
        "--prior-candidates",
        "1",
        "--prior-sampler",
        "ddpm",
        "--prior-guidance",
        "1.5",
    ]
    assert main(args) == 0
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["stages"][1]["steps"] == 3 and spec["stages"][1]["sampler"] == "euler"
    assert spec["stages"][0] == json.loads((base / "model.json").read_text())["stages"][0]
    assert {k: spec["prior"][k] for k in ("steps", "candidates", "sampler", "guidance")} == {
        "steps": 5,
        "candidates": 1,
        "sampler": "ddpm",
        "guidance": 1.5,
    }
    gen = load_generator(str(tmp_path / "m"))
    assert (gen.pipe.prior.steps, gen.pipe.prior.num_candidates, gen.pipe.prior.sampler) == (5, 1, "ddpm")
    assert gen.total_steps(gen.defaults) == 5 + gen.defaults.steps + 3
    card = (tmp_path / "m" / "README.md").read_text()  # the card says what the defaults leave to each part
    prior = spec["prior"]
    assert (f"steps, sampler and CFG are the base decoder's (the prior samples {prior['steps']} steps of "
            f"`{prior['sampler']}` at CFG {prior['guidance']}") in card  # fmt: skip
    assert "the 32 px upsampler 3 steps of `euler`)" in card
    assert "map read from it" not in card  # the tiny base decoder has no image map
    assert main([*parts, "--out", str(tmp_path / "bad"), "--upsampler-steps", "0"]) != 0
    assert "--upsampler-steps must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert main([*parts, "--out", str(tmp_path / "bad"), "--upsampler-sampler", "eulr"]) != 0
    assert "unknown --upsampler-sampler 'eulr'; did you mean 'euler'?" in capsys.readouterr().err
    for flag, value, message in (("--prior-steps", "0", "--prior-steps must be a whole number >= 1"),
                                 ("--prior-candidates", "0", "--prior-candidates must be a whole number >= 1"),
                                 ("--steps", "0", "--steps must be a whole number >= 1"),
                                 ("--guidance", "-1", "--guidance must be a finite number >= 0"),
                                 ("--prior-guidance", "nan", "--prior-guidance must be a finite number"),
                                 ("--prior-sampler", "ddmp", "unknown --prior-sampler 'ddmp'")):  # fmt: skip
        assert main([*parts, "--out", str(tmp_path / "bad"), flag, value]) != 0
        assert message in capsys.readouterr().err
    files = {k: str(base / f"{k}.safetensors") for k in ("clip", "prior", "decoder", "sr")}
    for bad, match in (
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"sampler": "eulr"}, "did you mean"),
        ({"guidance": 2.0}, "takes steps and sampler"),
    ):  # the Python API checks them too
        with pytest.raises(ValueError, match=match):
            export_unclip(tmp_path / "bad", **files, upsampler_settings=bad)
    for bad, match in (
        ({"candidates": 0}, "candidates must be a whole number >= 1"),
        ({"steps": 2.5}, "steps must be a whole number >= 1"),
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"sampler": "eulr"}, "did you mean"),
        ({"eta": 1.0}, "takes steps, sampler, guidance and candidates"),
    ):
        with pytest.raises(ValueError, match=match):
            export_unclip(tmp_path / "bad", **files, prior_settings=bad)
    assert not (tmp_path / "bad").exists()


def test_card_reads_the_base_decoders_image_map_from_its_file(tmp_path):
    from t2i.models.files import save_model_file
    from t2i.models.unet import Unet, UnetConfig
    from t2i.pipelines.model_card import _unet_config

    cfg = dict(dim=8, dim_mults=(1, 2), num_res_blocks=1, attn_levels=(False, False), self_attn=(False, False),
               groups=4, image_embed_dim=16)  # fmt: skip
    save_model_file(tmp_path / "map.safetensors", "unclip_unet", Unet(UnetConfig(**cfg, image_map_grid=4)))
    save_model_file(tmp_path / "plain.safetensors", "unclip_unet", Unet(UnetConfig(**cfg)))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert _unet_config(tmp_path / "map.safetensors")["image_map_grid"] == 4
    assert _unet_config(tmp_path / "plain.safetensors")["image_map_grid"] == 0
    assert _unet_config(tmp_path / "junk.safetensors") == {} and _unet_config(tmp_path / "missing") == {}


def test_unclip_decoder_with_word_tokens_exports_beside_an_existing_folders_stages(tmp_path):
    """A decoder retrained with the CLIP's word embeddings (task.params.text_words), exported with the prior and
    upsampler of an existing folder: their specs and records come along, and the pipeline feeds each part its own
    tokens (the prior and upsampler the encodings, the new decoder encodings + word embeddings)."""
    from model_folders import tiny_unclip_folder

    from t2i.diffusion import Seeds

    base = tiny_unclip_folder(tmp_path / "base")
    unet = (
        "model.params={dim: 8, dim_mults: [1, 2], num_res_blocks: 1, attn_levels: [false, true], "
        "self_attn: [false, false], heads: 2, head_dim: 8, groups: 4, image_embed_dim: 32, text_embed_dim: 32}"
    )
    dec = train_default(tmp_path, "decoder", [f"task.params.clip_path={base}/clip.safetensors", unet,
                                              "task.params.text_words=true", "task.params.map_from_clip=false",
                                              "task.params.stage_size=16",
                                              "data.batch_size=2"])  # fmt: skip
    out = export_unclip(tmp_path / "m", clip=f"{base}/clip.safetensors", prior=f"{base}/prior.safetensors",
                        decoder=dec, sr=f"{base}/sr.safetensors")  # fmt: skip
    spec = json.loads((out / "model.json").read_text())
    base_spec = json.loads((base / "model.json").read_text())
    assert spec["prior"] == base_spec["prior"] and spec["stages"][1] == base_spec["stages"][1]
    assert spec["stages"][0]["text_words"] is True and spec["stages"][0]["size"] == 16
    gen = load_generator(str(out))
    pipe = gen.pipe
    _, tokens, mask = pipe.encode_prompts(["a red circle left of a blue square"])
    n = pipe.clip.context_length
    assert tokens.shape[1] == 2 * n and torch.equal(mask[:, :n], mask[:, n:])
    assert gen.generate(["a red circle"], [0], gen.defaults).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="reads word tokens too"):
        pipe.decode(torch.randn(1, 32), seeds=Seeds([0]), text_tokens=tokens[:, :n], text_mask=mask[:, :n])


def test_unclip_decoder_with_a_caption_encoder_exports_it_and_reads_its_states(tmp_path):
    """A decoder trained on a caption encoder's states (task.params.caption_encoder) exports with the encoder as a
    component; the loaded pipeline appends its states, not the raw word embeddings, and a later export that keeps
    that decoder keeps the encoder too."""
    from model_folders import tiny_unclip_folder

    from t2i.models.text import word_embeddings
    from t2i.pipelines.model_card import card_text
    from t2i.pipelines.unclip import DecoderStage, UnCLIPPipeline

    base = tiny_unclip_folder(tmp_path / "base")
    clip = f"{base}/clip.safetensors"
    caption = train_default(tmp_path, "caption", [f"task.params.clip={clip}", "model.params.width=32",
                                                  "model.params.depth=1", "data.batch_size=4"])  # fmt: skip
    unet = (
        "model.params={dim: 8, dim_mults: [1, 2], num_res_blocks: 1, attn_levels: [false, true], "
        "self_attn: [false, false], heads: 2, head_dim: 8, groups: 4, image_embed_dim: 32, text_embed_dim: 32}"
    )
    dec = train_default(tmp_path, "decoder", [f"task.params.clip_path={clip}", unet, "task.params.text_words=true",
                                              "task.params.map_from_clip=false",
                                              f"task.params.caption_encoder={caption}", "task.params.stage_size=16",
                                              "data.batch_size=2"])  # fmt: skip
    out = export_unclip(tmp_path / "m", clip=clip, prior=f"{base}/prior.safetensors", decoder=dec,
                        sr=f"{base}/sr.safetensors")  # fmt: skip
    spec = json.loads((out / "model.json").read_text())
    assert spec["caption_encoder"] is True and spec["training"]["caption"]["run"] == "default_caption"
    assert (out / "caption.safetensors").is_file() and "| caption | caption encoder" in card_text(out, None)
    gen = load_generator(str(out))
    pipe = gen.pipe
    prompt = ["a red circle to the left of a blue square"]
    _, tokens, mask = pipe.encode_prompts(prompt)
    n = pipe.clip.context_length
    ids, _ = pipe.clip.tokenize(prompt)
    raw = word_embeddings(pipe.clip, ids)
    states = pipe.caption(raw, mask[:, :n]) * mask[:, :n, None]
    torch.testing.assert_close(tokens[:, n:].float(), states, rtol=0, atol=1e-5)
    assert not torch.allclose(tokens[:, n:].float(), raw * mask[:, :n, None], atol=1e-2)
    assert gen.generate(["a red circle"], [0], gen.defaults).shape == (1, 3, 32, 32)
    again = export_unclip(tmp_path / "m2", clip=clip, prior=f"{out}/prior.safetensors",
                          decoder=f"{out}/decoder.safetensors", sr=f"{out}/sr.safetensors")  # fmt: skip
    assert json.loads((again / "model.json").read_text())["caption_encoder"] is True
    plain = DecoderStage(pipe.stages[0].net, 16, pipe.stages[0].path, pipe.stages[0].prediction)
    with pytest.raises(ValueError, match=r"or the prior\) with text_words=True"):
        UnCLIPPipeline(pipe.clip, pipe.prior, [plain], caption=pipe.caption)
    with pytest.raises(ValueError, match="pass words=True"):
        pipe.clip.embed_text(prompt, caption=pipe.caption)


def test_unclip_prior_reading_caption_states_exports_and_samples(tmp_path):
    """A prior trained on the encodings plus a caption encoder's states (task.params.text_words +
    caption_encoder) exports with ``text_words`` in its spec and the encoder as a component; the pipeline feeds
    it both halves while an upsampler without text reads nothing, and a prior too short for both is refused."""
    from model_folders import tiny_unclip_folder

    from t2i.diffusion import Seeds

    base = tiny_unclip_folder(tmp_path / "base")
    clip = f"{base}/clip.safetensors"
    caption = train_default(tmp_path, "caption", [f"task.params.clip={clip}", "model.params.width=32",
                                                  "model.params.depth=1", "data.batch_size=4"])  # fmt: skip
    prior = ("model.params={embed_dim: 32, depth: 1, heads: 2, head_dim: 8, text_token_dim: 32, max_text_len: 48, "
             "self_cond: true}")  # fmt: skip
    task = [f"task.params.clip_path={clip}", "task.params.text_words=true", f"task.params.caption_encoder={caption}"]
    run = train_default(tmp_path, "prior", [*task, prior, "data.batch_size=4"])
    out = export_unclip(tmp_path / "m", clip=clip, prior=run, decoder=f"{base}/decoder.safetensors",
                        sr=f"{base}/sr.safetensors")  # fmt: skip
    spec = json.loads((out / "model.json").read_text())
    assert spec["prior"]["text_words"] is True and spec["caption_encoder"] is True
    gen = load_generator(str(out))
    embed, tokens, _ = gen.pipe.image_embeds_from_text(["a red circle above a blue square"], Seeds([0]))
    assert embed.shape == (1, 32) and tokens.shape[1] == 48
    assert gen.generate(["a red circle"], [0], gen.defaults).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="max_text_len >= 48"):
        train_default(tmp_path / "short", "prior", [*task, prior.replace("48", "24"), "data.batch_size=4"])


def test_a_decoder_with_a_text_map_exports_with_the_grown_caption_encoder_the_prior_also_reads(tmp_path):
    """The prior reads a caption encoder's states; the decoder's text map comes from that encoder grown with a shape
    head (model.train_only). The folder carries the grown one (it holds the other's weights unchanged) and its
    pipeline gives the decoder the layout map; two unrelated encoders are refused."""
    from model_folders import tiny_unclip_folder

    base = tiny_unclip_folder(tmp_path / "base")
    clip = f"{base}/clip.safetensors"
    small = [f"task.params.clip={clip}", "model.params.width=32", "model.params.depth=1", "data.batch_size=4"]
    caption = train_default(tmp_path, "caption", small)
    head = "[shape_cells, shape_q, shape_kv, shape_head_out]"
    grown = train_default(
        tmp_path,
        "caption",
        [
            *small,
            "run.name=grown",
            "model.params.shape_channels=5",
            "task.params.shape_weight=1.0",
            f"model.init_new={head}",
            f"model.train_only={head}",
            f"model.init_from={caption}/checkpoints/step_00000002/ema.safetensors",
        ],
    )
    other = train_default(tmp_path, "caption", [*small, "run.name=other", "run.seed=1"])
    prior = "model.params={embed_dim: 32, depth: 1, heads: 2, head_dim: 8, text_token_dim: 32, max_text_len: 48}"
    task = [f"task.params.clip_path={clip}", "task.params.text_words=true", f"task.params.caption_encoder={caption}"]
    prior_run = train_default(tmp_path, "prior", [*task, prior, "data.batch_size=4"])
    unet = (
        "model.params={dim: 8, dim_mults: [1, 2], num_res_blocks: 1, attn_levels: [false, true], "
        "self_attn: [false, false], heads: 2, head_dim: 8, groups: 4, image_embed_dim: 32, text_embed_dim: 32, "
        "text_map_grid: 8, text_map_channels: 8}"
    )
    dec = [f"task.params.clip_path={clip}", unet, "task.params.map_from_clip=false", "task.params.stage_size=16",
           "data.batch_size=2"]  # fmt: skip
    dec_run = train_default(tmp_path, "decoder", [*dec, f"task.params.text_map_from={grown}"])
    out = export_unclip(tmp_path / "m", clip=clip, prior=prior_run, decoder=dec_run, sr=f"{base}/sr.safetensors")
    spec = json.loads((out / "model.json").read_text())
    assert spec["caption_encoder"] is True and spec["training"]["caption"]["run"] == "grown"
    from t2i.pipelines.model_card import card_text

    card = card_text(out, None)
    assert "and on the caption encoder's coarse picture" in card and "The prior and the base decoder also" in card
    gen = load_generator(str(out))
    assert gen.pipe.caption.cfg.shape_channels == 5
    assert gen.generate(["a red circle left of a blue square"], [0], gen.defaults).shape == (1, 3, 32, 32)
    dec_other = train_default(tmp_path / "o", "decoder", [*dec, f"task.params.text_map_from={other}",
                                                          "model.params.text_map_channels=3"])  # fmt: skip
    with pytest.raises(ValueError, match="none of them holds the others' weights unchanged"):
        export_unclip(tmp_path / "m2", clip=clip, prior=prior_run, decoder=dec_other, sr=f"{base}/sr.safetensors")


def test_a_re_export_over_a_folder_keeps_its_controlnet_and_that_ones_record(tmp_path):
    """`t2i export sd3` over a folder that also holds a ControlNet (`t2i export controlnet`, trained once): the file
    stays and so does its record on the card; without the file no record is carried over."""
    from t2i.pipelines.folders import read_model_json, write_model_json

    stage1, vae, clip = train_tiny_sd3(tmp_path)
    out = export_sd3(tmp_path / "m", transformer=stage1, vae=vae, clip=clip)
    spec = read_model_json(out)
    record = {"run": "controlnet_shapes_outlines", "step": 3, "control_type": "canny"}
    write_model_json(out, {**spec, "training": {**spec["training"], "controlnet": record}})
    (out / "controlnet.safetensors").write_bytes((out / "vae.safetensors").read_bytes())  # a file the export leaves
    export_sd3(out, transformer=stage1, vae=vae, clip=clip)
    assert read_model_json(out)["training"]["controlnet"] == record
    assert (out / "controlnet.safetensors").is_file()
    (out / "controlnet.safetensors").unlink()
    export_sd3(out, transformer=stage1, vae=vae, clip=clip)
    assert "controlnet" not in read_model_json(out)["training"]
