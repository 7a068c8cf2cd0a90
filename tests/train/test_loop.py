"""The generic loop: accumulation, precision, skipped steps, EMA on/off, checkpointing, determinism, outputs."""

from __future__ import annotations

import json

import pytest
import torch

from t2i.train.loop import Trainer


def _run(cfg, out, **kw) -> Trainer:
    trainer = Trainer(cfg, out=out, **kw)
    trainer.fit()
    trainer.close()
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_accumulation_equals_one_big_batch(tiny_cfg, quiet):
    # the accumulated gradient of 4 micro-batches is the gradient of the one batch of 8
    big = Trainer(tiny_cfg(**{"run.name": "big"}), out=quiet)
    acc = Trainer(tiny_cfg(**{"run.name": "acc", "optim.grad_accum": 4}), out=quiet)
    big.train_step()
    acc.train_step()
    for (name, p_big), p_acc in zip(big.model.named_parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(p_acc.grad, p_big.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert sum(p.grad.abs().sum() for p in big.model.parameters()) > 0
    # and whole runs agree; Adam's eps is raised because Adam turns fp rounding noise in near-zero gradients
    # (the zero-initialised output convs) into full-size steps, which no accumulation scheme can avoid
    init = _weights(Trainer(tiny_cfg(), out=quiet))
    w_big = _weights(_run(tiny_cfg(**{"run.name": "big2", "optim.eps": 1e-4}), quiet))
    w_acc = _weights(_run(tiny_cfg(**{"run.name": "acc2", "optim.eps": 1e-4, "optim.grad_accum": 4}), quiet))
    assert sum((w_big[k] - init[k]).abs().sum() for k in w_big) > 0.1  # the runs did train
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-4, atol=1e-5, msg=k)


def test_same_seed_same_weights_and_different_seed_differs(tiny_cfg, quiet):
    a = _weights(_run(tiny_cfg(**{"run.name": "a"}), quiet))
    b = _weights(_run(tiny_cfg(**{"run.name": "b"}), quiet))
    c = _weights(_run(tiny_cfg(**{"run.name": "c", "run.seed": 1}), quiet))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bf16_autocast_runs_and_matches_fp32_loosely(tiny_cfg, quiet):
    seen = {}
    fp32 = Trainer(tiny_cfg(**{"run.name": "fp32"}), out=quiet)
    bf16 = Trainer(tiny_cfg(**{"run.name": "bf16", "run.precision": "bf16"}), out=quiet)
    for name, tr in (("fp32", fp32), ("bf16", bf16)):
        tr.model.stem.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o.dtype) and None)
        tr.fit()
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}  # autocast only where the config asks
    for k, v in fp32.model.state_dict().items():
        assert v.dtype == bf16.model.state_dict()[k].dtype == torch.float32  # master weights stay fp32
    assert not bf16.model.stem.weight.is_contiguous(memory_format=torch.channels_last)  # opt-in: run.channels_last
    cl = Trainer(tiny_cfg(**{"run.name": "cl", "run.precision": "bf16", "run.channels_last": True}), out=quiet)
    assert cl.model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    w32, w16 = _weights(fp32), _weights(bf16)
    num = sum(((w32[k] - w16[k]) ** 2).sum() for k in w32)
    den = sum((w32[k] ** 2).sum() for k in w32)
    assert (num / den).sqrt() < 0.05


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_warns_and_keeps_the_config(tiny_cfg, quiet, monkeypatch, capsys, native):
    monkeypatch.setattr("t2i.train.loop.bf16_is_native", lambda device_type="cpu": native)
    tr = Trainer(tiny_cfg(**{"run.name": "bf16", "run.precision": "bf16"}), out=quiet)
    err = capsys.readouterr().err
    assert tr.cfg.run.precision == "bf16"  # the run's numerics stay its config's
    assert ("no native bf16 matmul" in err and "run.precision=fp32" in err) != native


def test_fp16_overflow_skips_step_schedule_and_ema(tiny_cfg, quiet):
    cfg = tiny_cfg(**{"run.precision": "fp16", "ema.enabled": True, "schedule.name": "linear", "run.steps": 3})
    tr = Trainer(cfg, out=quiet)
    real_loss = tr.task.loss
    calls = {"n": 0}

    def loss_with_overflow(model, batch):
        calls["n"] += 1
        out = real_loss(model, batch)
        return out * float("inf") if calls["n"] == 2 else out  # step 2 overflows

    tr.task.loss = loss_with_overflow
    tr.train_step()
    lr_after_one = tr.schedule.get_lr()
    before = _weights(tr)
    m = tr.train_step()
    assert m["skipped"] == 1.0 and tr.skipped_steps == 1
    assert tr.schedule.steps_taken == 1 and tr.schedule.get_lr() == lr_after_one
    assert tr.ema.num_updates == 1
    assert all(torch.equal(before[k], v) for k, v in _weights(tr).items())
    tr.train_step()
    assert tr.schedule.steps_taken == 2 and tr.step == 3


def test_nonfinite_grad_skips_step_in_fp32(tiny_cfg, quiet):
    tr = Trainer(tiny_cfg(), out=quiet)
    real_loss = tr.task.loss
    tr.task.loss = lambda model, batch: real_loss(model, batch) * float("nan")
    before = _weights(tr)
    assert tr.train_step()["skipped"] == 1.0
    assert tr.schedule.steps_taken == 0 and all(torch.equal(before[k], v) for k, v in _weights(tr).items())


