"""Few-step distillation tasks: consistency and adversarial (LADD), on flow and VP teachers."""

from __future__ import annotations

import pytest
import torch

from t2i.train.config import load_config
from t2i.train.data import build_dataset, collate
from t2i.train.tasks import build_task

BASE = {"flow": "{path: flow, cfg_dropout: 0.1, guidance: 2.0}", "vp": "{path: vp, cfg_dropout: 0.1, guidance: 2.0}"}


def _cfg(method: str, path: str, *extra: str):
    params = (
        f"task.params={{method: {method}, base_task: diffusion, base_params: {BASE[path]}, guidance: 2.0, "
        "student_steps: 2, teacher_steps: 8, feature_layers: [mid.0, dec.0], require_teacher: false}"
    )
    return load_config("configs/tiny/flow_rf.yaml", ["task.name=distill", params, "run.precision=fp32", *extra])


def _batch(cfg, n=8):
    ds = build_dataset(cfg.data, 0)
    return collate([{**ds[i], "id": i} for i in range(n)])


def _train_steps(task, model, batch, steps, lr=2e-3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(model, batch).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("path", ["flow", "vp"])
def test_consistency_distillation_lowers_its_loss(path):
    cfg = _cfg("consistency", path)
    task = build_task(cfg)
    model = task.build_model()
    assert len(model.heads) == 0 and not any(p.requires_grad for p in task.teacher.parameters())
    batch = _batch(cfg)
    first = task.loss(model, batch)
    assert first.shape == (8,) and torch.isfinite(first).all()
    torch.testing.assert_close(task.loss(model, batch), first)  # per-sample draws are seeded by the draw index
    losses = _train_steps(task, model, batch, 25)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


@pytest.mark.parametrize("path", ["flow", "vp"])
def test_adversarial_distillation_trains_student_and_heads(path):
    cfg = _cfg("adversarial", path)
    task = build_task(cfg)
    model = task.build_model()
    assert set(model.heads) == {"mid_0", "dec_0"}
    batch = _batch(cfg)
    loss = task.loss(model, batch)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    # (the last bias gets -1 + 1 = 0 from the two active hinge terms, so look at the weight matrices)
    assert all(p.grad.abs().sum() > 0 for p in model.heads.parameters() if p.ndim > 1)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())
    model.zero_grad()
    before = [p.detach().clone() for p in model.student.parameters()]
    _train_steps(task, model, batch, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.student.parameters(), strict=True))


def test_backward_simulation_feeds_the_student_its_own_sampler_state():
    """``backward_simulation: 1``: a sample drawn at step k of the student's grid is trained on what the student's
    consistency sampler reaches from that sample's pure noise after k calls (fresh noise per step), not on real data
    noised to grid[k]; step 0 stays pure noise. Off (the default), the input is the real data noised."""
    from t2i.data.transforms import sample_seed
    from t2i.diffusion.samplers import sample_consistency
    from t2i.nn.noise import Seeds
    from t2i.train.tasks.distill import SIMULATION_STREAM

    def graded_input(*extra):
        cfg = _cfg("adversarial", "flow", "task.params.student_steps=3", *extra)
        task = build_task(cfg)
        model = task.build_model()
        model.student.load_state_dict(plain_student)  # one student for both settings
        seen = []
        hook = model.student.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
        task.loss(model, batch)
        hook.remove()
        return task, model, seen

    cfg = _cfg("adversarial", "flow", "task.params.student_steps=3")
    batch = _batch(cfg)
    plain_student = build_task(cfg).build_model().student.state_dict()
    task, model, seen = graded_input("task.params.backward_simulation=1.0")
    _, _, plain_seen = graded_input()
    assert len(plain_seen) == 1  # without it the student runs once, on real data noised
    x0, cond, _ = task.base.distill_inputs(model.student, batch, torch.device("cpu"))
    u, eps, _ = task._draws(batch, x0, 3, torch.device("cpu"))
    grid = task.path.timesteps(3)
    k = (u[:, 0] * 3).long().clamp(max=2)
    assert set(k.tolist()) == {0, 1, 2}  # the batch covers every step
    got = seen[-1]  # the graded call comes after the no-grad simulation
    torch.testing.assert_close(got[k == 0], eps[k == 0])
    student = task._denoiser(model.student)
    for i in torch.nonzero(k > 0).squeeze(1).tolist():
        noise = Seeds([sample_seed(task.seed, int(batch["id"][i]), SIMULATION_STREAM)])  # the sample's own stream
        one = {name: v[i : i + 1] for name, v in cond.items()}
        with torch.no_grad():
            want = sample_consistency(student, eps[i : i + 1], grid[: int(k[i]) + 1], task.path, extra_args=one,
                                      noise=noise)  # fmt: skip
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[i], plain_seen[0][i])  # not the real data noised
    with pytest.raises(ValueError, match=r"backward_simulation is a share in \[0, 1\] for the adversarial"):
        build_task(_cfg("consistency", "flow", "task.params.backward_simulation=0.5"))


