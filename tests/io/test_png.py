"""PNG ``parameters`` chunk: the A1111 layout, round trips with awkward prompts, contact sheets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from t2i.io.png import contact_sheet, format_parameters, parse_parameters, read_parameters, save_png, to_pil

SETTINGS = {"Steps": 28, "Sampler": "euler", "CFG scale": 4.0, "Seed": 7, "Size": "64x64", "Model": "sd3-shapes"}


def test_layout_matches_what_png_info_readers_parse():
    text = format_parameters("a red circle", SETTINGS, "blurry")
    assert text == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 28, Sampler: euler, CFG scale: 4.0, Seed: 7, Size: 64x64, Model: sd3-shapes"
    )


@pytest.mark.parametrize(
    "prompt",
    ['the word "CAT"', "commas, colons: and 'quotes'", "unicode: ünïcödé ✓", ""],
)
def test_round_trip_through_a_png_file(tmp_path, prompt):
    settings = {**SETTINGS, "Note": 'has, comma: and "quote"'}
    path = save_png(tmp_path / "x.png", Image.new("RGB", (4, 4)), format_parameters(prompt, settings, "no, thanks"))
    back_prompt, negative, back = parse_parameters(read_parameters(path))
    assert back_prompt == prompt and negative == "no, thanks"
    assert back == {k: str(v) for k, v in settings.items()}


def test_line_breaks_and_nul_cannot_forge_lines(tmp_path):
    forged = "a cat\nNegative prompt: evil\nSteps: 1, Sampler: forged, CFG scale: 0, Seed: 0\x00\r\u2028x"
    text = format_parameters(forged, SETTINGS, "neg\nSteps: 2")
    assert text.count("\n") == 2 and "\x00" not in text and "\r" not in text and "\u2028" not in text
    path = save_png(tmp_path / "x.png", Image.new("RGB", (4, 4)), text)
    prompt, negative, back = parse_parameters(read_parameters(path))
    assert prompt.startswith("a cat Negative prompt: evil Steps: 1") and negative == "neg Steps: 2"
    assert back == {k: str(v) for k, v in SETTINGS.items()}  # the real settings, not the forged ones


def test_to_pil_rounds_and_clamps():
    img = torch.tensor([[[0.0, 1.0]], [[0.5, 2.0]], [[-1.0, 0.998]]])  # (3, 1, 2)
    pil = to_pil(img)
    assert [pil.getpixel((0, 0)), pil.getpixel((1, 0))] == [(0, 128, 0), (255, 255, 254)]


def test_contact_sheet_layout():
    ims = [Image.new("RGB", (32, 32), (255, 0, 0))] * 5
    sheet = contact_sheet(ims, ["a very long caption that will not fit in one cell at all"] * 5, cell=64)
    assert sheet.size == (3 * 68 + 4, 2 * (64 + 14 + 4) + 4)
    assert sheet.getpixel((4 + 10, 4 + 10)) == (255, 0, 0)
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([])