def test_gradient_checkpointing_gives_same_training(tiny_cfg, quiet):
    plain = _weights(_run(tiny_cfg(**{"run.name": "plain", "run.steps": 2}), quiet))
    ckpt = _run(tiny_cfg(**{"run.name": "ckpt", "run.steps": 2, "model.grad_checkpointing": True}), quiet)
    assert ckpt.model.grad_checkpointing
    for k, v in _weights(ckpt).items():
        torch.testing.assert_close(v, plain[k], rtol=1e-5, atol=1e-6)


def test_compiled_training_matches_eager(tiny_cfg, quiet):
    """run.compile is a fast path: the same losses and weights as the plain module, and plain checkpoints."""
    plain = _run(tiny_cfg(**{"run.name": "plain", "run.steps": 2}), quiet)
    fast = _run(tiny_cfg(**{"run.name": "compiled", "run.steps": 2, "run.compile": True}), quiet)
    assert fast.train_model is not fast.model and hasattr(fast.train_model, "_orig_mod")
    for k, v in _weights(fast).items():  # same names as the plain run: no compiler prefix in what is saved
        torch.testing.assert_close(v, _weights(plain)[k], rtol=1e-3, atol=1e-4)  # fused kernels round differently
    losses = [[json.loads(x)["loss"] for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
              for t in (plain, fast)]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("ema", [False, True])
def test_outputs_with_and_without_ema(tiny_cfg, quiet, ema):
    cfg = tiny_cfg(**{"ema.enabled": ema, "ema.decay": 0.5, "run.sample_every": 2, "run.ckpt_every": 2})
    tr = Trainer(cfg, out=quiet)
    summary = tr.fit()
    run = tr.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(records[0])
    assert (run / "loss.png").exists() and (run / "samples" / "step_00000002.png").exists()
    assert summary["grid"].endswith("step_00000004.png")
    ckpt = run / "checkpoints" / "step_00000004"
    assert (ckpt / "ema.safetensors").exists() == ema
    if ema:  # the EMA differs from the model (decay 0.5 lags it) and was updated every step
        assert tr.ema.num_updates == 4
        assert not torch.equal(tr.ema.module.out.weight, tr.model.out.weight)


def test_vp_eps_task_with_ddim_samples(tiny_cfg, quiet):
    cfg = tiny_cfg(**{"task.params": "{path: vp, prediction: eps, sampler: ddim}", "run.steps": 2})
    tr = Trainer(cfg, out=quiet)
    tr.fit()
    images = tr.task.sample(tr.model, 4, seed=0, device=tr.device, steps=3)
    assert images.shape == (4, 3, 8, 8) and images.abs().max() <= 1
    again = tr.task.sample(tr.model, 4, seed=0, device=tr.device, steps=3)
    assert torch.equal(images, again)  # sample grids are seeded


def test_per_sample_noise_is_independent_of_batch_split(tiny_cfg, quiet):
    tr = Trainer(tiny_cfg(), out=quiet)
    batch = next(tr.batches)
    full = tr.task.loss(tr.model, batch)
    half = {k: v[:4] for k, v in batch.items() if k != "caption"}
    torch.testing.assert_close(tr.task.loss(tr.model, half), full[:4])


def test_metrics_mirror_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    from t2i.train.report import MetricsLog

    scalars = []

    class FakeWriter:  # tensorboard itself is optional and not a test dependency
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log(3, {"loss": 0.5, "lr": 1e-3, "note": "text", "bad": float("nan")})
    log.close()
    assert scalars == [("loss", 0.5, 3), ("lr", 1e-3, 3)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["note"] == "text"


def test_loss_curve_and_grid_pngs(tmp_path):
    from PIL import Image

    from t2i.train.report import plot_loss_curve, save_grid

    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 30)]
    path = plot_loss_curve(records, tmp_path / "loss.png")
    with Image.open(path) as img:
        assert img.size == (640, 400)
        assert len(img.getcolors(maxcolors=10**6)) > 3  # axes, labels and two curves were drawn
    assert plot_loss_curve(records[:1], tmp_path / "none.png") is None
    grid = save_grid(torch.zeros(5, 3, 4, 4), tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(grid) as img:  # 3 columns, 2 rows of 4 px images with 2 px padding, doubled
        assert img.size == (2 * (3 * 6 + 2), 2 * (2 * 6 + 2))


def test_deterministic_kernels_option(tiny_cfg, quiet):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        a = _weights(_run(tiny_cfg(**{"run.name": "det", "run.deterministic": True}), quiet))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
    b = _weights(_run(tiny_cfg(**{"run.name": "plain"}), quiet))
    assert all(torch.equal(a[k], b[k]) for k in a)  # CPU kernels are deterministic either way


def test_ema_settings_reach_the_ema(tiny_cfg, quiet):
    tr = Trainer(
        tiny_cfg(**{"ema.enabled": True, "ema.half_life": 300, "ema.warmup": False, "ema.update_every": 2}), out=quiet
    )
    assert tr.ema.half_life == 300 and tr.ema.warmup is False and tr.ema.samples_per_update == 8 * 2
    tr.fit()
    assert tr.ema.num_updates == 2  # 4 steps, one update every 2


def test_tiny_model_learns(tmp_path, quiet):
    # the smoke config itself, shortened: the loss must fall clearly, or the loop is not training anything
    from pathlib import Path

    from t2i.train.config import load_config
    from t2i.train.report import read_metrics

    root = Path(__file__).resolve().parents[2]
    over = [
        f"run.out_dir={tmp_path}",
        "run.progress=false",
        "run.tensorboard=false",
        "run.log_every=1",
        "run.sample_every=0",
        "run.ckpt_every=0",
        "run.num_samples=0",
        "run.steps=40",
    ]
    tr = Trainer(load_config(root / "configs" / "tiny" / "flow_rf.yaml", over), out=quiet)
    tr.fit()
    losses = [r["loss"] for r in read_metrics(tr.run_dir / "metrics.jsonl")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