def test_generator_term_does_not_train_the_heads():
    cfg = _cfg("adversarial", "flow", "task.params.distill_weight=0")
    task = build_task(cfg)
    model = task.build_model()
    x0, cond, _ = task.base.distill_inputs(model.student, _batch(cfg), torch.device("cpu"))
    t = torch.full((8,), 0.5, dtype=torch.float64)
    frozen = {k: {n: p.detach() for n, p in h.named_parameters()} for k, h in model.heads.items()}
    x = x0.clone().requires_grad_(True)
    task._logits(model, task._features(x, t, cond), frozen).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # reaches the input through the frozen teacher
    assert all(p.grad is None for p in model.heads.parameters())


@pytest.mark.parametrize("target", ["renoised", "direct"])
def test_distillation_term_targets_the_guided_teacher(target):
    """With the hinge terms switched off (heads at zero), the loss is exactly the MSE to the chosen teacher x0:
    ADD's re-noised student sample (renoised) or the student's own input (direct)."""
    cfg = _cfg("adversarial", "flow", f"task.params.distill_target={target}", "task.params.distill_weight=1.0")
    task = build_task(cfg)
    model = task.build_model()
    for p in model.heads.parameters():
        torch.nn.init.zeros_(p)  # D = 0 everywhere: gen = 0 and each hinge term = 1
    calls = []
    teacher = task.teacher
    handle = teacher.register_forward_hook(lambda m, args, out: calls.append(args[0].detach().clone()))
    loss = task.loss(model, _batch(cfg))
    handle.remove()
    # teacher passes: the fake (features), the real (features), then the guided target (cond + uncond in one batch)
    assert len(calls) == 3 and calls[2].shape[0] == 16
    fake_d = calls[0]
    if target == "renoised":
        torch.testing.assert_close(calls[2][:8], fake_d.float())
    else:
        assert not torch.allclose(calls[2][:8], fake_d.float())
    assert torch.isfinite(loss).all() and (loss >= 2.0).all()  # 2 from the hinge terms, plus the MSE


def test_teacher_guides_only_inside_its_guidance_interval():
    """An interval no re-noised time reaches leaves the teacher's target unguided: one conditional pass, no uncond."""
    cfg = _cfg("adversarial", "flow", "task.params.guidance_interval=[0.0, 1.0e-9]")
    task = build_task(cfg)
    model = task.build_model()
    calls = []
    handle = task.teacher.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    task.loss(model, _batch(cfg))
    handle.remove()
    assert calls == [8, 8, 8]  # fake and real features, then the target from the conditional branch alone
    with pytest.raises(ValueError, match=r"task\.params\.guidance_interval must satisfy"):
        build_task(_cfg("adversarial", "flow", "task.params.guidance_interval=[0.9, 0.2]"))


