"""``t2i export``: model folders (``t2i.pipelines.folders``) from ``t2i train`` runs.

Each part is the EMA weights of a run's newest checkpoint. The settings the networks were trained with (latent
format, text layer, schedules, parameterisation, sampler, guidance) are read from the runs' stored configs, so
sampling always matches training; ``model.json`` records where every part came from (run, checkpoint, step,
samples seen, CPU time, and the runs an earlier curriculum stage started from), which the model card shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i.diffusion import check_guidance_interval, check_sampling_setting
from t2i.errors import check_choice
from t2i.io import read_config, read_metadata
from t2i.io.runs import STEP_PREFIX, checkpoint_step, list_checkpoints, trained_weights_file
from t2i.models.files import clip_extra, load_model_file, save_model_file
from t2i.pipelines.folders import (
    PRECISIONS,
    component_file,
    read_model_json,
    upgrade_settings_keys,
    write_model_json,
)

from .report import plot_eval_curves, read_metrics
from .trained import load_trained


def _run_part(run: str | Path, name: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(EMA network, stored run config, training record) of the newest checkpoint of a ``t2i train`` run, or of the
    checkpoint folder given (``runs/x/checkpoints/step_00001000``: an earlier step than the newest)."""
    run = Path(run)
    if run.is_file() and read_metadata(run).get("t2i_component") == name:
        # a component of an existing model folder (keep its VAE / CLIP, retrain the rest): its training record
        # comes from that folder's model.json
        net, _ = load_model_file(run)
        spec = read_model_json(run.parent) if (run.parent / "model.json").is_file() else {}
        return net, {}, dict(spec.get("training", {}).get(run.stem) or {"component": str(run)})
    if run.parent.name == "checkpoints" and run.name.startswith(STEP_PREFIX):  # one checkpoint of a run
        if run not in list_checkpoints(run.parent.parent):
            raise FileNotFoundError(
                f"{run} is not a complete checkpoint (its writing was interrupted, or it is "
                "not there); pick another of the run's checkpoints, or the run folder itself"
            )
        weights, run = trained_weights_file(run), run.parent.parent
    else:
        weights = trained_weights_file(run) if (run / "checkpoints").is_dir() else None
    if weights is None:
        raise FileNotFoundError(
            f"{run} has no checkpoint; train it with `t2i train configs/default/...yaml`, or "
            "give a component file of a model folder (e.g. models/sd3-shapes/vae.safetensors)"
        )
    cfg = read_config(weights)
    net = load_trained(weights, name)
    record = _checkpoint_record(weights, cfg, params=sum(p.numel() for p in net.parameters()))
    return net, cfg, record


def _continued_from(run: Path) -> dict[str, Any] | None:
    """``{"checkpoint", "step"}`` of the run a run continued with ``t2i train --resume-from``, or None."""
    note = run / "continued_from.json"
    return json.loads(note.read_text()) if note.is_file() else None


def _started_from(cfg: dict[str, Any] | None) -> str | None:
    """The weights a run started from (``model.init_from``, or a distillation student's ``student_init``), or None."""
    cfg = cfg or {}
    task = cfg.get("task") or {}
    start = (cfg.get("model") or {}).get("init_from")
    if not start and task.get("name") == "distill":  # a student that started from an earlier student's weights
        start = (task.get("params") or {}).get("student_init")
    return start or None


