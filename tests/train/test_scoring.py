"""Scoring while training (``run.eval_every``): the shapes benchmark on the EMA weights at fixed steps and at the
end, logged with the loss and the training CPU-seconds (carried across resume), and the learning-curve PNG."""

from __future__ import annotations

import io

import pytest
from model_folders import tiny_sd3_folder

from t2i.shapes.specs import ALL_CATEGORIES
from t2i.train.config import load_config
from t2i.train.loop import Trainer
from t2i.train.report import plot_eval_curves, read_metrics

MMDIT = ("{depth: 2, num_heads: 2, head_dim: 8, patch_size: 2, in_channels: 4, context_dim: 32, pooled_dim: 32, "
         "pos_embed_max_size: 16, qk_norm: rms}")  # fmt: skip


def sd3_overrides(tmp_path, folder, **extra) -> list[str]:
    base = {
        "run.out_dir": str(tmp_path / "runs"), "run.name": "scored", "run.steps": 3, "run.progress": False,
        "run.threads": 1, "run.tensorboard": False, "run.log_every": 1, "run.num_samples": 0,
        "run.eval_every": 2, "run.eval_per_category": 1, "run.eval_steps": 2,
        "model.name": "mmdit", "model.params": MMDIT, "task.name": "sd3",
        "task.params.vae": str(folder / "vae.safetensors"), "task.params.text": str(folder / "clip.safetensors"),
        "task.params.latent_scale": 1.0, "task.params.latent_shift": 0.0, "task.params.guidance": 2.0,
        "data.source": "shapes", "data.image_size": 32, "data.batch_size": 4, "data.num_samples": 64,
        "ema.enabled": True, "ema.half_life": 100, "schedule.name": "constant",
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd3_folder(tmp_path_factory.mktemp("tiny_sd3"))


def _fit(cfg, **kw) -> tuple[Trainer, dict, str]:
    out = io.StringIO()
    trainer = Trainer(cfg, out=out, **kw)
    summary = trainer.fit()
    trainer.close()
    return trainer, summary, out.getvalue()


def test_scores_are_logged_with_loss_and_cpu_seconds(tmp_path, folder):
    trainer, summary, said = _fit(load_config(None, sd3_overrides(tmp_path, folder)))
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    scored = [r for r in records if "eval/overall" in r]
    assert [r["step"] for r in scored] == [2, 3]  # every eval_every steps, and the final weights
    for r in scored:
        assert "loss" in r  # the loss line and the scores line of a step are one record
        for c in ALL_CATEGORIES:
            assert 0.0 <= r[f"eval/{c}"] <= 1.0
        assert 0.0 <= r["eval/text_letters"] <= 1.0 and r["eval_seconds"] > 0
    cpu = [r["cpu_seconds"] for r in records]
    assert cpu == sorted(cpu) and cpu[0] > 0
    assert summary["scores"] == {k.removeprefix("eval/"): v for k, v in scored[-1].items() if k.startswith("eval/")}
    assert "eval step 2" in said and "score " in said  # the progress line shows the latest score
    from PIL import Image

    with Image.open(trainer.run_dir / "eval_curve.png") as img:
        assert img.size == (760, 420) and len(img.getcolors(maxcolors=10**6)) > 8  # one colour per category


def test_scoring_time_is_not_training_time(tmp_path, folder, monkeypatch):
    """CPU time spent scoring is excluded: a slow scorer does not move the training CPU-seconds."""
    import time

    from t2i.shapes import scoring

    real = scoring.evaluate_generator
    calls = []

    def slow_scorer(*args, **kwargs):
        t = time.process_time()
        while time.process_time() - t < 0.5:  # half a CPU-second of busy work inside the scorer
            pass
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "evaluate_generator", slow_scorer)
    cfg = load_config(None, sd3_overrides(tmp_path, folder, **{"run.eval_every": 1, "run.steps": 2}))
    trainer, summary, _ = _fit(cfg)
    assert len(calls) == 2
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    cpu = [r["cpu_seconds"] for r in records]
    assert cpu[1] - cpu[0] < 0.5  # one tiny training step, not the scorer's busy half second
    assert summary["cpu_seconds"] - cpu[1] < 0.5


def test_cpu_seconds_carry_across_resume(tmp_path, folder):
    cfg = load_config(None, sd3_overrides(tmp_path, folder, **{"run.eval_every": 0, "run.ckpt_every": 2}))
    first, _, _ = _fit(cfg)
    before = read_metrics(first.run_dir / "metrics.jsonl")[-1]["cpu_seconds"]  # step 3, saved with the checkpoint
    more = load_config(None, sd3_overrides(tmp_path, folder, **{"run.eval_every": 0, "run.steps": 5}))
    second, _, said = _fit(more, resume=True)
    assert "resumed from" in said
    after = [r["cpu_seconds"] for r in read_metrics(second.run_dir / "metrics.jsonl") if r["step"] > 3]
    assert len(after) == 2 and before < after[0] < after[1]  # counted on from the checkpoint's total, not from 0
    assert after[0] - before < 0.5  # one tiny step's worth, not the whole first run again


def test_tasks_that_cannot_draw_from_captions_refuse_eval_every(tiny_cfg):
    with pytest.raises(ValueError, match=r"run\.eval_every"):
        Trainer(tiny_cfg(**{"run.eval_every": 5}))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("run.eval_every", -1, "eval_every"), ("run.eval_split", "train", "eval_split"),
     ("run.eval_per_category", 0, "eval_per_category")],
)  # fmt: skip
def test_bad_scoring_settings_are_clear_errors(tmp_path, folder, key, value, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, sd3_overrides(tmp_path, folder, **{key: value}))


