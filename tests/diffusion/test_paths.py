import math

import pytest
import torch

from t2i.diffusion import RectifiedFlow, VPPath, append_dims

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [None, 10, 1000])
def test_vp_is_variance_preserving_and_monotone(schedule, T):
    path = VPPath(schedule, T)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-12)
    assert a[0] == 1 and s[0] == 0
    assert (a[1:] <= a[:-1]).all() and (s[1:] >= s[:-1]).all()
    assert torch.isfinite(path.log_snr(t[1:])).all()
    assert a[-1] < 0.1, "the path must end close to pure noise"


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_discrete_betas_are_valid_for_tiny_T(schedule):
    path = VPPath(schedule, 10)
    assert ((path.betas > 0) & (path.betas < 1)).all()
    assert path.betas.max() <= 0.999
    assert torch.isfinite(path.alphas_cumprod).all()


def test_discrete_schedules_match_diffusers():
    from diffusers import DDPMScheduler

    for ours, theirs in [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]:
        ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod.double()
        got = VPPath(ours, 1000).alphas_cumprod
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7), ours


def test_discrete_path_lattice_and_model_time():
    path = VPPath("linear", 1000)
    k = torch.tensor([1, 500, 1000])
    t = k.double() / 1000
    assert torch.allclose(path.alpha(t) ** 2, path.alphas_cumprod[k - 1])
    assert torch.allclose(path.model_time(t), (k - 1).double())
    # off-lattice times interpolate between their neighbours
    mid = path.log_alpha_bar(torch.tensor(0.5005, dtype=torch.float64))
    lo, hi = path.log_alpha_bar(0.5), path.log_alpha_bar(0.501)
    assert torch.isclose(mid, (lo + hi) / 2)
    assert torch.equal(
        path.quantize(torch.tensor([0.0001, 0.5, 0.50001, 1.0])), torch.tensor([1, 500, 501, 1000]) / 1000
    )


def test_continuous_linear_is_the_limit_of_discrete():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    # sum of log(1 - beta) vs the integral of beta: equal to first order in beta and dt
    cont, disc = VPPath("linear", None).log_alpha_bar(t), VPPath("linear", 1000).log_alpha_bar(t)
    assert torch.allclose(cont, disc, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 10, 50])
@pytest.mark.parametrize("offset", [0, 1])
def test_vp_timesteps_match_diffusers_spacings(spacing, steps, offset):
    from diffusers import DDIMScheduler

    if offset and spacing != "leading":
        pytest.skip("steps_offset only applies to leading spacing")
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    ts = VPPath("linear", 1000).timesteps(steps, spacing=spacing, steps_offset=offset)
    assert ts[-1] == 0 and len(ts) == steps + 1
    # diffusers' timesteps are 0-based step indices; ours are t = (index + 1) / T
    assert torch.equal(torch.round(ts[:-1] * 1000) - 1, sched.timesteps.double())


def test_vp_timesteps_errors():
    with pytest.raises(ValueError, match="steps <= 10"):
        VPPath("linear", 10).timesteps(11)
    with pytest.raises(ValueError, match="spacing"):
        VPPath("linear", 10).timesteps(4, spacing="bogus")
    with pytest.raises(ValueError, match="schedule"):
        VPPath("quadratic")


def test_flow_path_and_shift():
    path = RectifiedFlow(shift=3.0)
    t = torch.rand(20, dtype=torch.float64)
    assert torch.allclose(path.alpha(t), 1 - t) and torch.allclose(path.sigma(t), t)
    assert torch.allclose(path.shift_time(t), 3 * t / (1 + 2 * t))
    assert RectifiedFlow(shift=1.0).shift_time(t).equal(t)


def test_sd3_shift3_sigmas_match_published_values():
    ts = RectifiedFlow(shift=3.0).timesteps(4)
    assert torch.allclose(ts, torch.tensor([1.0, 0.857692, 0.602151, 0.008929, 0.0], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("steps", [4, 28, 40, 50])
def test_flow_sigmas_match_diffusers(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    ours = RectifiedFlow(shift=3.0).timesteps(steps)
    assert torch.allclose(ours.float(), sched.sigmas.float(), atol=1e-6)
    assert torch.allclose(RectifiedFlow(3.0).model_time(ours[:-1]).float(), sched.timesteps.float(), atol=1e-3)


def test_continuous_flow_grid():
    ts = RectifiedFlow(shift=1.0, num_train_timesteps=None).timesteps(4)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4, 4)])
def test_add_noise_any_rank(shape):
    path = VPPath("cosine", 1000)
    x0, eps = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    got = path.add_noise(x0, eps, t)
    a = append_dims(path.alpha(t), len(shape)).float()
    s = append_dims(path.sigma(t), len(shape)).float()
    assert torch.allclose(got, a * x0 + s * eps)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 3), 1)


def test_log_snr_clip_on_continuous_cosine():
    path = VPPath("cosine", None)
    assert math.isclose(float(path.log_snr(1.0)) * 2, -20.0, abs_tol=1e-6)
