"""DDPM's transitions (t2i.diffusion.ddpm) against Ho et al.'s beta formulas, and the learned-variance contract:
``sample_ddpm(variance="learned")`` and how the denoiser wrappers pass a learned variance through."""

import math

import pytest
import torch

from t2i.diffusion import (
    Denoiser,
    Seeds,
    SelfConditioning,
    VPPath,
    classifier_free_guidance,
    ddpm_step,
    dynamic_threshold,
    forward_transition,
    sample_ddpm,
    static_threshold,
)

PATH = VPPath("linear", 1000)


def _coefficients(path, t, s):
    return [float(v) for v in (path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s))]


@pytest.mark.parametrize("k", [2, 37, 500, 999])
def test_posterior_matches_ho_et_al_on_consecutive_steps(k):
    """Eqs. 6-7 of Ho et al. 2020 in beta notation, on the discrete chain's own betas."""
    beta, ab_t, ab_s = float(PATH.betas[k - 1]), float(PATH.alphas_cumprod[k - 1]), float(PATH.alphas_cumprod[k - 2])
    coef_x0 = math.sqrt(ab_s) * beta / (1 - ab_t)
    coef_xt = math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
    beta_tilde = (1 - ab_s) / (1 - ab_t) * beta
    x, x0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    coeffs = _coefficients(PATH, k / 1000, (k - 1) / 1000)
    mean = coef_xt * x + coef_x0 * x0
    z = Seeds([4, 5, 6]).randn((3, 5), dtype=torch.float64)
    for variance, var in (("small", beta_tilde), ("large", beta)):
        out = ddpm_step(x, x0, *coeffs, variance=variance, noise=Seeds([4, 5, 6]))
        torch.testing.assert_close(out, mean + math.sqrt(var) * z, rtol=1e-9, atol=1e-9)
    # the learned variance exp(v log beta + (1 - v) log beta_tilde) (Nichol & Dhariwal 2021, Eq. 15), per element
    v = torch.rand(3, 5, dtype=torch.float64)
    out = ddpm_step(x, x0, *coeffs, variance=v, noise=Seeds([4, 5, 6]))
    std = torch.exp(0.5 * (v * math.log(beta) + (1 - v) * math.log(beta_tilde)))
    torch.testing.assert_close(out, mean + std * z, rtol=1e-6, atol=1e-6)  # v is applied in float32


def test_step_to_clean_data_is_the_mean_without_noise():
    x, x0 = torch.randn(2, 4), torch.randn(2, 4)
    a_t, s_t = float(PATH.alpha(0.01)), float(PATH.sigma(0.01))
    gen = torch.Generator().manual_seed(0)
    out = ddpm_step(x, x0, a_t, s_t, 1.0, 0.0, variance=torch.full_like(x, 0.5), noise=gen)
    torch.testing.assert_close(out, x0)  # the posterior mean at s = 0 is x0 itself
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # and no noise was drawn


def test_forward_transition_composes_with_the_path():
    """x_s = a_s x0 + s_s eps, then x_t = a_ts x_s + sqrt(v_ts) z has the path's alpha_t and sigma_t."""
    for t, s in [(0.9, 0.3), (0.5, 0.499), (1.0, 0.0)]:
        a_t, s_t, a_s, s_s = _coefficients(VPPath("cosine", None), t, s)
        a_ts, v_ts = forward_transition(a_t, s_t, a_s, s_s)
        assert math.isclose(a_ts * a_s, a_t, rel_tol=1e-12)
        assert math.isclose(a_ts**2 * s_s**2 + v_ts, s_t**2, rel_tol=1e-12)


def test_bad_variance_names():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(x, x, 0.5, 0.8, 0.9, 0.4, variance="medium")
    with pytest.raises(ValueError, match="variance must be one of"):
        sample_ddpm(lambda x, t: x, x, PATH.timesteps(2), PATH, variance="medium")
    with pytest.raises(ValueError, match="learned-variance network"):
        sample_ddpm(lambda x, t, **kw: x, x, PATH.timesteps(2), PATH, variance="learned")


class _VarianceNet(torch.nn.Module):
    """An eps-predicting stand-in with a learned-variance head; records the conditioning of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, return_variance=False, scale=None, self_cond=None):
        self.calls.append({"batch": len(x), "scale": scale, "self_cond": self_cond})
        eps = 0.3 * torch.tanh(x) * scale[:, None] + 0.001 * t[:, None]
        v = torch.sigmoid(x.sum(1, keepdim=True) * scale[:, None]).expand_as(x)
        return (eps, v) if return_variance else eps


def test_learned_variance_sampler_is_the_formula_step_by_step():
    net, path = _VarianceNet(), VPPath("cosine", 100)
    denoise, ts = Denoiser(net, path, "eps"), path.timesteps(4)
    x, cond = torch.randn(3, 6), {"scale": torch.ones(3)}
    out = sample_ddpm(denoise, x, ts, path, variance="learned", extra_args=cond, noise=Seeds([0, 1, 2]))
    ref, noise = x.clone(), Seeds([0, 1, 2])
    for i in range(len(ts) - 1):
        x0, v = denoise(ref, ts[i].expand(3), return_variance=True, **cond)
        ref = ddpm_step(ref, x0, *_coefficients(path, ts[i], ts[i + 1]), variance=v, noise=noise)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_guidance_with_learned_variance_is_two_calls_batched_into_one():
    net, path = _VarianceNet(), VPPath("cosine", 100)
    denoise = Denoiser(net, path, "eps")
    x, t = torch.randn(3, 6), torch.full((3,), 0.6)
    guided = classifier_free_guidance(denoise, 3.0, {"scale": torch.zeros(1)})
    x0, v = guided(x, t, scale=torch.ones(3), return_variance=True)
    assert [c["batch"] for c in net.calls] == [6]  # cond and uncond in one forward pass
    x0_c, v_c = denoise(x, t, scale=torch.ones(3), return_variance=True)
    x0_u, _ = denoise(x, t, scale=torch.zeros(3), return_variance=True)
    torch.testing.assert_close(x0, x0_u + 3.0 * (x0_c - x0_u))
    torch.testing.assert_close(v, v_c)  # the variance is the conditional branch's
    # without return_variance the same wrapper returns x0 alone
    torch.testing.assert_close(guided(x, t, scale=torch.ones(3)), x0)


def test_thresholds_and_self_conditioning_pass_the_variance_through():
    net, path = _VarianceNet(), VPPath("cosine", 100)
    x, t, cond = 4 * torch.randn(2, 6), torch.full((2,), 0.9), {"scale": torch.ones(2)}
    x0, v = Denoiser(net, path, "eps")(x, t, return_variance=True, **cond)
    for wrap, expect in ((static_threshold, x0.clamp(-1, 1)), (lambda d: dynamic_threshold(d, 0.9), None)):
        y0, y_v = wrap(Denoiser(net, path, "eps"))(x, t, return_variance=True, **cond)
        assert torch.equal(y_v, v) and y0.abs().max() <= 1
        if expect is not None:
            torch.testing.assert_close(y0, expect)
    sc = SelfConditioning(Denoiser(net, path, "eps"))
    first, _ = sc(x, t, return_variance=True, **cond)
    sc(x, t, return_variance=True, **cond)
    assert torch.equal(net.calls[-2]["self_cond"], torch.zeros_like(x))
    assert torch.equal(net.calls[-1]["self_cond"], first)  # the x0 estimate is fed back, not the (x0, v) pair