def _checkpoint_record(weights: Path, cfg: dict[str, Any] | None, depth: int = 0, **extra: Any) -> dict[str, Any]:
    """The training record of a checkpoint's weights file (``<run>/checkpoints/step_N/<file>``): its step, batch,
    images seen, precision, threads and seed (from ``cfg``, the config stored with it), wall-clock and CPU time up to
    that step, and, for a later stage of a curriculum (``model.init_from``, or a distillation's ``student_init``),
    the record of the stage it started from."""
    ckpt = weights.parent
    run, step = ckpt.parent.parent, checkpoint_step(ckpt)
    rec: dict[str, Any] = {"run": run.name, "checkpoint": ckpt.name, "weights": weights.name, "step": step}
    if cfg:
        run_cfg, batch = cfg["run"], cfg["data"]["batch_size"]
        rec.update(batch_size=batch, samples=step * batch, precision=run_cfg["precision"],
                   threads=run_cfg["threads"], seed=run_cfg["seed"])  # fmt: skip
    rec.update(extra)
    task = (cfg or {}).get("task", {})
    if task.get("name") == "distill":  # a student: each stage's card row names its own method
        rec["distilled"] = {k: task["params"][k] for k in ("method", "teacher", "guidance", "student_steps")}
    # a run resumed from another run's checkpoint (`t2i train --resume-from`) continues that run as a later stage:
    # its counters (step, images, CPU time) carry the earlier stage's, which its own record leaves out
    continued = _continued_from(run)
    first_step = int(continued["step"]) if continued else 0
    if continued:
        rec["continued"] = True
        rec["steps"] = step - first_step
        if "samples" in rec:
            rec["samples"] = rec["steps"] * rec["batch_size"]
    if (run / "metrics.jsonl").is_file():
        rec["train_seconds"] = _train_seconds(run, step, first_step)
        cpu = _last_metric(run, "cpu_seconds", step)
        if cpu is not None:
            rec["cpu_seconds"] = round(cpu, 1)
    if continued:  # where the continued run is gone, its CPU time stays in this stage's (no way to split it)
        earlier = _stage_record(str(Path(continued["checkpoint"]) / weights.name), depth + 1)
        if earlier is not None and earlier.get("cpu_seconds") is not None and "cpu_seconds" in rec:
            rec["cpu_seconds"] = round(rec["cpu_seconds"] - earlier["cpu_seconds"], 1)
    else:
        earlier = _stage_record(_started_from(cfg), depth + 1)
        # it started from a model folder's component, and that folder has since been exported from this run or a
        # later stage of it: the folder's record lists this stage, and what this stage started from is below it
        stage = earlier
        while stage is not None and (stage.get("run"), stage.get("step")) != (rec["run"], step):
            stage = stage.get("started_from")
        if stage is not None:
            earlier = stage.get("started_from")
    if earlier is not None:  # a later stage of a curriculum: the card counts the stage it started from too
        rec["started_from"] = earlier
    return rec


def _folder_spec_of(component: str | Path) -> dict[str, Any]:
    """The model.json of the folder a component file (e.g. ``models/unclip-shapes/prior.safetensors``) sits in."""
    folder = Path(component).parent
    if not (folder / "model.json").is_file():
        raise ValueError(f"{component}: a component file needs its folder's model.json beside it")
    return read_model_json(folder)


def _stage_record(init_from: str | None, depth: int = 0) -> dict[str, Any] | None:
    """The training record of the run checkpoint or model-folder component a run started from (``model.init_from``),
    or None when it did not start from a ``t2i train`` checkpoint (``<run>/checkpoints/step_N/<file>``) still on disk
    or a component file beside its model.json. A stage that itself continued an earlier one carries that one's
    record as its ``started_from``, and so on."""
    if not init_from or depth > 16:  # a curriculum, not a cycle
        return None
    p = Path(init_from)
    if p.is_file() and (p.parent / "model.json").is_file() and read_metadata(p).get("t2i_component"):
        # a stage that continued a model folder's component (e.g. models/sd3-shapes/transformer.safetensors): the
        # folder's record of that component, with every stage it lists, is where this one started
        earlier = read_model_json(p.parent).get("training", {}).get(p.stem)
        return dict(earlier) if earlier else None
    if p.parent.parent.name != "checkpoints" or not (p.parents[2] / "metrics.jsonl").is_file():
        return None
    return _checkpoint_record(p, read_config(p) if p.is_file() else None, depth)


def _earlier_run(run: Path) -> tuple[Path, int, bool] | None:
    """(run folder, step, continued) of the checkpoint a run continued (``--resume-from``: its counters carry on) or
    started from (``model.init_from``, a student's ``student_init``: they start again), where that run is on disk."""
    if (continued := _continued_from(run)) is not None:
        ckpt = Path(continued["checkpoint"])
        return ckpt.parent.parent, checkpoint_step(ckpt), True
    weights = trained_weights_file(run) if (run / "checkpoints").is_dir() else None
    start = _started_from(read_config(weights) if weights is not None else None)
    p = Path(start) if start else None
    if p is None or p.parent.parent.name != "checkpoints" or not (p.parents[2] / "metrics.jsonl").is_file():
        return None
    return p.parents[2], checkpoint_step(p.parent), False


