import pytest
import torch

from t2i.diffusion import (
    RectifiedFlow,
    SkipLayerGuidance,
    classifier_free_guidance,
    dynamic_threshold,
    step_interval_to_time,
)


class CountingDenoiser:
    """x0 = x * scale(cond) + shift; records every call's batch size and kwargs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, skip_layers=()):
        self.calls.append((x.shape[0], tuple(skip_layers)))
        out = x * context[:, :1] + t[:, None]
        if skip_layers:
            out = out - 0.5 * len(skip_layers)
        return out


def test_scale_one_is_the_identity():
    den = CountingDenoiser()
    assert classifier_free_guidance(den, 1.0, {"context": torch.zeros(1, 2)}) is den


def test_cfg_matches_the_formula_in_one_batched_call():
    den = CountingDenoiser()
    x, t = torch.randn(3, 4), torch.rand(3)
    cond, uncond = torch.full((3, 2), 2.0), torch.full((1, 2), 0.5)
    guided = classifier_free_guidance(den, 4.0, {"context": uncond})
    out = guided(x, t, context=cond)
    x0_c, x0_u = x * 2.0 + t[:, None], x * 0.5 + t[:, None]
    torch.testing.assert_close(out, x0_u + 4.0 * (x0_c - x0_u))
    assert den.calls == [(6, ())]


def test_guidance_interval_uses_cond_outside_and_skips_uncond_pass():
    den = CountingDenoiser()
    guided = classifier_free_guidance(den, 3.0, {"context": torch.zeros(1, 2)}, interval=(0.2, 0.6))
    x, cond = torch.randn(2, 4), torch.ones(2, 2)
    t = torch.tensor([0.1, 0.4])
    out = guided(x, t, context=cond)
    x0_c = x + t[:, None]
    x0_u = t[:, None].expand(2, 4)
    torch.testing.assert_close(out[0], x0_c[0])
    torch.testing.assert_close(out[1], (x0_u + 3 * (x0_c - x0_u))[1])
    den.calls.clear()
    guided(x, torch.tensor([0.9, 0.95]), context=cond)
    assert den.calls == [(2, ())]


def test_guidance_rescale_matches_the_conditional_std():
    den = CountingDenoiser()
    x, t = torch.randn(4, 64), torch.zeros(4)
    cond = torch.full((4, 2), 1.0)
    full = classifier_free_guidance(den, 7.0, {"context": -torch.ones(1, 2)}, rescale=1.0)(x, t, context=cond)
    torch.testing.assert_close(full.std(1), x.std(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rescale"):
        classifier_free_guidance(den, 7.0, {"context": cond}, rescale=2.0)


def test_skip_layer_guidance_formula_and_interval():
    den = CountingDenoiser()
    slg = SkipLayerGuidance(scale=2.5, layers=(7, 8, 9), interval=(0.0, 0.5))
    guided = classifier_free_guidance(den, 4.0, {"context": torch.zeros(1, 2)}, skip_layers=slg)
    x, cond = torch.randn(2, 3), torch.ones(2, 2)
    t = torch.tensor([0.3, 0.7])
    out = guided(x, t, context=cond)
    x0_c, x0_u = x + t[:, None], t[:, None].expand(2, 3)
    x0_skip = x0_c - 1.5
    expected = x0_u + 4.0 * (x0_c - x0_u)
    expected[0] += 2.5 * (x0_c - x0_skip)[0]
    torch.testing.assert_close(out, expected)
    assert den.calls == [(4, ()), (2, (7, 8, 9))]


def test_step_interval_matches_sd35_step_fractions():
    ts = RectifiedFlow(shift=3.0).timesteps(40)
    lo, hi = step_interval_to_time(ts, 0.01, 0.2)
    active = [i for i in range(40) if lo <= float(ts[i]) <= hi]
    assert active == [i for i in range(40) if 0.4 < i < 8]  # the reference: start*steps < i < end*steps
    assert step_interval_to_time(ts, 0.5, 0.5) == (2.0, 2.0)


def test_uncond_keys_must_exist_in_cond():
    guided = classifier_free_guidance(CountingDenoiser(), 2.0, {"ctx": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="uncond has keys"):
        guided(torch.randn(1, 2), torch.zeros(1), context=torch.ones(1, 2))


def test_dynamic_thresholding():
    den = lambda x, t: x  # noqa: E731
    x = torch.cat([torch.linspace(-3, 3, 1000)[None], torch.linspace(-0.5, 0.5, 1000)[None]])
    out = dynamic_threshold(den, percentile=0.9)(x, torch.zeros(2))
    assert out.abs().max() <= 1.0 + 1e-6
    s = torch.quantile(x[0].abs(), 0.9)
    torch.testing.assert_close(out[0], x[0].clamp(-s, s) / s)
    torch.testing.assert_close(out[1], x[1])  # within [-1, 1]: s clamps to 1, untouched
