"""Slow: the quality command on a subset of the shipped models, against the figures recorded in docs/quality.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "docs" / "quality.json"


@pytest.mark.slow
def test_shipped_models_keep_their_recorded_quality(tmp_path):
    from t2i.eval.quality import run_report

    recorded = {m["model"]: m for m in json.loads(REPORT.read_text())["models"]}
    data = run_report(list(recorded), out_md=tmp_path / "q.md", per_category=20, sweep_per_category=5, steps=(8,),
                      grid_dir=None, update_cards=False, log=lambda *_: None)  # fmt: skip
    for m in data["models"]:
        for split in ("eval", "heldout"):
            was, now = recorded[m["model"]][split]["overall"], m[split]["overall"]
            assert now >= 0.8 * was, f"{m['model']} {split}: {now:.3f} < 0.8 x recorded {was:.3f}"