def _learning_curve(run: Path, upto: int, out: Path) -> bool:
    """The scores a run logged while it trained (``run.eval_every``) to step ``upto``, after those of the runs it
    continued or started from that are still on disk, against training CPU-minutes counted from the first of them,
    written to ``out`` as a PNG; False when none of them was scored."""
    chain, links = [(run, upto)], []  # the latest stage first; links[i]: chain[i] continued chain[i + 1]'s counters
    while len(chain) < 16 and (earlier := _earlier_run(chain[-1][0])) is not None:
        chain.append(earlier[:2])
        links.append(earlier[2])
    records, offset = [], 0.0
    for i in reversed(range(len(chain))):  # the first stage first
        stage, last = chain[i]
        first = chain[i + 1][1] if i + 1 < len(chain) and links[i] else 0  # a continued run's rows from its start
        rows = [r for r in read_metrics(stage / "metrics.jsonl") if first < r["step"] <= last and "cpu_seconds" in r]
        records += [{**r, "cpu_seconds": r["cpu_seconds"] + offset} for r in rows if "eval/overall" in r]
        if i > 0 and not links[i - 1] and rows:  # the next stage started from these weights, its CPU count at zero
            offset += rows[-1]["cpu_seconds"]
    title = " -> ".join(stage.name for stage, _ in reversed(chain))
    return plot_eval_curves(records, out, title=title) is not None


def _last_metric(run: Path, key: str, upto: int | None = None) -> float | None:
    """The last logged value of ``key`` in a run's ``metrics.jsonl`` at step ``upto`` or before (None when it never
    logged one)."""
    rows = [r for r in read_metrics(run / "metrics.jsonl") if upto is None or r["step"] <= upto]
    return next((r[key] for r in reversed(rows) if key in r), None)


