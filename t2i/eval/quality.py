"""The quality report of the default models: ``make quality`` / ``t2i eval quality`` -> ``docs/quality.md``.

For each model (shipped name or model folder) it measures, on the shapes benchmark (``docs/shapes.md``):

1. the per-category table on the ``eval`` split (all 840 prompts, text track included) and the ``heldout`` split
   (480) at the model's default settings, with the distribution metric (FD / KID in the probe's feature space)
   on ``eval``;
2. score vs steps for several samplers on a fixed subset of ``eval`` (``sweep_per_category`` prompts of each
   category), the overall GenEval-style score and the text track's word accuracy;
3. the ground-truth row: the evaluator on the renderer's own images, the ceiling every score is read against.

Timings are wall-clock seconds on the machine that ran the report (recorded in the output with its CPU count).
Everything is also written as JSON next to the Markdown, which the slow test and the model cards read.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i.shapes.captions import split_prompts
from t2i.shapes.scenes import ground_truth
from t2i.shapes.scoring import evaluate_generator
from t2i.shapes.specs import ALL_CATEGORIES, CATEGORIES, TEXT_CATEGORY

STEPS = (4, 8, 16, 28, 50)
SAMPLERS = {"sd3": ("euler", "heun", "dpmpp_2m"), "unclip": ("ddpm", "euler_ancestral", "ddim")}


def _fn(gen, settings, batch_size: int):
    def fn(prompts: list[str], seeds: list[int]):
        out = []
        for i in range(0, len(prompts), batch_size):
            out.append(gen.generate(prompts[i : i + batch_size], seeds[i : i + batch_size], settings))
        return torch.cat(out)  # [0, 1] floats, as the evaluator reads them

    return fn


def _ground_truth(split: str, size: int, per_category: int | None = None) -> dict[str, Any]:
    by_caption = {(p.caption, p.seed): p for p in split_prompts(split)}

    def fn(prompts, seeds):
        return np.stack([ground_truth(by_caption[(c, s)], size).image for c, s in zip(prompts, seeds, strict=True)])

    report = evaluate_generator(fn, split=split, size=size, per_category=per_category, features=split == "eval")
    return _summary(report, 0.0)


def _summary(report, seconds: float) -> dict[str, Any]:
    d = report.to_dict()
    d.pop("results")
    d["seconds"] = round(seconds, 1)
    return d


@torch.no_grad()
def evaluate_model(model: str, *, per_category: int | None = None, sweep_per_category: int = 20,
                   steps: Sequence[int] = STEPS, samplers: Sequence[str] | None = None, batch_size: int = 64,
                   grid_dir: str | Path | None = None, splits: Sequence[str] = ("eval", "heldout"),
                   sweep: bool = True, precision: str | None = None, log=print) -> dict[str, Any]:  # fmt: skip
    """All measurements of one model (see the module docstring) as a JSON-able dict; ``precision`` overrides the
    model folder's (``load_generator``)."""
    from t2i.pipelines.folders import load_generator

    t0 = time.perf_counter()
    gen = load_generator(model, precision=precision)
    load_s = time.perf_counter() - t0
    d = gen.defaults
    out: dict[str, Any] = {"model": gen.name, "source": model, "kind": gen.kind, "defaults": d.to_dict(),
                           "precision": gen.precision, "load_seconds": load_s}  # fmt: skip
    for split in splits:
        t = time.perf_counter()
        grid = Path(grid_dir) / f"{gen.name}_{split}.png" if grid_dir else None
        report = evaluate_generator(_fn(gen, d, batch_size), split=split, size=d.size, per_category=per_category,
                                    features=split == "eval", batch_size=512, grid=grid)  # fmt: skip
        out[split] = _summary(report, time.perf_counter() - t)
        log(f"{gen.name} {split}: overall {report.overall:.3f} ({len(report.results)} images, "
            f"{out[split]['seconds']} s)")  # fmt: skip
    rows = []
    for sampler in (samplers or SAMPLERS[out["kind"]]) if sweep else ():
        for n in steps:
            s = replace(d, sampler=sampler, steps=int(n))
            t = time.perf_counter()
            report = evaluate_generator(_fn(gen, s, batch_size), split="eval", size=d.size,
                                        per_category=sweep_per_category, batch_size=512)  # fmt: skip
            row = {"sampler": sampler, "steps": int(n), "overall": report.overall,
                   "text": report.accuracy().get(TEXT_CATEGORY), "n_images": len(report.results),
                   "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
            rows.append(row)
            log(f"{gen.name} {sampler} {n} steps: overall {row['overall']:.3f}, text {row['text']}")
    if sweep:
        out["sweep"] = rows
        out["sweep_settings"] = {**d.to_dict(), "precision": gen.precision}  # what the rows vary from
    return out


def run_report(
    models: Sequence[str],
    *,
    out_md: str | Path = "docs/quality.md",
    per_category: int | None = None,
    sweep_per_category: int = 20,
    steps: Sequence[int] = STEPS,
    batch_size: int = 64,
    grid_dir: str | Path | None = "docs/images",
    update_cards: bool | None = None,
    splits: Sequence[str] = ("eval", "heldout"),
    sweep: bool = True,
    precision: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Evaluate ``models`` and the ground truth; write ``out_md`` and ``out_md`` with ``.json``. The evaluated model
    folders' cards are refreshed when the whole splits were scored (``update_cards=None``), always (True) or never."""
    t0 = time.perf_counter()
    if grid_dir:
        Path(grid_dir).mkdir(parents=True, exist_ok=True)
    results = [evaluate_model(m, per_category=per_category, sweep_per_category=sweep_per_category, steps=steps,
                              batch_size=batch_size, grid_dir=grid_dir, splits=splits, sweep=sweep,
                              precision=precision, log=log)
               for m in models]  # fmt: skip
    sizes = sorted({r["defaults"]["size"] for r in results}) or [64]
    truth = {split: _ground_truth(split, sizes[0], per_category) for split in ("eval", "heldout")}
    data = {
        "models": results,
        "ground_truth": truth,
        "settings": {"per_category": per_category, "sweep_per_category": sweep_per_category, "steps": list(steps)},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    if all({"eval", "heldout", "sweep"} <= set(r) for r in results):  # else a partial report: JSON only, to merge
        out_md.write_text(markdown(data, out_dir=out_md.parent))
        if _cards_wanted(update_cards, per_category):
            _refresh_cards(models, out_md.with_suffix(".json"))
    return data


def merge_reports(
    paths: Sequence[str | Path], *, out_md: str | Path, update_cards: bool | None = None
) -> dict[str, Any]:
    """One report from partial ones (e.g. each model evaluated by its own process, side by side)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if not parts:
        raise ValueError("give at least one partial report (.json written by t2i eval quality)")
    settings = {json.dumps(p["settings"], sort_keys=True) for p in parts}
    if len(settings) != 1:
        raise ValueError(f"the partial reports were made with different settings: {sorted(settings)}")
    models: dict[str, dict[str, Any]] = {}
    for part in parts:  # parts of one model (splits, sweep) combine; each keeps the machine it was measured on
        for m in part["models"]:
            models.setdefault(m["model"], {}).update({"machine": part["machine"], **m})
    data = {**parts[0], "models": list(models.values()), "seconds": round(max(p["seconds"] for p in parts), 1)}
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out_md.write_text(markdown(data, out_dir=out_md.parent))
    if _cards_wanted(update_cards, data["settings"].get("per_category")):
        _refresh_cards([m["model"] for m in data["models"]], out_md.with_suffix(".json"))
    return data


def _threads(data: dict[str, Any]) -> str:
    """Torch threads per process; per model when a merged report's parts ran with different counts."""
    per_model = {r["model"]: r.get("machine", data["machine"])["torch_threads"] for r in data["models"]}
    if len(set(per_model.values())) <= 1:
        return str(data["machine"]["torch_threads"])
    return ", ".join(f"{n} for {name}" for name, n in per_model.items())


def _cards_wanted(update_cards: bool | None, per_category: int | None) -> bool:
    """Model cards quote the whole splits: by default (None) a quick subset (``per_category``) leaves them alone."""
    return per_category is None if update_cards is None else update_cards


def _refresh_cards(models: Sequence[str], report_json: Path) -> None:
    from t2i.pipelines.folders import model_folder
    from t2i.pipelines.model_card import write_model_card

    for m in models:
        folder = model_folder(m)
        if folder is not None:
            write_model_card(folder, report_json)


def _options(d: dict[str, Any]) -> str:
    """A folder's family options (shift, skip-layer guidance, ...) in a table cell."""
    shared = {"steps", "guidance", "cfg", "sampler", "size", "negative", "precision"}
    opts = {k: v for k, v in d.items() if k not in shared}
    return (
        ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list | tuple) else v}" for k, v in opts.items()) or "-"
    )


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _learning_curves(models: Sequence[dict[str, Any]], out_dir: Path) -> list[str]:
    """Markdown images of the learning curves shipped in the models' folders (``learning_curve.png``)."""
    from t2i.pipelines.folders import model_folder

    lines = []
    for r in models:
        name, folder = r["model"], model_folder(r.get("source", r["model"]))
        if folder is not None and (folder / "learning_curve.png").is_file():
            rel = Path(os.path.relpath(folder / "learning_curve.png", out_dir)).as_posix()
            lines += [f"![{name} learning curve]({rel})", ""]
    if not lines:
        return []
    return ["", "## Learning curves", "",
            "Score per category on the first `eval` prompts of each category (`run.eval_per_category`) while each "
            "model trained (EMA weights, sampled as the model samples), against training CPU-minutes from the start "
            "of the first stage that was scored and still on disk at export (`run.eval_every`, docs/training.md; "
            "the model cards give every stage's time):", "",
            *lines]  # fmt: skip


def markdown(data: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """The report as Markdown (tables only; the prose around them lives in the header). ``out_dir``: where the
    report goes, to link the models' learning curves relative to it."""
    m = data["machine"]
    s = data["settings"]
    subset = "all prompts" if s["per_category"] is None else f"the first {s['per_category']} prompts per category"
    lines = [
        "# Quality of the default models",
        "",
        "Generated by `make quality` (`t2i eval quality`); do not edit by hand. The benchmark is described in",
        f"[shapes.md](shapes.md). Scores use {subset} of each split; the sweep uses the first "
        f"{s['sweep_per_category']} prompts of each `eval` category. Machine: {m['cpus']} CPUs, torch threads per "
        f"process: {_threads(data)}, torch {m['torch']}; {data['seconds']:.0f} s for the slowest model. What the "
        "figures say and why the models fall short: [quality_analysis.md](quality_analysis.md).",
        "",
        "## Shapes benchmark per category",
        "",
    ]
    cols = [(r["model"], split, r[split]) for r in data["models"] for split in ("eval", "heldout")]
    cols += [("ground truth", split, data["ground_truth"][split]) for split in ("eval", "heldout")]
    lines.append("| category | " + " | ".join(f"{name} `{split}`" for name, split, _ in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for c in ALL_CATEGORIES:
        cells = [_f(rep["accuracy"].get(c)) for _, _, rep in cols]
        label = f"{c} (text track)" if c == TEXT_CATEGORY else c
        if any(x != "-" for x in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **overall** (mean of the 6 GenEval categories) | "
                 + " | ".join(f"**{_f(rep['overall'])}**" for _, _, rep in cols) + " |")  # fmt: skip
    lines.append("| text: letter accuracy | " + " | ".join(_f(rep.get("text_letter_accuracy")) for _, _, rep in cols)
                 + " |")  # fmt: skip
    lines.append("| images | " + " | ".join(str(rep["n_images"]) for _, _, rep in cols) + " |")
    if any(rep.get("layouts") for _, _, rep in cols):  # reports written before layouts existed have none
        lines.append("| position: objects as asked / reversed / otherwise / missing | "
                     + " | ".join("/".join(str(v) for v in rep["layouts"].values()) if rep.get("layouts") else "-"
                                  for _, _, rep in cols) + " |")  # fmt: skip
    lines += ["", "## Distribution metric (`eval`, probe features vs fresh ground truth)", "",
              "| model | FD-probe | KID-probe |", "|---|---:|---:|"]  # fmt: skip
    for name, rep in [(r["model"], r["eval"]) for r in data["models"]] + [
        ("ground truth", data["ground_truth"]["eval"])
    ]:
        lines.append(
            f"| {name} | {rep.get('fd_probe', float('nan')):.3f} | {rep.get('kid_probe', float('nan')):.4f} |"
        )
    lines += ["", "## Defaults and generation time", ""]
    lines += [
        "| model | sampler | steps | guidance | size | options | precision | eval images | seconds |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in data["models"]:
        d = r["defaults"]
        guidance = d.get("guidance", d.get("cfg"))  # reports written before 0.2 call it cfg
        precision = r.get("precision", "fp32")  # reports written before precision existed ran fp32
        lines.append(f"| {r['model']} | {d['sampler']} | {d['steps']} | {guidance} | {d['size']} | {_options(d)} | "
                     f"{precision} | {r['eval']['n_images']} | {r['eval']['seconds']} |")  # fmt: skip
    for r in data["models"]:
        lines += ["", f"## Score vs steps: {r['model']}", "",
                  "Overall GenEval-style score (text-track word accuracy in brackets); seconds for the whole subset.",
                  ""]  # fmt: skip
        then = r.get("sweep_settings")
        if then is not None and then != {**r["defaults"], "precision": r.get("precision", "fp32")}:
            # a sweep merged in from an earlier report: say what it varied from
            was = f"{then['sampler']}, guidance {then.get('guidance', then.get('cfg'))}, {_options(then)}"
            lines += [f"Measured from earlier defaults than the table above: {was}, {then['precision']}.", ""]
        steps = sorted({row["steps"] for row in r["sweep"]})
        lines.append("| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |")
        lines.append("|---|" + "---:|" * len(steps))
        for sampler in dict.fromkeys(row["sampler"] for row in r["sweep"]):
            rows = {row["steps"]: row for row in r["sweep"] if row["sampler"] == sampler}
            cells = [f"{_f(rows[n]['overall'])} ({_f(rows[n]['text'])}, {rows[n]['seconds']} s)" if n in rows else "-"
                     for n in steps]  # fmt: skip
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    gt = data["ground_truth"]["eval"]["overall"]
    lines += ["", f"Ground truth scores {_f(gt)} on `eval` with the same evaluator.", ""]
    if out_dir is not None:
        lines += _learning_curves(data["models"], Path(out_dir))
    return "\n".join(lines)


__all__ = ["CATEGORIES", "evaluate_model", "markdown", "run_report"]
