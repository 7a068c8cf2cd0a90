"""The SD3 pipeline: sigma tables (spec §7.2 T7), 10-step CFG and CFG+SLG loops against diffusers'
``StableDiffusion3Pipeline`` with precomputed embeddings (T8), the img2img start step (T9), per-sample seeds,
presets, and an end-to-end text -> image run with tiny local components."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from t2i.models.mmdit import PRESETS as MMDIT_PRESETS
from t2i.models.mmdit import MMDiT
from t2i.models.text import SD3TextEncoder
from t2i.models.vae import PRESETS as VAE_PRESETS
from t2i.models.vae import AutoencoderKL
from t2i.pipelines.sd3 import PRESETS, SD3Pipeline, SD3Preset

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402
from sd3_helpers import clip_tokenizer, diffusers_twin, randomize_, t5_tokenizer, tiny_clip, tiny_t5  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    cfg = replace(MMDIT_PRESETS["tiny-x"], patch_size=2)
    model = randomize_(MMDiT(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    emb = {
        "context": torch.randn(2, 30, 32, generator=g),
        "pooled": torch.randn(2, 64, generator=g),
        "negative_context": torch.randn(2, 30, 32, generator=g),
        "negative_pooled": torch.randn(2, 64, generator=g),
    }
    return model, diffusers_twin(model), emb


@pytest.mark.parametrize("steps", [4, 28, 40, 50])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_sigma_tables_match_diffusers(steps, shift):
    ts = SD3Pipeline.schedule(None, steps, shift)[1]
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    torch.testing.assert_close(ts.float(), sched.sigmas.float(), atol=5e-7, rtol=0)
    if shift == 3.0:  # the spec's §5.2 table
        assert abs(float(ts[-2]) - 0.0089286) < 1e-6 and float(ts[-1]) == 0.0
    if shift == 3.0 and steps == 4:
        torch.testing.assert_close(ts[:3].float(), torch.tensor([1.0, 0.857692, 0.602151]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("slg", [False, True])
def test_ten_step_cfg_loop_matches_diffusers_pipeline(tiny, slg):
    model, ref, emb = tiny
    pipe = SD3Pipeline(model, preset=SD3Preset(steps=10, guidance=4.5, slg_scale=2.5 if slg else 0.0, slg_layers=(1,)))
    ours = pipe(**emb, seeds=[1, 2], height=96, width=64, output="latent")  # 12x8 latent: non-square
    noise = torch.stack([torch.randn(4, 12, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    dp = StableDiffusion3Pipeline(
        transformer=ref,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    dp.set_progress_bar_config(disable=True)
    extra = {"skip_guidance_layers": [1], "skip_layer_guidance_scale": 2.5} if slg else {}
    theirs = dp(
        prompt_embeds=emb["context"],
        pooled_prompt_embeds=emb["pooled"],
        negative_prompt_embeds=emb["negative_context"],
        negative_pooled_prompt_embeds=emb["negative_pooled"],
        latents=noise,
        height=96,
        width=64,
        num_inference_steps=10,
        guidance_scale=4.5,
        output_type="latent",
        **extra,
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # measured 2.6e-6 (CFG + SLG)


def test_guidance_interval_guides_only_inside_it(tiny):
    """Guidance over all of [0, 1] is plain CFG; an interval no step reaches is the conditional model alone (and runs
    no unconditional pass); a partial one skips the unconditional pass at the steps outside it."""
    model, _, emb = tiny
    kw = dict(**emb, seeds=[1, 2], height=64, width=32, output="latent")
    plain = SD3Pipeline(model, preset=SD3Preset(steps=6, guidance=4.5))(**kw)
    everywhere = SD3Pipeline(model, preset=SD3Preset(steps=6, guidance=4.5, guidance_interval=(0.0, 1.0)))(**kw)
    torch.testing.assert_close(everywhere, plain, atol=0, rtol=0)
    cond_only = SD3Pipeline(model, preset=SD3Preset(steps=6, guidance=1.0))(**kw)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        nowhere = SD3Pipeline(model, preset=SD3Preset(steps=6, guidance=4.5, guidance_interval=(0.0, 1e-6)))(**kw)
        assert calls == [2] * 6
        calls.clear()
        low = SD3Pipeline(model, preset=SD3Preset(steps=6, guidance=4.5, guidance_interval=(0.0, 0.8)))(**kw)
    finally:
        hook.remove()
    torch.testing.assert_close(nowhere, cond_only, atol=1e-6, rtol=0)
    ts = SD3Pipeline(model).schedule(6, 3.0)[1][:-1]
    assert calls == [4 if t <= 0.8 else 2 for t in ts.tolist()] and 2 in calls and 4 in calls
    assert not torch.allclose(low, plain) and not torch.allclose(low, cond_only)
    assert SD3Preset(guidance_interval=[0, 0.8]).guidance_interval == (0.0, 0.8)  # a JSON list, held as a tuple
    for bad in [(0.9, 0.8), (-0.1, 0.5), (0.0, 1.5), (0.5,), "0,1"]:
        with pytest.raises(ValueError, match="guidance_interval"):
            SD3Preset(guidance_interval=bad)


def test_per_sample_seeds_and_turbo_has_no_uncond_pass(tiny):
    model, _, emb = tiny
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe = SD3Pipeline(model, preset="sd3.5-large-turbo")
        both = pipe(context=emb["context"], pooled=emb["pooled"], seeds=[5, 6], height=64, width=32, output="latent")
        assert calls == [2] * 4  # 4 steps, conditional batch only
        one = pipe(context=emb["context"][1:], pooled=emb["pooled"][1:], seeds=[6], height=64, width=32,
                   output="latent")  # fmt: skip
    finally:
        hook.remove()
    torch.testing.assert_close(one, both[1:], atol=1e-5, rtol=0)  # image k does not depend on the batch


def test_presets_are_the_documented_defaults():
    assert (PRESETS["sd3.5-large-turbo"].steps, PRESETS["sd3.5-large-turbo"].guidance) == (4, 1.0)
    med = PRESETS["sd3.5-medium"]
    assert (med.steps, med.guidance, med.slg_scale, med.slg_layers, med.slg_window) == (
        40,
        4.5,
        2.5,
        (7, 8, 9),
        (0.01, 0.2),
    )
    assert all(p.shift == 3.0 for p in PRESETS.values())
    assert PRESETS["sd3.5-large-ref"].sampler == "dpmpp_2m_ve" and PRESETS["sd3.5-large"].steps == 28
    with pytest.raises(ValueError, match="unknown sampler"):
        SD3Preset(sampler="nope")


@pytest.mark.parametrize("steps, strength", [(40, 0.8), (28, 0.6), (10, 0.35), (4, 1.0)])
def test_img2img_start_step_matches_diffusers(steps, strength):
    from diffusers import StableDiffusion3Img2ImgPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    dummy = type("P", (), {"scheduler": sched})()
    timesteps, n = StableDiffusion3Img2ImgPipeline.get_timesteps(dummy, steps, strength, "cpu")
    ts = SD3Pipeline.schedule(None, steps, 3.0, strength)[1]
    assert len(ts) - 1 == n
    torch.testing.assert_close((ts[:-1] * 1000).float(), timesteps.float(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def full_pipe():
    torch.manual_seed(0)
    text = SD3TextEncoder(
        tiny_clip("quick_gelu", seed=1),
        tiny_clip("gelu", seed=2),
        tiny_t5(seed=3),
        tokenizer_l=clip_tokenizer(),
        tokenizer_g=clip_tokenizer(pad="!"),
        tokenizer_t5=t5_tokenizer(),
        t5_length=16,
    )
    cfg = replace(MMDIT_PRESETS["tiny-x"], context_dim=96, patch_size=2)
    vae = randomize_(AutoencoderKL(VAE_PRESETS["tiny2"])).eval()
    return SD3Pipeline(randomize_(MMDiT(cfg)).eval(), vae, text, preset=replace(PRESETS["sd3.5-medium"], steps=3))


def test_text_to_image_end_to_end(full_pipe):
    seen = []
    images = full_pipe(
        "a red cube", negative_prompt="blurry", seeds=[0, 1], height=32, width=48, slg_layers=(1,),
        callback=lambda d: seen.append(d["t"]),
    )  # fmt: skip
    assert len(images) == 2 and images[0].size == (48, 32)
    assert len(seen) == 3 and seen[0] == 1.0
    t = full_pipe(
        "a red cube", negative_prompt="blurry", seeds=[1], height=32, width=48, slg_layers=(1,), output="tensor"
    )
    assert t.shape == (1, 3, 32, 48) and t.min() >= 0 and t.max() <= 1
    expected = torch.from_numpy(np.asarray(images[1], dtype=np.float32)).permute(2, 0, 1) / 255
    assert (t[0] - expected).abs().max() <= 1 / 255 + 1e-6  # same seed, same image at batch size 1 and 2


def test_img2img_and_offload(full_pipe):
    init = torch.rand(1, 3, 32, 32)
    seen = []
    out = full_pipe(
        "a red cube", init_image=init, strength=0.5, steps=4, seeds=[3], height=32, width=32, output="tensor",
        slg_layers=(1,), callback=lambda d: seen.append(d["t"]),
    )  # fmt: skip
    assert out.shape == (1, 3, 32, 32)
    ts = full_pipe.schedule(4, 3.0, 0.5)[1]
    assert seen == [float(t) for t in ts[:-1]] and len(seen) == 2  # t_start = int(4 - 4 * 0.5) = 2
    offloaded = SD3Pipeline(full_pipe.transformer, full_pipe.vae, full_pipe.text_encoder,
                            preset=full_pipe.preset, device="cpu", offload=True)  # fmt: skip
    again = offloaded(
        "a red cube", init_image=init, strength=0.5, steps=4, seeds=[3], height=32, width=32, output="tensor",
        slg_layers=(1,),
    )  # fmt: skip
    torch.testing.assert_close(again, out)


def test_input_errors(full_pipe):
    with pytest.raises(ValueError, match="multiples of 4"):  # VAE factor 2 x patch 2 in this tiny pipeline
        full_pipe("x", height=30, width=32)
    with pytest.raises(ValueError, match="one seed per image"):
        full_pipe(["a", "b", "c"], seeds=[1, 2])
    with pytest.raises(ValueError, match="smaller image"):
        full_pipe("x", height=16 * 97, width=32, steps=1)
    with pytest.raises(TypeError):
        full_pipe("x", height=32, width=32, stepz=3)
