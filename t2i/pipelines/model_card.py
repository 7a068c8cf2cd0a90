"""Model cards (``README.md``) of model folders, written from ``model.json`` and the quality report.

A card states what the model is, how it was trained (config, steps, samples, seed, wall-clock time, hardware),
what it scores on the shapes benchmark (read from ``docs/quality.json`` when the report has evaluated the model)
and what it cannot do. ``t2i export`` writes it; ``t2i eval quality`` rewrites it with fresh scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t2i.io.safetensors_io import atomic_write_text

from .generator import Settings

_PARTS = {
    "sd3": [("transformer", "MMDiT-X (QK-norm) denoiser", "sd3"), ("vae", "KL autoencoder (SD3 VAE design)", "vae"),
            ("clip", "CLIP (text tower used)", "clip"),
            ("caption", "caption encoder (word roles, T5's slot)", "caption")],
    "unclip": [("clip", "CLIP (text and image towers)", "unclip_clip"), ("prior", "diffusion prior", "prior"),
               ("decoder", "32 px base decoder Unet", "decoder"), ("sr", "32 -> 64 px upsampler Unet", "sr"),
               ("caption", "caption encoder (word roles)", "unclip_caption")],
}  # fmt: skip

_LIMITS = {
    "sd3": [
        "It knows only the shapes world (docs/shapes.md): 5 shapes, 9 colours, 1-4 objects, 4 relations and 116 "
        "words of 2-4 capital letters, on a plain light-grey 64 px canvas. Other prompts give shapes anyway.",
        'Quoted text (`the word "CAT"`) reaches the model as the CLIP\'s word tokens and, when `text_chars` is '
        "set in model.json, as one token per letter. It was trained on 116 words of 2-4 capital letters; other "
        "words reuse the same letters but were never seen whole.",
        "Trained at 64 px only; other sizes (32-128 px in steps of 8) run but are out of distribution.",
        "Held-out colour-shape pairs and arrangements (the `heldout` split) test composition it never saw.",
    ],
    "unclip": [
        "It knows only the shapes world (docs/shapes.md), at 64 px (or 32 px from the base stage alone).",
        "CLIP is trained contrastively with in-batch negatives only, so its embeddings bind attributes weakly; "
        "colour attribution and position suffer first, as in DALL-E 2 (paper, Sec. 7).",
        "The upsampler sees no text or CLIP embedding (as in DALL-E 2): it sharpens what the base stage made.",
        "`--negative` is not supported: guidance contrasts with a null caption.",
    ],
}


def _part_row(part: str, what: str, config: str, params: int, rec: dict[str, Any], file: str) -> str:
    """One row of the parts table: a part (or one stage of it) and its training record."""
    return (f"| {part} | {what} | `{config}` | {params / 1e6:.2f} M | {rec.get('steps', rec.get('step', '-'))} | "
            f"{rec.get('batch_size', '-')} | {rec.get('samples', '-')} | {rec.get('seed', '-')} | "
            f"{rec.get('threads', '-')} | {rec.get('precision', '-')} | {_fmt_seconds(rec.get('train_seconds'))} | "
            f"{_fmt_seconds(rec.get('cpu_seconds'))} | {file} |")  # fmt: skip


def _unclip_parts_settings(spec: dict[str, Any]) -> str:
    """What the defaults leave to the prior and the upsamplers: their own settings in model.json."""
    p, ups = spec.get("prior") or {}, spec.get("stages", [])[1:]
    parts = []
    if p:
        best = f", best of {p['candidates']}" if p.get("candidates", 1) > 1 else ""
        parts.append(f"the prior samples {p['steps']} steps of `{p['sampler']}` at CFG {p['guidance']}{best}")
    parts += [f"the {st['size']} px upsampler {st['steps']} steps of `{st['sampler']}`" for st in ups]
    return "; steps, sampler and CFG are the base decoder's" + (f" ({'; '.join(parts)})" if parts else "")


def _unet_config(path: Path) -> dict:
    """A Unet file's config (``UnetConfig`` fields, from its metadata); empty for no file or not a model file, so
    the card just leaves out what it would have said about the maps."""
    from t2i.io.safetensors_io import read_metadata

    try:
        return json.loads(read_metadata(path).get("model_config", "{}"))
    except (OSError, ValueError):
        return {}


def _config_of_run(run: str | None) -> str:
    """The config under ``configs/`` whose ``run.name`` is ``run`` (the card is written from the repository root),
    or "-" when none is found."""
    if run:
        for path in sorted(Path("configs").glob("**/*.yaml")):
            if f"\n  name: {run}\n" in path.read_text():
                return path.as_posix()
    return "-"


def _run_config(run: str | None, folder: str) -> str:
    """The config of a run: the one naming it, else where the recipes' convention puts it (``folder``)."""
    found = _config_of_run(run)
    return found if found != "-" else f"{folder}/{str(run).removeprefix('default_')}.yaml"


