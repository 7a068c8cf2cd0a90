"""The quality report command on a tiny model folder: tables, JSON, sample grids and the refreshed model card."""

from __future__ import annotations

import json

import torch
from model_folders import tiny_sd3_folder

from t2i.cli.main import main
from t2i.eval.quality import run_report


def test_report_tables_json_and_card(tmp_path):
    from PIL import Image

    folder = tiny_sd3_folder(tmp_path / "m", size=32)
    Image.new("RGB", (8, 8), "white").save(folder / "learning_curve.png")  # shipped by t2i export when scored
    data = run_report([str(folder)], out_md=tmp_path / "q.md", per_category=1, sweep_per_category=1, steps=(1, 2),
                      grid_dir=tmp_path / "grids", update_cards=True, log=lambda *_: None)  # fmt: skip
    (m,) = data["models"]
    assert m["model"] == "tiny-sd3" and m["eval"]["n_images"] == 7 and m["heldout"]["n_images"] == 4
    assert {(r["sampler"], r["steps"]) for r in m["sweep"]} == {(s, n) for s in ("euler", "heun", "dpmpp_2m")
                                                               for n in (1, 2)}  # fmt: skip
    assert data["ground_truth"]["eval"]["overall"] == 1.0  # the evaluator passes the renderer's own images
    assert "fd_probe" in m["eval"] and "fd_probe" not in m["heldout"]
    md = (tmp_path / "q.md").read_text()
    for heading in ("## Shapes benchmark per category", "## Distribution metric", "## Score vs steps: tiny-sd3"):
        assert heading in md
    assert "| **overall** (mean of the 6 GenEval categories) |" in md
    assert sum(m["eval"]["layouts"].values()) == 1  # the one position prompt's objects, wherever they ended up
    assert "| position: objects as asked / reversed / otherwise / missing |" in md and "| 1/0/0/0 |" in md
    assert "## Learning curves" in md and "![tiny-sd3 learning curve](m/learning_curve.png)" in md  # relative link
    assert json.loads((tmp_path / "q.json").read_text())["models"][0]["model"] == "tiny-sd3"
    assert (tmp_path / "grids" / "tiny-sd3_eval.png").exists()
    card = (folder / "README.md").read_text()
    assert "| `eval` | **" in card and "| `heldout` | **" in card
    # by default a quick subset (per_category) leaves the card alone: cards quote the whole splits
    (folder / "README.md").write_text("kept")
    run_report([str(folder)], out_md=tmp_path / "q2.md", per_category=1, sweep_per_category=1, steps=(1,),
               grid_dir=None, log=lambda *_: None)  # fmt: skip
    assert (folder / "README.md").read_text() == "kept"


def test_export_cli_says_what_is_missing(tmp_path, capsys):
    rc = main(["export", "sd3", "--transformer", str(tmp_path / "none"), "--out", str(tmp_path / "m")])
    assert rc == 2
    assert "has no checkpoint" in capsys.readouterr().err


def test_partial_reports_merge(tmp_path):
    """One process evaluates the splits, another the sweep; the merged report has both."""
    import pytest

    from t2i.eval.quality import merge_reports

    a = tiny_sd3_folder(tmp_path / "a", size=32)
    kw = dict(per_category=1, sweep_per_category=1, steps=(1,), grid_dir=None, update_cards=False, log=lambda *_: None)
    run_report([str(a)], out_md=tmp_path / "splits.md", sweep=False, **kw)
    assert not (tmp_path / "splits.md").exists()  # a partial report is JSON only
    run_report([str(a)], out_md=tmp_path / "sweep.md", splits=(), **kw)
    data = merge_reports([tmp_path / "splits.json", tmp_path / "sweep.json"], out_md=tmp_path / "m.md",
                         update_cards=False)  # fmt: skip
    (m,) = data["models"]
    assert m["model"] == "tiny-sd3" and {"eval", "heldout", "sweep"} <= set(m)
    md = (tmp_path / "m.md").read_text()
    assert "## Score vs steps: tiny-sd3" in md and "earlier defaults" not in md
    assert m["sweep_settings"] == {**m["defaults"], "precision": m["precision"]}
    assert "| tiny-sd3 | euler | 3 | 3.0 | 32 | shift 1.0 | fp32 |" in md  # the family options have a column
    # a sweep measured from other defaults (an older report's, merged in) says so
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    sweep["models"][0]["sweep_settings"] = {**m["defaults"], "shift": 2.0, "precision": "bf16"}
    (tmp_path / "old_sweep.json").write_text(json.dumps(sweep))
    merge_reports([tmp_path / "splits.json", tmp_path / "old_sweep.json"], out_md=tmp_path / "m2.md",
                  update_cards=False)  # fmt: skip
    md = (tmp_path / "m2.md").read_text()
    assert "Measured from earlier defaults than the table above: euler, guidance 3.0, shift 2.0, bf16." in md
    # a model measured with another thread count (an older report's part) keeps its own in the header
    other = json.loads((tmp_path / "m.json").read_text())
    other["models"][0]["model"], other["machine"]["torch_threads"] = "tiny-b", 5
    other["models"][0].pop("machine")  # as in a report written before models kept their own
    (tmp_path / "other.json").write_text(json.dumps(other))
    merge_reports([tmp_path / "other.json", tmp_path / "splits.json", tmp_path / "sweep.json"],
                  out_md=tmp_path / "m3.md", update_cards=False)  # fmt: skip
    md = (tmp_path / "m3.md").read_text()
    assert f"torch threads per process: 5 for tiny-b, {torch.get_num_threads()} for tiny-sd3," in md
    run_report([str(a)], out_md=tmp_path / "c.md", **{**kw, "steps": (2,)})
    with pytest.raises(ValueError, match="different settings"):
        merge_reports([tmp_path / "splits.json", tmp_path / "c.json"], out_md=tmp_path / "x.md")


def test_cli_without_a_sweep_writes_a_partial_report(tmp_path, capsys):
    folder = tiny_sd3_folder(tmp_path / "m", size=32)
    out = tmp_path / "q.json"  # a partial report is JSON only, so users name it so
    argv = ["eval", "quality", "--models", str(folder), "--per-category", "1", "--sweep-per-category", "0"]
    assert main([*argv, "--out", str(out), "--grid-dir", ""]) == 0
    data = json.loads(out.read_text())
    assert "sweep" not in data["models"][0] and data["models"][0]["eval"]["n_images"] == 7
    printed = capsys.readouterr().out
    assert not (tmp_path / "q.md").exists() and "no Markdown (a partial report" in printed
    assert f"and {out} in " in printed  # the file it wrote, not q.json.json
