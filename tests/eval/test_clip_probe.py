"""The CLIP counterfactual probe: per-category rows against chance, the table, and ``t2i eval clip``."""

from __future__ import annotations


def test_clip_counterfactual_probe_and_cli(tmp_path, capsys):
    import dataclasses

    import torch
    from model_folders import shapes_clip

    from t2i.cli.main import main
    from t2i.eval.clip_probe import counterfactual_probe, probe_table
    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.files import clip_extra, save_model_file

    torch.manual_seed(0)
    clip = shapes_clip(dataclasses.replace(CLIP_PRESETS["tiny"], context_length=24))
    rows = counterfactual_probe(clip, "eval", per_category=3)
    assert [r.category for r in rows] == ["counting", "position", "color_attribution", "all"]
    by = {r.category: r for r in rows}
    assert by["counting"].chance == 0.5  # one rewrite each: the count changed
    assert by["all"].prompts == 9 and 0 <= by["all"].accuracy <= 1 and -1 <= by["all"].text_cosine <= 1
    assert "| position | 3 |" in probe_table(rows)
    save_model_file(tmp_path / "clip.safetensors", "clip", clip, **clip_extra(clip))
    assert main(["eval", "clip", "--clip", str(tmp_path / "clip.safetensors"), "--per-category", "2"]) == 0
    assert "true caption ranked first" in capsys.readouterr().out