def test_teacher_skip_layer_guidance_needs_an_mmdit_and_checks_its_settings():
    with pytest.raises(ValueError, match=r"slg_scale needs an MMDiT teacher \(base_task: sd3\)"):
        build_task(_cfg("adversarial", "flow", "task.params.slg_scale=2.5", "task.params.slg_layers=[0]"))
    assert build_task(_cfg("adversarial", "flow")).skip_layers is None  # off by default


def test_sd3_teacher_with_skip_layer_guidance(tmp_path):
    """``slg_scale``: the guided teacher adds scale * (cond - cond with the blocks skipped) inside ``slg_interval``,
    in one more teacher pass on the batch alone; outside it the target is plain CFG. Bad layers and intervals are
    refused before training."""
    from model_folders import TINY_MMDIT, train_tiny_sd3

    from t2i.diffusion import Denoiser

    teacher, vae, clip = train_tiny_sd3(tmp_path)
    base = (f"{{vae: {vae}, text: {clip}, latent_scale: 1.5, latent_shift: 0.1, shift: 1.0, drop_clip_l: 0.1, "
            "drop_clip_g: 0.0, drop_t5: 0.0, cache_text: false, cache_latents: false}")  # fmt: skip

    def cfg(*extra):
        params = (f"task.params={{method: adversarial, teacher: {teacher}, base_task: sd3, base_params: {base}, "
                  "student_steps: 2, feature_layers: [joint_blocks.0], guidance: 3.0}")  # fmt: skip
        return load_config("configs/default/sd3.yaml", ["task.name=distill", params, *TINY_MMDIT, "run.precision=fp32",
                                                        "run.threads=0", *extra])  # fmt: skip

    slg = ["task.params.slg_scale=2.0", "task.params.slg_layers=[0]", "task.params.slg_interval=[0.5, 1.0]"]
    task, plain = build_task(cfg(*slg)), build_task(cfg())
    task.build_model()
    torch.manual_seed(0)
    with torch.no_grad():  # two tiny training steps leave the zero-initialised block near the identity: perturb it
        for w in task.teacher.joint_blocks[0].parameters():
            w.add_(0.2 * torch.randn_like(w))
    plain.teacher = task.teacher  # the same teacher, guided without SLG
    x0, cond, uncond = task.base.distill_inputs(task.teacher, _batch(cfg(), 2), "cpu")
    x = torch.randn_like(x0)
    t = torch.tensor([0.9, 0.2])  # inside and outside the SLG interval
    calls = []
    handle = task.teacher.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        got = task._guided_teacher(uncond)(x, t, **cond)
    handle.remove()
    assert calls == [4, 2]  # cond + uncond in one batch, then the skip pass on the batch alone
    with torch.no_grad():
        want = plain._guided_teacher(uncond)(x, t, **cond)
        teacher_fn = Denoiser(task.teacher, task.path, task.prediction)
        x0_c, x0_skip = teacher_fn(x, t, **cond), teacher_fn(x, t, skip_layers=(0,), **cond)
    torch.testing.assert_close(got[1], want[1])  # t = 0.2: outside, plain CFG
    torch.testing.assert_close(got[0], want[0] + 2.0 * (x0_c[0] - x0_skip[0]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], want[0])
    with pytest.raises(ValueError, match=r"slg_layers \[7\]: the teacher has 1 MMDiT blocks"):
        build_task(cfg("task.params.slg_scale=2.0", "task.params.slg_layers=[7]")).build_model()
    with pytest.raises(ValueError, match=r"task\.params\.slg_interval must satisfy 0 <= low < high <= 1"):
        build_task(cfg(*slg[:2], "task.params.slg_interval=[0.9, 0.1]"))
    with pytest.raises(ValueError, match=r"and task\.params\.slg_layers, the blocks to skip"):
        build_task(cfg("task.params.slg_scale=2.0", "task.params.slg_layers=[]"))  # an MMDiT, but nothing to skip