def _stages(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A part's training records, first stage to last: the runs it continued (``started_from``), then its own."""
    chain = [rec]
    while chain[0].get("started_from"):
        chain.insert(0, chain[0]["started_from"])
    return chain


def _student(what: str, distilled: dict[str, Any] | None) -> str:
    """A distilled stage's description (each stage names its own method), else ``what`` unchanged."""
    return f"MMDiT-X student ({distilled['method']} distillation)" if distilled else what


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def _quality(name: str, report: Path) -> dict[str, Any] | None:
    if not report.exists():
        return None
    data = json.loads(report.read_text())
    for m in data.get("models", []):
        if m.get("model") == name:
            return {**m, "machine": data.get("machine", {})}
    return None


def card_text(folder: str | Path, quality_json: str | Path | None = None) -> str:
    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    kind, name, d = spec["kind"], spec["name"], Settings.from_dict(spec["defaults"]).to_dict()
    files = {f.name: f.stat().st_size for f in sorted(folder.glob("*.safetensors"))}
    train = spec.get("training", {})
    lines = [f"# {name}", ""]
    distilled = train.get("transformer", {}).get("distilled")
    shared = spec.get("components", {})
    if kind == "sd3" and distilled:
        names = {"consistency": "consistency distillation (LCM-style)", "adversarial": "adversarial distillation "
                 "(LADD-style)"}  # fmt: skip
        # a student that continued an earlier student: each stage's method, first to last
        methods = dict.fromkeys(st["distilled"]["method"] for st in _stages(train["transformer"]) if "distilled" in st)
        how = " and then ".join(names.get(m, m) for m in methods)
        lines.append(f"A few-step, guidance-free student of a small Stable Diffusion 3.5-style model: the teacher's "
                     f"rectified-flow MMDiT-X (`{distilled['teacher']}`) distilled by {how} with CFG "
                     f"{distilled['guidance']} distilled in, so it samples in {distilled['student_steps']} steps "
                     "without classifier-free guidance (one call per step), like SD3.5 Large Turbo.")  # fmt: skip
        if shared:
            lines.append("It uses its teacher's VAE and text encoder files: "
                         + ", ".join(f"`{v}`" for v in shared.values()) + ".")  # fmt: skip
    elif kind == "sd3":
        lines.append("A small Stable Diffusion 3.5-style model trained by t2i from scratch on the shapes world: a "
                     "rectified-flow MMDiT-X with QK-norm over the latents of a KL autoencoder, conditioned on a "
                     "small CLIP text tower's per-token states and pooled embedding, sampled with classifier-free "
                     "guidance.")  # fmt: skip
    else:
        stages = spec.get("stages") or [{}]
        unet = _unet_config(folder / stages[0].get("file", "decoder.safetensors"))
        grid = int(unet.get("image_map_grid") or 0)
        how = f" (also as a coarse {grid} x {grid} map read from it, which places the objects)" if grid else ""
        if unet.get("text_map_grid"):
            how += (" and on the caption encoder's coarse picture of the caption (which colour and which shape go "
                    "where)")  # fmt: skip
        lines.append("A small DALL-E 2 (unCLIP) cascade trained by t2i from scratch on the shapes world: CLIP, a "
                     f"diffusion prior from text to CLIP image embeddings, a {stages[0].get('size', 32)} px base "
                     f"decoder conditioned on the image embedding{how} and the caption, and a 32 -> 64 px "
                     "upsampler.")  # fmt: skip
        if spec.get("caption_encoder"):
            readers = ["prior"] if (spec.get("prior") or {}).get("text_words") else []
            readers += ["base decoder"] if any(st.get("text_words") for st in spec.get("stages", [])) or unet.get(
                "text_map_grid") else []  # fmt: skip
            lines[-1] += (f" The {' and the '.join(readers) or 'cascade'} also read{'s' if len(readers) < 2 else ''} "
                          "the states of a small caption encoder, trained to predict "
                          "each caption's coarse picture, which say where each named object goes: CLIP's image "
                          "embedding barely tells a scene from its mirror image (`caption.safetensors`, "
                          "t2i.models.caption).")  # fmt: skip
    if kind == "sd3" and spec.get("text_words"):
        lines[-1] += (" Where SD3 puts T5's tokens, the text encoder also passes the CLIP's input embeddings of the "
                      "prompt's words, which keep apart the relation words (left, right, above, below) that the "
                      "small CLIP's later layers blur together.")  # fmt: skip
        if spec.get("text_word_positions"):
            lines[-1] += " Each word token carries a sincos code of its place in the prompt, so word order survives."
        if spec.get("caption_encoder"):
            lines[-1] += (" A small bidirectional caption encoder, trained to predict each caption's coarse "
                          "picture, turns those word tokens into states that say where each named object goes "
                          "(`caption.safetensors`, t2i.models.caption).")  # fmt: skip
        if spec.get("text_word_prefix"):
            lines[-1] += (" Each word token also carries the mean of the words before it, so the words after a "
                          "relation say which way it points.")  # fmt: skip
    if kind == "sd3" and spec.get("text_chars"):
        lines[-1] += (f" The text encoder also spells the prompt's quoted text as {spec['text_chars']} character "
                      "tokens, where SD3 puts T5's tokens.")  # fmt: skip
    lines += ["", "```bash", f't2i generate "a red circle above a blue square" --model {name} -n 4', "```", "",
              f"Defaults: {d['steps']} steps of `{d['sampler']}`, CFG {d['guidance']}, {d['size']} px"
              + (f", shift {d['shift']}" if "shift" in d else "")
              + (f", skip-layer guidance {d['slg_scale']} on blocks {', '.join(map(str, d.get('slg_layers', ())))}"
                 if d.get("slg_scale") else "")
              + (", classifier-free guidance only while the noise level lies in "
                 f"{d['guidance_interval'][0]}-{d['guidance_interval'][1]}" if d.get("guidance_interval") else "")
              + (_unclip_parts_settings(spec) if kind == "unclip" else "")
              + "."
              + _precision_note(kind, spec.get("precision", "fp32")), ""]  # fmt: skip
    lines += ["## Parts and training", "",
              "All parts were trained with `t2i train` on the `train` stream of the shapes benchmark (`shapes-v1`, "
              "procedurally rendered, never stored), on a machine with 2 CPU cores and no GPU; the precision column "
              "is each run's: bf16 autocast, or fp32 where the CPU had no bf16 matmuls. "
              "Time is wall-clock (runs with 1 thread went side by side); CPU time is the training process's CPU "
              "seconds over all its threads, without scoring and sample grids (recorded by newer runs).", "",
              "| part | what | config | params | steps | batch | samples seen | seed | threads | precision | time "
              "| CPU time | file |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]  # fmt: skip
    continued = False  # the student's last stage continues the one before (the retrain line says how)
    for key, what, cfgname in _PARTS[kind]:
        if key == "caption" and not spec.get("caption_encoder"):
            continue
        r = train.get(key, {})
        fname = f"{key}.safetensors"
        size = f"`{fname}` ({files[fname] / 1e6:.1f} MB)" if fname in files else "-"
        if key in shared and (folder / shared[key]).exists():
            size = f"`{shared[key]}` ({(folder / shared[key]).stat().st_size / 1e6:.1f} MB, shared)"
        stages = _stages(r)  # a curriculum: the stages it continued, first to last, then this one
        for i, st in enumerate(stages, 1):
            if st.get("continued") and i > 1:  # `--resume-from` an earlier stage: its config, with overrides
                label, continued = f"{key}, stage {i} (continues stage {i - 1})", True
            elif len(stages) > 1:
                label, config = f"{key}, stage {i}", _run_config(st.get("run"), "configs/default")
                recipe = f"configs/default/{cfgname}{'' if i == 1 else '_more'}.yaml"
                if not Path(config).exists() and Path(recipe).exists():  # an experiment's run: the recipe's stage
                    config = recipe
            elif st.get("distilled"):
                label, config = key, _run_config(st.get("run"), "configs/distill")
            else:
                label, config = key, f"configs/default/{cfgname}.yaml"
            if key == "transformer":
                student_config = config  # the last stage's, for the retrain line below
            lines.append(_part_row(label, _student(what, st.get("distilled")), config, r.get("params", 0), st,
                                   size if i == len(stages) else "-"))  # fmt: skip
    if kind == "sd3" and "controlnet" in train:  # an extra added by `t2i export controlnet`
        r, fname = train["controlnet"], "controlnet.safetensors"
        size = f"`{fname}` ({files[fname] / 1e6:.1f} MB)" if fname in files else "-"
        lines.append(_part_row("controlnet", "ControlNet (`--control`)", _config_of_run(r.get("run")),
                               r.get("params", 0), r, size))  # fmt: skip
    retrain = "Retrain everything with `make train-defaults`."
    if distilled and continued:
        retrain = (
            "Retrain the student with `make train-defaults` after the teacher: its last stage continues the "
            "stage before it with `t2i train ... --resume-from` and the overrides the Makefile gives."
        )
    elif distilled:
        retrain = (f"Retrain the student with `t2i train {student_config}` after the teacher (`make "
                   "train-defaults` does both).")  # fmt: skip
    lines += ["", f"Weights are the EMA weights of each run's last checkpoint, stored in fp16 (loaded as fp32). "
              f"{retrain}", ""]  # fmt: skip
    if (folder / "learning_curve.png").exists():
        lines += ["Shapes benchmark score per category while the transformer trained (its stages that were scored "
                  "and still on disk at export, in order; the first `eval` prompts of each category, EMA weights), "
                  "against training CPU-minutes from the first of them:", "",
                  "![learning curve](learning_curve.png)", ""]  # fmt: skip
    q = _quality(name, Path(quality_json)) if quality_json else None
    lines += ["## Shapes benchmark", ""]
    if q is None and distilled:
        lines += ["Score against NFE, beside its teacher at 4 to 50 steps with CFG: docs/distill.md "
                  "(`benchmarks/distill_shapes.py`).", ""]  # fmt: skip
    elif q is None:
        lines += ["Not measured yet: run `make quality` (writes docs/quality.md and refreshes this card).", ""]
    else:
        lines += ["At the defaults above, from `make quality` (full table and step sweeps: docs/quality.md):", "",
                  "| split | overall | single | two | counting | colors | position | attribution | text words |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for split in ("eval", "heldout"):
            a = q[split]["accuracy"]
            cells = [a.get(c) for c in ("single_object", "two_objects", "counting", "colors", "position",
                                        "color_attribution", "text")]  # fmt: skip
            lines.append(f"| `{split}` | **{q[split]['overall']:.3f}** | "
                         + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")  # fmt: skip
        if "fd_probe" in q["eval"]:
            lines += ["", f"Distribution metric on `eval`: FD-probe {q['eval']['fd_probe']:.2f}, "
                          f"KID-probe {q['eval']['kid_probe']:.4f}."]  # fmt: skip
        lines.append("")
    lines += ["## Limits", ""] + [f"- {x}" for x in _LIMITS[kind]] + [""]
    return "\n".join(lines)


def _precision_note(kind: str, precision: str) -> str:
    if precision != "bf16":
        return " The denoisers run in fp32."
    what = (
        "the transformer runs"
        if kind == "sd3"
        else "the decoder Unets run (channels-last; CLIP and the prior in fp32)"
    )
    return (
        f" By default {what} under bf16 autocast, which scores as fp32 does on the shapes benchmark (within 0.004 "
        "on `eval`) and draws 1.4-2.4x faster on a CPU with bf16 matmuls (docs/performance.md); on a CPU without "
        "them (AVX2 only), where bf16 is emulated and slow, it runs fp32. `--precision fp32` or `bf16` forces one."
    )


def write_model_card(folder: str | Path, quality_json: str | Path | None = "docs/quality.json") -> Path:
    path = Path(folder) / "README.md"
    atomic_write_text(path, card_text(folder, quality_json))
    return path