def test_eval_curve_png(tmp_path):
    from PIL import Image

    assert plot_eval_curves([{"step": 1, "loss": 1.0}], tmp_path / "none.png") is None
    records = [
        {"step": s, "cpu_seconds": 60.0 * s, "eval/overall": s / 10, "eval/position": s / 20} for s in range(1, 6)
    ]
    path = plot_eval_curves(records, tmp_path / "curve.png", title="run")
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        colours = {c for _, c in rgb.getcolors(maxcolors=10**6)}
    assert (148, 103, 189) in colours and (0, 0, 0) in colours  # the position series and the overall line


def _distill_overrides(tmp_path, folder, *extra: str) -> list[str]:
    """A consistency student of the tiny folder's transformer, on the sd3 task with the folder's encoders."""
    mmdit = MMDIT.replace("qk_norm: rms}", "qk_norm: rms, pos_embed_base_size: 8, x_block_self_attn_layers: [0]}")
    base = (f"{{vae: {folder / 'vae.safetensors'}, text: {folder / 'clip.safetensors'}, latent_scale: 1.0, "
            "latent_shift: 0.0, guidance: 2.0, shift: 1.0}")  # fmt: skip
    params = (f"task.params={{method: consistency, teacher: {folder / 'transformer.safetensors'}, base_task: sd3, "
              f"base_params: {base}, student_steps: 2, teacher_steps: 4}}")  # fmt: skip
    run = {"run.steps": 2, "model.params": mmdit, "task.name": "distill"}
    sd3 = [o for o in sd3_overrides(tmp_path, folder, **run) if not o.startswith("task.params.")]
    return [*sd3, params, *extra]


def test_a_distilled_student_is_scored_as_it_samples(tmp_path, folder):
    """A distillation run on the sd3 task scores its student while it trains, as the student samples: its few steps
    whatever run.eval_steps says, each on the batch alone (no CFG), with its sampler (task.params.student_sampler)."""
    import torch

    from t2i.train.tasks import build_task

    trainer, summary, _ = _fit(load_config(None, _distill_overrides(tmp_path, folder)))
    scored = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "eval/overall" in r]
    assert [r["step"] for r in scored] == [2] and summary["scores"]["overall"] == scored[0]["eval/overall"]
    assert (trainer.run_dir / "eval_curve.png").exists()

    images = {}
    for sampler in ("consistency", "euler"):
        cfg = load_config(None, _distill_overrides(tmp_path, folder, f"task.params.student_sampler={sampler}"))
        task = build_task(cfg)
        model = task.build_model()
        calls = []
        model.student.register_forward_hook(lambda m, args, out, calls=calls: calls.append(args[0].shape[0]))
        fn = task.caption_sampler(model, steps=28, device=torch.device("cpu"))
        images[sampler] = fn(["a red circle", 'the word "CAT"'], [0, 1])
        assert images[sampler].shape == (2, 3, 32, 32) and calls == [2, 2]  # student_steps calls, batch alone
        assert (task.base.params.guidance, task.base.params.sampler) == (2.0, "euler")  # restored afterwards
    assert not torch.equal(images["consistency"], images["euler"])  # the sampler asked for is the one used
    with pytest.raises(ValueError, match=r"unknown task\.params\.student_sampler 'fast' \(choose one of: consistency"):
        build_task(load_config(None, _distill_overrides(tmp_path, folder, "task.params.student_sampler=fast")))


def test_the_exported_learning_curve_spans_the_stages_a_run_started_from(tmp_path, folder, monkeypatch):
    """A curriculum's curve: the scores of a run that started from another's weights (model.init_from: its CPU count
    starts again) and of one that continued it (--resume-from: its count carries on), after the first stage's, on
    one axis of training CPU-seconds from the first stage's start."""
    from t2i.train import export

    def stage(name, **extra):
        over = {"run.name": name, "run.eval_every": 1, "run.steps": 2, "run.ckpt_every": 1, **extra}
        return load_config(None, sd3_overrides(tmp_path, folder, **over))

    first, _, _ = _fit(stage("first"))
    ckpt = first.run_dir / "checkpoints" / "step_00000002"
    second, _, _ = _fit(stage("second", **{"model.init_from": str(ckpt / "ema.safetensors")}))
    third, _, _ = _fit(stage("third", **{"run.steps": 4}), resume=str(second.run_dir / "checkpoints/step_00000002"))

    drawn = {}
    monkeypatch.setattr(
        export, "plot_eval_curves", lambda records, path, title: drawn.update(r=records, t=title) or path
    )
    assert export._learning_curve(third.run_dir, 3, tmp_path / "curve.png")  # up to the exported step
    cpu = {n: {r["step"]: r["cpu_seconds"] for r in read_metrics(t.run_dir / "metrics.jsonl") if "eval/overall" in r}
           for n, t in (("first", first), ("second", second), ("third", third))}  # fmt: skip
    end_first = read_metrics(first.run_dir / "metrics.jsonl")[-1]["cpu_seconds"]
    want = [cpu["first"][1], cpu["first"][2], end_first + cpu["second"][1], end_first + cpu["second"][2],
            end_first + cpu["third"][3]]  # fmt: skip
    assert [r["step"] for r in drawn["r"]] == [1, 2, 1, 2, 3] and drawn["t"] == "first -> second -> third"
    assert [r["cpu_seconds"] for r in drawn["r"]] == pytest.approx(want)
    assert want == sorted(want)
    monkeypatch.undo()
    assert export._learning_curve(third.run_dir, 4, tmp_path / "curve.png") and (tmp_path / "curve.png").is_file()