def test_student_samples_with_the_requested_nfe_and_no_cfg():
    cfg = _cfg("consistency", "flow")
    task = build_task(cfg)
    model = task.build_model()
    calls = []
    model.student.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = task.sample(model, 4, seed=0, device=torch.device("cpu"))
    assert out.shape == (4, 3, 16, 16)
    assert calls == [4, 4]  # student_steps calls, each on the batch alone (no unconditional half)
    assert task.base.params.guidance == 2.0 and task.base.sampler_name == "euler"  # restored afterwards
    # an adversarial student samples with its base task's sampler (resolved by the path: euler on flow, ddim on vp)
    for path, sampler in (("flow", "euler"), ("vp", "ddim")):
        task = build_task(_cfg("adversarial", path))
        assert task.base.params.sampler is None and task.student_sampler == sampler
        assert task.sample(task.build_model(), 2, seed=0, device=torch.device("cpu")).shape == (2, 3, 16, 16)


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="method"):
        build_task(_cfg("progressive", "flow"))
    with pytest.raises(ValueError, match="feature_layers"):
        build_task(_cfg("adversarial", "flow", "task.params.feature_layers=[]"))
    with pytest.raises(ValueError, match="distill_target"):
        build_task(_cfg("adversarial", "flow", "task.params.distill_target=teacher"))
    with pytest.raises(ValueError, match="not modules of the teacher"):
        build_task(_cfg("adversarial", "flow", "task.params.feature_layers=[nope]")).build_model()
    cfg = load_config("configs/tiny/flow_rf.yaml", ["task.name=distill", "task.params={base_task: diffusion}"])
    with pytest.raises(ValueError, match=r"task\.params\.teacher"):
        build_task(cfg)


def test_end_to_end_from_a_teacher_run(tmp_path):
    """`t2i train` a teacher, distil it through the loop, and read the student back as a plain network."""
    from t2i.train.loop import train
    from t2i.train.trained import load_trained

    common = [f"run.out_dir={tmp_path}", "run.steps=2", "run.sample_every=0", "run.ckpt_every=0", "run.log_every=1"]
    train(load_config("configs/tiny/flow_rf.yaml", common))
    teacher = str(tmp_path / "tiny_flow_rf")
    params = (f"task.params={{method: consistency, base_task: diffusion, base_params: {BASE['flow']}, "
              f"teacher: {teacher}, student_steps: 2}}")  # fmt: skip
    cfg = load_config("configs/tiny/flow_rf.yaml", [*common, "task.name=distill", params, "run.name=student"])
    result = train(cfg)
    assert result["grid"] is not None
    student = load_trained(str(tmp_path / "student"), "toy_unet")
    teacher_net = load_trained(teacher, "toy_unet")
    assert student.state_dict().keys() == teacher_net.state_dict().keys()


