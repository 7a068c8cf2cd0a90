"""``t2i generate``: files, metadata, batching across prompts, contact sheet, and every error message."""

from __future__ import annotations

import pytest
from model_folders import tiny_sd3_folder, tiny_unclip_folder
from PIL import Image

from t2i.cli.main import main
from t2i.io.png import parse_parameters, read_parameters


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return str(tiny_sd3_folder(tmp_path_factory.mktemp("sd3")))


def test_generate_writes_pngs_with_parameters_and_a_sheet(sd3_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "a red circle above a blue square", "-n", "2", "--seed", "7", "-o", str(out),
               "--model", sd3_folder, "--quiet"])  # fmt: skip
    assert rc == 0
    files = sorted(out.glob("0*.png"))
    assert [f.name for f in files] == ["000-7-a-red-circle-above-a-blue-square.png",
                                       "000-8-a-red-circle-above-a-blue-square.png"]  # fmt: skip
    prompt, negative, settings = parse_parameters(read_parameters(files[1]))
    assert prompt == "a red circle above a blue square" and negative == ""
    assert settings["Seed"] == "8" and settings["Steps"] == "3" and settings["Sampler"] == "euler"
    assert settings["Size"] == "32x32" and settings["Model"] == "tiny-sd3" and settings["CFG scale"] == "3.0"
    assert Image.open(files[0]).size == (32, 32)
    assert (out / "contact_sheet.png").exists()
    assert "wrote 2 images" in capsys.readouterr().out


def test_an_image_regenerates_alone_from_its_seed(sd3_folder, tmp_path):
    import numpy as np

    main(
        ["generate", "a cross", "-n", "3", "--seed", "1", "-o", str(tmp_path / "a"), "--model", sd3_folder, "--quiet"]
    )
    main(["generate", "a cross", "--seed", "3", "-o", str(tmp_path / "b"), "--model", sd3_folder, "--quiet"])
    a = np.asarray(Image.open(tmp_path / "a" / "000-3-a-cross.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b" / "000-3-a-cross.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # batch of 3 vs alone: the same image up to rounding


def test_from_file_batches_across_prompts_and_flags_override(sd3_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('# shapes\na red circle\n\nthe word "CAT", big\n')
    out = tmp_path / "out"
    rc = main(["generate", "--from-file", str(prompts), "-n", "2", "-o", str(out), "--model", sd3_folder,
               "--steps", "2", "--cfg", "1.5", "--sampler", "heun", "--size", "48", "--negative", "blurry",
               "--batch-size", "3", "--quiet", "--no-sheet"])  # fmt: skip
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 4 and not (out / "contact_sheet.png").exists()
    prompt, negative, settings = parse_parameters(read_parameters(out / "001-1-the-word-cat-big.png"))
    assert prompt == 'the word "CAT", big' and negative == "blurry"
    assert (settings["Steps"], settings["CFG scale"], settings["Sampler"], settings["Size"]) == (
        "2", "1.5", "heun", "48x48")  # fmt: skip


def test_preset_sets_steps_and_cfg(sd3_folder, tmp_path):
    assert (
        main(["generate", "a cross", "-o", str(tmp_path), "--model", sd3_folder, "--preset", "fast", "--quiet"]) == 0
    )
    settings = parse_parameters(read_parameters(tmp_path / "000-0-a-cross.png"))[2]
    assert settings["Steps"] == "1" and settings["CFG scale"] == "1.0"


def test_img2img_and_inpainting_from_the_command_line(sd3_folder, tmp_path):
    import numpy as np

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[:16] = 255  # repaint the top half
    Image.fromarray(m).save(mask)
    base = ["generate", "a red circle", "--model", sd3_folder, "--steps", "4", "--quiet", "--no-sheet"]
    assert main([*base, "-o", str(tmp_path / "a"), "--init-image", str(init), "--strength", "0.5"]) == 0
    settings = parse_parameters(read_parameters(tmp_path / "a" / "000-0-a-red-circle.png"))[2]
    assert settings["Strength"] == "0.5"
    assert main([*base, "-o", str(tmp_path / "b"), "--init-image", str(init), "--mask", str(mask),
                 "--strength", "1.0", "--mask-blur", "2"]) == 0  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "c"), "--init-image", str(init), "--mask", str(mask)]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / x / "000-0-a-red-circle.png")).astype(int) for x in "abc")
    assert np.abs(b - c).max() > 0  # strength and mask blur change the result
    plain = tmp_path / "plain"
    assert main([*base, "-o", str(plain)]) == 0
    assert np.abs(np.asarray(Image.open(plain / "000-0-a-red-circle.png")).astype(int) - a).max() > 0


