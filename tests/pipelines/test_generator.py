"""The generation seam: frozen Settings, Generator.settings validation, and generators of both families."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from model_folders import tiny_sd3_folder, tiny_unclip_folder

from t2i.pipelines.folders import load_generator
from t2i.pipelines.generator import SD3Generator, Settings, SettingsError, UnCLIPGenerator


def test_settings_are_frozen_hashable_and_round_trip():
    a = Settings(4, 3.0, "euler", 32, extra={"shift": 3.0, "slg_layers": [7, 8]})
    b = Settings.from_dict(a.to_dict())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1  # a batch key
    assert a.options == {"shift": 3.0, "slg_layers": (7, 8)} and a.cfg == 3.0
    assert json.loads(json.dumps(a.to_dict()))["slg_layers"] == [7, 8]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 5
    assert a.replace(extra={"shift": 1.0}).options == {"shift": 1.0, "slg_layers": (7, 8)}
    assert a.replace(negative="blurry") != a
    old = Settings.from_dict({"steps": 4, "cfg": 3.0, "sampler": "euler", "size": 32, "shift": 3.0})  # older folders
    assert old.guidance == 3.0 and old.options == {"shift": 3.0}


@pytest.fixture(scope="module")
def sd3_gen(tmp_path_factory):
    return load_generator(str(tiny_sd3_folder(tmp_path_factory.mktemp("sd3"))))


@pytest.fixture(scope="module")
def unclip_gen(tmp_path_factory):
    return load_generator(str(tiny_unclip_folder(tmp_path_factory.mktemp("unclip"))))


def test_sd3_folder_generates_deterministically_per_seed(sd3_gen):
    assert isinstance(sd3_gen, SD3Generator) and sd3_gen.name == "tiny-sd3"
    s = sd3_gen.defaults
    a = sd3_gen.generate(["a red circle", "a blue square"], [3, 4], s)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    b = sd3_gen.generate(["a blue square"], [4], s)  # same seed alone in its batch: same image
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)
    c = sd3_gen.generate(["a blue square"], [5], s)
    assert (c - b).abs().max() > 1e-3


def test_sd3_folder_presets_and_sizes(sd3_gen):
    fast = sd3_gen.presets()["fast"]
    assert fast.steps == 1 and fast.guidance == 1.0 and fast.cfg == 1.0  # the folder's older "cfg" key is read
    assert sd3_gen.settings("fast") == fast and sd3_gen.settings("fast", steps=2).steps == 2
    assert sd3_gen.settings(size=32).size == 32 and sd3_gen.settings(size=48).size == 48
    for bad in (30, 4, 1024):
        with pytest.raises(SettingsError, match="makes square images") as err:
            sd3_gen.settings(size=bad)
        assert err.value.field == "size"


def test_sd3_negative_prompt_changes_the_image(sd3_gen):
    s = sd3_gen.defaults
    a = sd3_gen.generate(["a red circle"], [0], s)
    b = sd3_gen.generate(["a red circle"], [0], sd3_gen.settings(negative="a blue square"))
    assert (a - b).abs().max() > 1e-4


def test_unclip_folder_generates_each_stage_size(unclip_gen):
    assert isinstance(unclip_gen, UnCLIPGenerator)
    s = unclip_gen.defaults
    full = unclip_gen.generate(["a red circle"], [1], s)
    assert full.shape == (1, 3, 32, 32)
    base = unclip_gen.generate(["a red circle"], [1], unclip_gen.settings(size=16))
    assert base.shape == (1, 3, 16, 16)
    again = unclip_gen.generate(["a red circle"], [1], s)
    torch.testing.assert_close(full, again)
    with pytest.raises(SettingsError, match="16 or 32 px"):
        unclip_gen.settings(size=64)
    with pytest.raises(SettingsError, match="negative prompt") as err:
        unclip_gen.settings(negative="blue")
    assert err.value.field == "negative"
    with pytest.raises(SettingsError, match="negative prompt"):  # a hand-made Settings is checked too
        unclip_gen.generate(["a red circle"], [1], s.replace(negative="blue"))


def test_settings_overrides_are_checked_and_name_their_field(sd3_gen):
    d = sd3_gen.defaults
    assert sd3_gen.settings() == d
    assert sd3_gen.settings(steps=None, guidance=None) == d  # a front end passes its unset fields straight through
    assert sd3_gen.settings(cfg=2.5).guidance == 2.5  # the old name still works
    assert sd3_gen.settings(extra={"shift": 2.0}).options["shift"] == 2.0
    cases = [({"steps": 0}, "steps"), ({"guidance": float("nan")}, "guidance"), ({"guidance": -1}, "guidance"),
             ({"sampler": "eular"}, "sampler"), ({"size": 31}, "size"), ({"colour": "red"}, "colour"),
             ({"cfg": 2.0, "guidance": 3.0}, "guidance"),
             # skip-layer guidance naming blocks this 2-block net lacks would skip nothing: refused
             ({"extra": {"slg_scale": 2.5}}, "slg_layers"),
             ({"extra": {"slg_scale": 2.5, "slg_layers": [2]}}, "slg_layers"),
             ({"extra": {"slg_scale": "much"}}, "slg_scale"),
             ({"extra": {"guidance_interval": [0.8, 0.2]}}, "guidance_interval"),
             ({"extra": {"guidance_interval": "early"}}, "guidance_interval")]  # fmt: skip
    for overrides, field in cases:
        with pytest.raises(SettingsError) as err:
            sd3_gen.settings(**overrides)
        assert err.value.field == field, overrides
    assert sd3_gen.settings(extra={"slg_scale": 2.5, "slg_layers": [1]}).options["slg_layers"] == (1,)
    with pytest.raises(SettingsError, match=r"has 2 MMDiT blocks; slg_layers must be block indices in 0\.\.1"):
        sd3_gen.settings(extra={"slg_scale": 2.5, "slg_layers": [0, 5]})
    assert sd3_gen.settings(extra={"guidance_interval": [0, 0.8]}).options["guidance_interval"] == (0, 0.8)
    with pytest.raises(SettingsError, match="did you mean 'euler'"):
        sd3_gen.settings(sampler="eular")
    with pytest.raises(SettingsError, match="unknown preset 'turbo'") as err:
        sd3_gen.settings("turbo")
    assert err.value.field == "preset"


def test_callbacks_count_every_sampler_step(sd3_gen, unclip_gen):
    for gen in (sd3_gen, unclip_gen):
        s = gen.defaults
        calls: list[tuple[int, int]] = []
        gen.generate(["a red circle"], [0], s, callback=lambda done, total, calls=calls: calls.append((done, total)))
        total = gen.total_steps(s)
        assert calls == [(k + 1, total) for k in range(total)], gen.kind


def test_requests_never_change_the_shared_pipeline(unclip_gen):
    """Per-call settings: a call with other steps, sampler and guidance leaves the next default call unchanged."""
    s = unclip_gen.defaults
    before = unclip_gen.generate(["a red circle"], [2], s)
    unclip_gen.generate(["a red circle"], [2], s.replace(steps=1, guidance=7.0, sampler="euler", size=16,
                                                         extra={"prior_steps": 1}))  # fmt: skip
    torch.testing.assert_close(unclip_gen.generate(["a red circle"], [2], s), before, rtol=0, atol=0)


def test_unclip_prior_and_upsamplers_keep_their_own_settings(unclip_gen, monkeypatch):
    """The base decoder's sampler, steps and guidance are the call's; the prior and the upsamplers sample with the
    folder's own settings (chosen for each part) unless the prior_* / upsampler_* options say otherwise."""
    seen: list[dict] = []
    pipe = unclip_gen.pipe
    prior_fn, decode_fn = pipe.image_embeds_from_text, pipe.decode

    def spy(fn):
        def call(*args, **kw):
            seen.append({k: kw[k] for k in ("steps", "sampler", "guidance", "candidates") if k in kw})
            return fn(*args, **kw)

        return call

    monkeypatch.setattr(pipe, "image_embeds_from_text", spy(prior_fn))
    monkeypatch.setattr(pipe, "decode", spy(decode_fn))
    prior = pipe.prior
    calls: list[tuple[int, int]] = []
    unclip_gen.generate(["a red circle"], [0], unclip_gen.settings(sampler="euler", steps=2, guidance=5.0),
                        callback=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert seen[-2] == {"steps": prior.steps, "sampler": prior.sampler, "guidance": prior.guidance,
                        "candidates": prior.num_candidates}  # fmt: skip
    assert seen[-1] == {"steps": [2, None], "sampler": ["euler", None], "guidance": [5.0, None]}  # upsampler: own
    assert calls[-1] == (prior.steps + 2 + pipe.stages[1].steps,) * 2
    s = unclip_gen.settings(extra={"prior_sampler": "ddpm", "prior_steps": 3, "prior_guidance": 1.0,
                                   "prior_candidates": 3, "upsampler_steps": 1,
                                   "upsampler_sampler": "euler"})  # fmt: skip
    calls.clear()
    a = unclip_gen.generate(["a red circle"], [0], s, callback=lambda done, total: calls.append((done, total)))
    assert seen[-2] == {"steps": 3, "sampler": "ddpm", "guidance": 1.0, "candidates": 3}
    assert seen[-1]["steps"] == [s.steps, 1] and seen[-1]["sampler"] == [s.sampler, "euler"]
    assert calls[-1] == (3 + s.steps + 1,) * 2
    torch.testing.assert_close(unclip_gen.generate(["a red circle"], [0], s), a, rtol=0, atol=0)
    for extra, field in (({"prior_sampler": "eulr"}, "prior_sampler"), ({"prior_steps": 0}, "prior_steps"),
                         ({"prior_steps": 2.5}, "prior_steps"), ({"prior_guidance": -1.0}, "prior_guidance"),
                         ({"prior_candidates": 0}, "prior_candidates"),
                         ({"prior_candidates": True}, "prior_candidates"),
                         ({"prior_guidance": float("nan")}, "prior_guidance"), ({"upsampler_steps": 0},
                         "upsampler_steps"), ({"upsampler_sampler": "magic"}, "upsampler_sampler")):  # fmt: skip
        with pytest.raises(SettingsError) as err:
            unclip_gen.settings(extra=extra)
        assert err.value.field == field


def test_sd3_edits_through_the_generator(sd3_gen, unclip_gen):
    s = sd3_gen.settings(steps=4, extra={"strength": 0.5})
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1
    calls: list[tuple[int, int]] = []
    img2img = sd3_gen.generate(["a red circle"], [0], s, init_images=init, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)] and sd3_gen.total_steps(s, edit=True) == 2  # the last half of 4 steps
    inpainted = sd3_gen.generate(["a red circle"], [0], s, init_images=init, masks=mask)
    assert img2img.shape == inpainted.shape == (1, 3, 32, 32) and (img2img - inpainted).abs().max() > 1e-4
    for bad, field in (
        ({"strength": 0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"mask_blur": -1}, "mask_blur"),
    ):
        with pytest.raises(SettingsError) as err:
            sd3_gen.settings(extra=bad)
        assert err.value.field == field
    with pytest.raises(SettingsError, match="does not edit images"):
        unclip_gen.generate(["a red circle"], [0], unclip_gen.defaults, init_images=init)
    with pytest.raises(SettingsError, match="needs the image to keep"):
        sd3_gen.generate(["a red circle"], [0], s, masks=mask)
