"""The CLIP counterfactual probe: per-category rows against chance, the table, and ``t2i eval clip``."""

from __future__ import annotations


def test_clip_counterfactual_probe_and_cli(tmp_path, capsys):
    import dataclasses
    import math

    import torch
    from model_folders import shapes_clip

    from t2i.cli.main import main
    from t2i.eval.clip_probe import counterfactual_probe, probe_table
    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.files import clip_extra, save_model_file

    torch.manual_seed(0)
    clip = shapes_clip(dataclasses.replace(CLIP_PRESETS["tiny"], context_length=24))
    rows = counterfactual_probe(clip, "eval", per_category=3)
    assert [r.category for r in rows] == ["two_objects", "counting", "position", "color_attribution", "all"]
    by = {r.category: r for r in rows}
    assert by["counting"].chance == 0.5  # one rewrite each: the count changed
    assert by["counting"].image_chance == 0.5  # one changed scene each: an object left out
    # "a circle and a square" has no caption rewrite, but a scene with one of them left out
    assert math.isnan(by["two_objects"].accuracy) and by["two_objects"].image_chance == 0.5
    assert by["position"].image_chance < 0.5  # mirrored, and swapped or an object left out
    assert by["all"].prompts == 12 and 0 <= by["all"].accuracy <= 1 and -1 <= by["all"].text_cosine <= 1
    assert 0 <= by["all"].image_accuracy <= 1 and -1 <= by["all"].image_cosine <= 1
    table = probe_table(rows)
    assert "| position | 3 |" in table and "| two_objects | 3 | - | - | - |" in table
    save_model_file(tmp_path / "clip.safetensors", "clip", clip, **clip_extra(clip))
    assert main(["eval", "clip", "--clip", str(tmp_path / "clip.safetensors"), "--per-category", "2"]) == 0
    assert "true caption ranked first" in capsys.readouterr().out