def test_edits_refused_where_they_cannot_work(sd3_folder, tmp_path, capsys):
    folder = str(tiny_unclip_folder(tmp_path / "m"))
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "white").save(init)
    (tmp_path / "bad.png").write_text("not an image")
    for argv, message in (
        (["--model", folder, "--init-image", str(init)], "does not edit images"),
        (["--model", sd3_folder, "--mask", str(init)], "--mask needs --init-image"),
        (["--model", sd3_folder, "--init-image", str(tmp_path / "bad.png")], "not a readable image"),
        (["--model", sd3_folder, "--init-image", str(init), "--strength", "0"], "--strength: strength must lie"),
        (["--model", sd3_folder, "--init-image", str(init), "--mask", str(init), "--mask-blur", "-1"], "--mask-blur"),
    ):
        assert main(["generate", "a cross", "-o", str(tmp_path / "o"), "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_unclip_models_generate_through_the_same_command(tmp_path):
    folder = str(tiny_unclip_folder(tmp_path / "m"))
    assert main(["generate", "a red circle", "-o", str(tmp_path / "o"), "--model", folder, "--quiet"]) == 0
    assert Image.open(tmp_path / "o" / "000-0-a-red-circle.png").size == (32, 32)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["   "], "prompt is empty"),
        ([], "prompt is empty"),
        (["a cross", "--from-file", "x.txt"], "not both"),
        (["--from-file", "/nonexistent/prompts.txt"], "no such file"),
        (["a cross", "--sampler", "eular"], "did you mean 'euler'"),
        (["a cross", "-n", "0"], "at least 1"),
        (["a cross", "--steps", "0"], "--steps: steps must be a whole number >= 1"),
        (["a cross", "--cfg", "-1"], "--guidance: guidance must be a finite number >= 0"),
        (["a cross", "--guidance", "nan"], "--guidance: guidance must be a finite number >= 0"),
        (["a cross", "--cfg", "inf"], "--guidance: guidance must be a finite number >= 0"),
        (["a cross", "--seed", str(2**70)], "--seed must lie in [0, 2**62)"),
        (["a cross", "--model", "/nonexistent/model"], "unknown model"),
        (["a cross", "--size", "30"], "makes square images"),
        (["a cross", "--preset", "turbo"], "--preset: unknown preset 'turbo'"),
    ],
)
def test_bad_input_gets_a_clear_error_and_writes_nothing(argv, message, sd3_folder, tmp_path, capsys):
    out = tmp_path / "out"
    full = ["generate", *argv, "-o", str(out)]
    if "--model" not in argv:
        full += ["--model", sd3_folder]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_empty_prompt_file(tmp_path, capsys, sd3_folder):
    f = tmp_path / "p.txt"
    f.write_text("# nothing\n\n")
    assert main(["generate", "--from-file", str(f), "--model", sd3_folder, "-o", str(tmp_path / "o")]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_official_sd3_diffusers_folder_with_an_sd3_preset(tmp_path):
    """`--model` also takes an SD3/SD3.5 checkpoint (here a tiny diffusers folder) and its presets."""
    from dataclasses import replace as dc_replace

    from sd3_helpers import randomize_, write_diffusers_folder

    from t2i.models.mmdit import PRESETS, MMDiT
    from t2i.models.vae import PRESETS as VAE_PRESETS
    from t2i.models.vae import AutoencoderKL

    model = randomize_(MMDiT(dc_replace(PRESETS["tiny-x"], context_dim=96, patch_size=2))).eval()
    write_diffusers_folder(tmp_path / "sd3", model, randomize_(AutoencoderKL(VAE_PRESETS["tiny2"])).eval())
    out = tmp_path / "out"
    rc = main(["generate", "a red cube", "--model", str(tmp_path / "sd3"), "--preset", "sd3.5-large-turbo",
               "--size", "64", "-o", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    settings = parse_parameters(read_parameters(out / "000-0-a-red-cube.png"))[2]
    assert (settings["Steps"], settings["CFG scale"], settings["Model"]) == ("4", "1.0", "sd3")
    assert Image.open(out / "000-0-a-red-cube.png").size == (64, 64)