def test_student_can_start_from_other_weights_than_the_teacher(tmp_path):
    """``student_init``: an adversarial run on top of an earlier student starts from that student's weights while
    the frozen teacher (the discriminator's feature extractor) keeps its own."""
    import copy

    from t2i.models.files import save_model_file

    teacher = build_task(_cfg("adversarial", "flow")).build_model().student
    earlier = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in earlier.parameters():
            p.normal_()
    other = earlier.state_dict()
    save_model_file(tmp_path / "t.safetensors", "toy_unet", teacher, dtype=None)
    save_model_file(tmp_path / "s.safetensors", "toy_unet", earlier, dtype=None)
    cfg = _cfg("adversarial", "flow", f"task.params.teacher={tmp_path / 't.safetensors'}",
               f"task.params.student_init={tmp_path / 's.safetensors'}")  # fmt: skip
    task = build_task(cfg)
    model = task.build_model()
    for k, v in model.student.state_dict().items():
        torch.testing.assert_close(v, other[k], rtol=0, atol=0, msg=k)
    for k, v in task.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher.state_dict()[k], rtol=0, atol=0, msg=k)
    assert all(p.requires_grad for p in model.student.parameters())
    assert not any(p.requires_grad for p in task.teacher.parameters())
    bad = _cfg("adversarial", "flow", f"task.params.student_init={tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="missing"):
        build_task(bad).build_model()


def test_sd3_student_exports_as_a_guidance_free_few_step_model(tmp_path):
    """An SD3 (flow MMDiT) teacher distilled adversarially, exported with a 2-step consistency preset: generating
    calls the transformer twice, on the batch alone."""
    from model_folders import TINY_MMDIT, train_default, train_tiny_sd3

    from t2i.pipelines.folders import load_generator
    from t2i.train.export import export_sd3

    teacher, vae, clip = train_tiny_sd3(tmp_path)
    base = (f"{{vae: {vae}, text: {clip}, latent_scale: 1.5, latent_shift: 0.1, shift: 1.0, drop_clip_l: 0.1, "
            "drop_clip_g: 0.0, drop_t5: 0.0, cache_text: false, cache_latents: false}")  # fmt: skip
    params = (f"task.params={{method: adversarial, teacher: {teacher}, base_task: sd3, base_params: {base}, "
              "student_steps: 2, feature_layers: [joint_blocks.0]}")  # fmt: skip
    student = train_default(tmp_path, "sd3", ["task.name=distill", params, *TINY_MMDIT, "data.batch_size=2",
                                              "run.name=student"])  # fmt: skip
    out = export_sd3(tmp_path / "turbo", transformer=student, vae=vae, clip=clip, name="turbo")
    gen = load_generator(str(out))
    d = gen.defaults
    assert (d.steps, d.guidance, d.sampler) == (2, 1.0, "euler")  # the student's preset: its steps, no CFG
    calls = []
    gen.pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    images = gen.generate(["a red circle", "a blue square", "a cross"], [0, 1, 2], gen.defaults)
    assert images.shape == (3, 3, 64, 64) and calls == [3, 3]
    # a second student started from the first one's exported file (student_init), by the other method: its record
    # and card count the first too, each stage under its own method
    import json

    from t2i.pipelines.model_card import card_text

    again = params.replace(
        "method: adversarial,", f"method: consistency, student_init: {out}/transformer.safetensors,"
    )
    second = train_default(tmp_path, "sd3", ["task.name=distill", again, *TINY_MMDIT, "data.batch_size=2",
                                             "run.name=student2"])  # fmt: skip
    out2 = export_sd3(tmp_path / "turbo2", transformer=second, vae=vae, clip=clip, name="turbo")
    first_rec = json.loads((out / "model.json").read_text())["training"]["transformer"]
    rec = json.loads((out2 / "model.json").read_text())["training"]["transformer"]
    assert rec["run"] == "student2" and rec["started_from"] == first_rec
    card = card_text(out2)
    assert "adversarial distillation (LADD-style) and then consistency distillation (LCM-style)" in card
    assert "| transformer, stage 1 | MMDiT-X student (adversarial distillation) |" in card
    assert "| transformer, stage 2 | MMDiT-X student (consistency distillation) |" in card
    # started from the first student's run checkpoint instead of its exported file: the earlier stage's record
    # comes from that run and still names its method
    first_ckpt = f"{student}/checkpoints/step_00000002/ema.safetensors"
    from_run = params.replace("method: adversarial,", f"method: consistency, student_init: {first_ckpt},")
    third = train_default(tmp_path, "sd3", ["task.name=distill", from_run, *TINY_MMDIT, "data.batch_size=2",
                                            "run.name=student3"])  # fmt: skip
    out3 = export_sd3(tmp_path / "turbo3", transformer=third, vae=vae, clip=clip, name="turbo")
    rec = json.loads((out3 / "model.json").read_text())["training"]["transformer"]
    assert rec["started_from"]["run"] == "student" and rec["started_from"]["distilled"] == first_rec["distilled"]
    assert rec["distilled"]["method"] == "consistency"
    assert "| transformer, stage 1 | MMDiT-X student (adversarial distillation) |" in card_text(out3)