def _train_seconds(run: Path, upto: int | None = None, first_step: int = 0) -> float | None:
    """Wall-clock training time summed over the run's logged intervals (resumes included) to step ``upto``, the
    steps before the first log (from ``first_step``, where the run started) at the logged rate."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if upto is None or r["step"] <= upto]
    if len(rows) < 2:
        return None
    total, prev = 0.0, rows[0]
    for row in rows[1:]:
        if row["step"] > prev["step"] and row["time"] > prev["time"]:
            dt = row["time"] - prev["time"]
            total += dt if dt < 600 else 0.0  # a gap of > 10 min between logs is a stopped run, not training
        prev = row
    first = rows[0]
    return round(total + (first["step"] - first_step) * (total / max(rows[-1]["step"] - first["step"], 1)), 1)


def export_sd3(out: str | Path, *, transformer: str, vae: str, clip: str, name: str = "sd3-shapes",
               defaults: dict[str, Any] | None = None, share_from: str | Path | None = None,
               precision: str = "bf16") -> Path:  # fmt: skip
    """A ``sd3`` model folder from an ``sd3`` task run and the VAE and CLIP runs it was trained with.

    ``share_from``: an existing sd3 model folder whose VAE and text encoder this one uses (a distilled student
    and its teacher): ``model.json`` points at that folder's files instead of holding copies. They must hold the
    same weights as the ``vae`` and ``clip`` runs, which is checked."""
    from t2i.models.vae import LatentFormat

    out = Path(out)
    net, cfg, rec = _run_part(transformer, "mmdit")
    task = cfg["task"]["params"]
    student = {}
    if cfg["task"]["name"] == "distill":  # a few-step student: its base task's settings, its own step preset
        from .tasks.sd3 import SD3TaskConfig

        base = {**dataclasses.asdict(SD3TaskConfig()), **task["base_params"]}
        sampler = task.get("student_sampler") or (
            "consistency" if task["method"] == "consistency" else base["sampler"]
        )
        student = {"steps": task["student_steps"], "guidance": 1.0, "sampler": sampler}
        task = base
    vae_net, _, vae_rec = _run_part(vae, "sd3_vae")
    if task.get("latent_scale") is None:
        raise ValueError(f"{transformer}: pin task.params.latent_scale/latent_shift in its config before export")
    fmt = LatentFormat(task["latent_scale"], task["latent_shift"])
    clip_net, _, clip_rec = _run_part(clip, "clip")
    parts = [("vae", vae_net), ("clip", clip_net)]
    caption_rec = None
    if task.get("caption_encoder"):  # the run names its caption encoder; the folder carries it as a component
        caption_net, _, caption_rec = _run_part(task["caption_encoder"], "caption_encoder")
        parts.append(("caption", caption_net))
    bad = [i for i in (defaults or {}).get("slg_layers", ()) if not 0 <= i < net.cfg.depth]
    if bad:  # caught here, not at every later `t2i generate` of the folder
        raise ValueError(f"skip-layer guidance layers {bad}: {transformer} has {net.cfg.depth} MMDiT blocks, "
                         f"use indices in 0..{net.cfg.depth - 1}")  # fmt: skip
    if (defaults or {}).get("guidance_interval") is not None:
        defaults = {**defaults, "guidance_interval": list(check_guidance_interval(defaults["guidance_interval"]))}
    out.mkdir(parents=True, exist_ok=True)
    save_model_file(out / "transformer.safetensors", "mmdit", net)
    # the learning curve: the scores logged while it trained, the stages it started from included
    run = Path(transformer)
    run = run.parent.parent if run.parent.name == "checkpoints" else run
    drawn = (run / "metrics.jsonl").is_file() and _learning_curve(run, rec["step"], out / "learning_curve.png")
    if not drawn and (run / "eval_curve.png").is_file():  # the run's own plot, where its metrics are gone
        shutil.copyfile(run / "eval_curve.png", out / "learning_curve.png")
    components = {}
    if share_from is not None:
        shared = Path(share_from)
        shared_spec = read_model_json(shared)
        for part, module in parts:
            if part == "caption" and not shared_spec.get("caption_encoder"):
                raise ValueError(f"{shared} has no caption encoder to share; export without sharing")
            f = component_file(shared, shared_spec, part)
            theirs, extra = load_model_file(f)
            ours = {k: v.half().float() for k, v in module.state_dict().items()}  # as stored: fp16
            if theirs.state_dict().keys() != ours.keys() or any(
                not torch.equal(v, ours[k]) for k, v in theirs.state_dict().items()
            ):
                raise ValueError(f"{f} does not hold the weights of the {part} run given; export without sharing")
            if part == "vae" and extra.get("latent_format") != dataclasses.asdict(fmt):
                raise ValueError(f"{f} has latent format {extra.get('latent_format')}, the run {fmt}")
            components[part] = os.path.relpath(f, out)
    else:
        save_model_file(out / "vae.safetensors", "sd3_vae", vae_net, latent_format=dataclasses.asdict(fmt))
        save_model_file(out / "clip.safetensors", "clip", clip_net, **clip_extra(clip_net))
        if caption_rec is not None:
            save_model_file(out / "caption.safetensors", "caption_encoder", caption_net)
    d = {"steps": cfg["run"]["sample_steps"], "guidance": task["guidance"], "sampler": task["sampler"],
         "size": cfg["data"]["image_size"], "shift": task["shift"], **student,
         **upgrade_settings_keys(defaults or {})}  # fmt: skip
    spec = {"kind": "sd3", "name": name, "precision": _precision(precision), "text_layer": task["text_layer"],
            "defaults": d,
            "training": {"transformer": rec, "vae": vae_rec, "clip": clip_rec}}  # fmt: skip
    if task.get("text_chars"):
        spec["text_chars"] = task["text_chars"]
    if task.get("text_words"):
        spec["text_words"] = True
    if task.get("text_word_positions"):
        spec["text_word_positions"] = task["text_word_positions"]
    if task.get("text_word_prefix"):
        spec["text_word_prefix"] = task["text_word_prefix"]
    if caption_rec is not None:
        spec["caption_encoder"] = True
        spec["training"]["caption"] = caption_rec
    if components:
        spec["components"] = components
    if (out / "controlnet.safetensors").is_file() and (out / "model.json").is_file():
        # a re-export over a folder with a ControlNet (`t2i export controlnet`) keeps it, and so keeps its record
        kept = read_model_json(out).get("training", {}).get("controlnet")
        if kept:
            spec["training"]["controlnet"] = kept
    write_model_json(out, spec)
    return out


def _precision(precision: str) -> str:
    """How the exported folder runs its denoisers (``t2i.pipelines.folders``): bf16 unless asked otherwise, since
    the shipped models score the same in bf16 at twice the speed (docs/performance.md)."""
    check_choice("precision", precision, PRECISIONS)
    return precision


def export_unclip(
    out: str | Path,
    *,
    clip: str,
    prior: str,
    decoder: str,
    sr: str,
    name: str = "unclip-shapes",
    defaults: dict[str, Any] | None = None,
    prior_settings: dict[str, Any] | None = None,
    precision: str = "bf16",
    upsampler_settings: dict[str, Any] | None = None,
) -> Path:
    """An ``unclip`` model folder from CLIP, prior, base-decoder and super-resolution runs. ``prior_settings``
    and ``upsampler_settings`` (``steps``, ``sampler``, ...) override the sampling settings those parts get in
    model.json (by default the runs' own)."""
    prior_settings, upsampler_settings = dict(prior_settings or {}), dict(upsampler_settings or {})
    # refused here, before a folder every generate would reject is written
    for part, settings, keys in (("prior", prior_settings, ("steps", "sampler", "guidance", "candidates")),
                                 ("upsampler", upsampler_settings, ("steps", "sampler"))):  # fmt: skip
        if set(settings) - set(keys):
            raise ValueError(f"{part}_settings takes {', '.join(keys[:-1])} and {keys[-1]}, got {sorted(settings)}")
        for key, value in settings.items():
            check_sampling_setting(key, value, f"the {part}'s {key}")
    out = Path(out)
    clip_net, _, clip_rec = _run_part(clip, "clip")
    prior_net, pcfg, prior_rec = _run_part(prior, "unclip_prior")
    captions: list[str] = []  # the caption encoder any part was trained to read
    if pcfg:
        pt = pcfg["task"]["params"]
        prior_spec = {
            "schedule": pt["vp_schedule"],
            "timesteps": pt["num_train_timesteps"],
            "prediction": pt["prediction"],
            "sampler": "ddim",
            "steps": 32,
            "guidance": 2.0,
            "candidates": 2,
        }
        if pt.get("text_words"):
            prior_spec["text_words"] = True
        if pt.get("caption_encoder"):
            captions.append(pt["caption_encoder"])
    else:  # an existing folder's prior: its sampling spec comes along
        kept = _folder_spec_of(prior)
        prior_spec = dict(kept["prior"])
        if prior_spec.get("text_words") and kept.get("caption_encoder"):
            captions.append(str(component_file(Path(prior).parent, kept, "caption")))
    prior_spec = {**prior_spec, "file": "prior.safetensors", **prior_settings}
    out.mkdir(parents=True, exist_ok=True)
    save_model_file(out / "clip.safetensors", "clip", clip_net, **clip_extra(clip_net))
    save_model_file(out / "prior.safetensors", "unclip_prior", prior_net)
    stages, records = [], {"clip": clip_rec, "prior": prior_rec}
    for key, run in (("decoder", decoder), ("sr", sr)):
        net, cfg, rec = _run_part(run, "unclip_unet")
        records[key] = rec
        if cfg:
            t = cfg["task"]["params"]
            stage = {"size": t.get("stage_size") or cfg["data"]["image_size"], "schedule": t["vp_schedule"],
                     "timesteps": t["num_train_timesteps"], "prediction": t["prediction"], "sampler": t["sampler"],
                     "steps": cfg["run"]["sample_steps"], "guidance": t["guidance"],
                     "lowres_size": t.get("lowres_size"), "sample_level": t["sample_level"]}  # fmt: skip
            if t.get("text_words"):
                stage["text_words"] = True
            if t.get("caption_encoder"):
                captions.append(t["caption_encoder"])
            if t.get("text_map_from"):  # its text map is that caption encoder's layout map of the prompt
                captions.append(t["text_map_from"])
        else:  # an existing folder's stage (keep it, retrain another): its spec comes along
            name_in = Path(run).name
            stage = next((dict(s) for s in _folder_spec_of(run)["stages"] if s["file"] == name_in), None)
            if stage is None:
                raise ValueError(f"{run}: its folder's model.json lists no stage file {name_in!r}")
            kept = _folder_spec_of(run)
            reads_caption = stage.get("text_words") or net.cfg.text_map_grid
            if reads_caption and kept.get("caption_encoder"):  # it keeps the caption encoder it reads
                captions.append(str(component_file(Path(run).parent, kept, "caption")))
        save_model_file(out / f"{key}.safetensors", "unclip_unet", net)
        if key == "sr":
            stage.update(upsampler_settings)
        stages.append({**stage, "file": f"{key}.safetensors"})
    spec = {"kind": "unclip", "name": name, "precision": _precision(precision), "prior": prior_spec}
    if captions:  # the stages read its states in place of the word tokens: the folder carries it
        caption_net, _, records["caption"] = _one_caption_encoder(captions)
        save_model_file(out / "caption.safetensors", "caption_encoder", caption_net)
        spec["caption_encoder"] = True
    d = {"steps": stages[0]["steps"], "guidance": stages[0]["guidance"], "sampler": stages[0]["sampler"],
         "size": stages[-1]["size"], **upgrade_settings_keys(defaults or {})}  # fmt: skip
    write_model_json(out, {**spec, "stages": stages, "defaults": d, "training": records})
    return out


def _one_caption_encoder(paths: list[str]):
    """The caption encoder every part reads (``_run_part``'s triple). Parts may name different runs only when one
    of them holds every other's weights unchanged (a head added with ``model.train_only``, as the decoder's
    text map is added to the prior's caption encoder): its states are then the same for all of them."""
    found = {p: _run_part(p, "caption_encoder") for p in dict.fromkeys(paths)}
    for path, (net, _, _) in found.items():
        mine = net.state_dict()
        if all(all(k in mine and torch.equal(mine[k], v) for k, v in other.state_dict().items())
               for other, _, _ in found.values()):  # fmt: skip
            return found[path]
    raise ValueError(f"the parts were trained with different caption encoders {sorted(found)}, and none of them "
                     "holds the others' weights unchanged (grow one with model.train_only to share it)")  # fmt: skip


def export_controlnet(out: str | Path, *, run: str | Path) -> Path:
    """Add a ``controlnet`` task run's ControlNet (EMA weights) to the SD3 model folder ``out`` as
    ``controlnet.safetensors``; ``model.json`` records it, and ``t2i generate --model out --control ...`` uses it."""
    out = Path(out)
    spec = read_model_json(out)
    if spec.get("kind") != "sd3":
        raise ValueError(f"{out} is a {spec.get('kind')!r} model folder; ControlNets go into sd3 folders")
    net, cfg, rec = _run_part(run, "sd3_controlnet")
    base = Path(cfg.get("task", {}).get("params", {}).get("base") or "")
    if base.name and base.resolve() != out.resolve():
        print(f"note: {run} was trained on {base}, and is added to {out}; its transformer must be the same")
    t = load_model_file(component_file(out, spec, "transformer"))[0].cfg
    if (net.cfg.hidden_size, net.cfg.patch_size, net.cfg.in_channels) != (t.hidden_size, t.patch_size, t.in_channels):
        raise ValueError(f"the ControlNet of {run} does not fit {out}'s transformer; train it on that model")
    save_model_file(out / "controlnet.safetensors", "sd3_controlnet", net)
    rec["control_type"] = net.cfg.control_type
    spec.pop("format", None)
    spec.setdefault("training", {})["controlnet"] = rec
    write_model_json(out, spec)
    return out
