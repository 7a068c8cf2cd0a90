"""Samplers against closed-form answers: Gaussian and Gaussian-mixture data with the exact denoiser."""

import math

import pytest
import torch

from t2i.diffusion import (
    SAMPLERS,
    FlowDenoiser,
    RectifiedFlow,
    Seeds,
    VPPath,
    get_sampler,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
)
from t2i.diffusion.analytic import GaussianMixture

PATHS = {
    "vp-linear-1000": VPPath("linear", 1000),
    "vp-cosine-cont": VPPath("cosine", None),
    "flow-shift3": RectifiedFlow(shift=3.0),
}
GAUSS = GaussianMixture(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.5, 0.8]]))
MIXTURE = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([0.4, 0.6]), torch.tensor([0.3, 0.7]))
# enough steps that each sampler's discretisation bias is well inside the tolerances below
STEPS = {
    "ddpm": 400,
    "euler_ancestral": 400,
    "ddim": 200,
    "euler": 200,
    "heun": 50,
    "dpmpp_2m": 100,
    "dpmpp_2m_sde": 200,
}


def _noise(n, seed=0, dim=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _lambda_grid(path, n, lo=-3.0, hi=3.0):
    """n steps uniform in lambda = log(alpha/sigma), mapped back to t by bisection (any monotone path)."""
    lam = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
    a, b = torch.zeros_like(lam), torch.ones_like(lam)
    for _ in range(80):
        mid = (a + b) / 2
        too_noisy = path.log_snr(mid) < lam  # lambda decreases with t
        b = torch.where(too_noisy, mid, b)
        a = torch.where(too_noisy, a, mid)
    return (a + b) / 2


# samplers of the probability-flow ODE / SDE: exact in the limit with the exact posterior-mean denoiser. The
# consistency sampler needs the exact ODE map instead (test_consistency_sampler_with_the_exact_ode_map).
# dpmpp_2m_ve reproduces the sd3.5 reference's VE-form update, which is not the flow ODE's solver (see its own test)
SOLVERS = [n for n in SAMPLERS if n not in ("consistency", "dpmpp_2m_ve")]


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("name", SOLVERS)
def test_gaussian_moments(name, path_name):
    path = PATHS[path_name]
    x = _noise(4000) * path.sigma(1.0).item()
    out = sample(
        name, GAUSS.denoiser(path), x, path.timesteps(STEPS[name]), path, noise=torch.Generator().manual_seed(1)
    )
    assert out.shape == x.shape and out.dtype == torch.float32
    # standard errors: mean 0.8/sqrt(4000) = 0.013, std about 1.1 % of the std
    assert torch.allclose(out.mean(0), GAUSS.means[0].float(), atol=0.05), out.mean(0)
    cov = torch.cov(out.T)
    assert torch.allclose(cov.diagonal().sqrt(), GAUSS.stds[0].float(), rtol=0.06), cov
    assert abs(cov[0, 1]) < 0.03, cov  # independent coordinates stay uncorrelated (standard error 0.006)


@pytest.mark.parametrize("path_name", ["vp-linear-1000", "flow-shift3"])
@pytest.mark.parametrize("name", SOLVERS)
def test_mixture_weights_and_modes(name, path_name):
    path = PATHS[path_name]
    out = sample(
        name,
        MIXTURE.denoiser(path),
        _noise(4000),
        path.timesteps(STEPS[name]),
        path,
        noise=torch.Generator().manual_seed(2),
    )
    comp = MIXTURE.component_of(out)
    frac = comp.float().mean().item()
    assert abs(frac - 0.7) < 0.03, frac  # standard error 0.007
    for k in (0, 1):
        sel = out[comp == k]
        assert torch.allclose(sel.mean(0), MIXTURE.means[k].float(), atol=0.06)
        assert torch.allclose(sel.std(0), MIXTURE.stds[k].float(), rtol=0.1)


def _ode_errors(name, path, ns):
    x = _noise(256, seed=3)
    errs = []
    for n in ns:
        ts = _lambda_grid(path, n)
        exact = GAUSS.ode_solution(x * path.sigma(ts[0]).item(), float(ts[0]), float(ts[-1]), path)
        out = get_sampler(name)(GAUSS.denoiser(path), x * path.sigma(ts[0]).item(), ts, path)
        errs.append((out - exact).abs().max().item())
    return errs


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(("name", "order"), [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order(name, order, path_name):
    errs = _ode_errors(name, PATHS[path_name], [10, 20, 40, 80])
    observed = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert abs(observed[-1] - order) < 0.3, (errs, observed)
    assert errs[-1] < (6e-2 if order == 1 else 3e-3)


@pytest.mark.parametrize("path_name", PATHS)
def test_ddim_eta0_solves_the_probability_flow_ode(path_name):
    path = PATHS[path_name]
    ts = path.timesteps(1000)[:-1]  # stop at the last positive time, where the exact map is finite
    x = _noise(512, seed=4) * path.sigma(ts[0]).item()
    exact = GAUSS.ode_solution(x, float(ts[0]), float(ts[-1]), path)
    out = sample_ddim(GAUSS.denoiser(path), x, ts, path)
    assert (out - exact).abs().max() < 1e-2


@pytest.mark.parametrize("path_name", PATHS)
def test_euler_equals_ddim_eta0(path_name):
    path = PATHS[path_name]
    x, ts, den = _noise(64), path.timesteps(13), MIXTURE.denoiser(path)
    torch.testing.assert_close(sample_euler(den, x, ts, path), sample_ddim(den, x, ts, path), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_euler_ancestral_equals_ddim_with_eta(path_name, eta):
    path = PATHS[path_name]
    x, ts, den = _noise(64), path.timesteps(9), MIXTURE.denoiser(path)
    a = sample_euler_ancestral(den, x, ts, path, eta=eta, noise=torch.Generator().manual_seed(5))
    b = sample_ddim(den, x, ts, path, eta=eta, noise=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("path_name", PATHS)
def test_ddpm_equals_ddim_eta1(path_name):
    path = PATHS[path_name]
    x, ts, den = _noise(64), path.timesteps(9), MIXTURE.denoiser(path)
    a = sample_ddpm(den, x, ts, path, noise=torch.Generator().manual_seed(6))
    b = sample_ddim(den, x, ts, path, eta=1.0, noise=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_ddpm_large_variance_differs_and_is_wider():
    path = PATHS["vp-linear-1000"]
    x, ts, den = _noise(4000), path.timesteps(20), GAUSS.denoiser(path)
    small = sample_ddpm(den, x, ts, path, noise=torch.Generator().manual_seed(7))
    large = sample_ddpm(den, x, ts, path, variance="large", noise=torch.Generator().manual_seed(7))
    assert (large.std(0) > small.std(0)).all()
    with pytest.raises(ValueError, match="variance"):
        sample_ddpm(den, x, ts, path, variance="huge")


def test_dpmpp_2m_sde_with_eta0_is_dpmpp_2m():
    path = PATHS["flow-shift3"]
    x, ts, den = _noise(64), path.timesteps(12), MIXTURE.denoiser(path)
    torch.testing.assert_close(
        sample_dpmpp_2m_sde(den, x, ts, path, eta=0.0), sample_dpmpp_2m(den, x, ts, path), atol=1e-5, rtol=1e-5
    )


def test_flow_euler_is_x_plus_dt_v():
    path = RectifiedFlow(shift=3.0)
    weight = torch.randn(4, 4)

    def velocity_net(x, timestep):
        return x @ weight + timestep[:, None] / 1000

    x = torch.randn(5, 4)
    ts = path.timesteps(6)
    out = sample_euler(FlowDenoiser(velocity_net, path), x, ts[:2], path)
    t = ts[0].float().expand(5)
    expected = x + float(ts[1] - ts[0]) * velocity_net(x, t * 1000)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.stochastic])
def test_per_sample_seeds_do_not_depend_on_batch(name):
    path = PATHS["flow-shift3"]
    den, ts = MIXTURE.denoiser(path), path.timesteps(8)
    batch = sample(name, den, Seeds([10, 11, 12, 13]).randn((4, 2)), ts, path, noise=Seeds([10, 11, 12, 13]))
    alone = sample(name, den, Seeds([12]).randn((1, 2)), ts, path, noise=Seeds([12]))
    torch.testing.assert_close(batch[2:3], alone, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(batch[1], batch[2])


@pytest.mark.parametrize("name", SAMPLERS)
def test_nfe_callback_and_progress(name):
    path = PATHS["vp-linear-1000"]
    ts = path.timesteps(5)
    calls, seen = [], []

    def den(x, t, **cond):
        calls.append(t)
        assert cond == {"label": "dog"} and t.shape == (3,)
        return MIXTURE.denoiser(path)(x, t)

    sample(name, den, _noise(3), ts, path, extra_args={"label": "dog"}, callback=seen.append, progress=True)
    assert len(calls) == SAMPLERS[name].nfe(ts)
    assert [d["i"] for d in seen] == list(range(5))
    assert set(seen[0]) == {"x", "i", "t", "denoised"} and seen[0]["t"] == 1.0


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("path_name", ["vp-cosine-cont", "flow-shift3"])
def test_consistency_sampler_with_the_exact_ode_map(steps, path_name):
    """A perfect consistency model (the exact ODE map to t=0) samples exactly in any number of steps."""
    path = PATHS[path_name]

    def consistency_fn(x, t, **_):
        return GAUSS.ode_solution(x, float(t[0]), 0.0, path)

    ts = path.timesteps(steps)
    x = _noise(4000) * path.sigma(ts[0]).item() + GAUSS.means[0].float() * path.alpha(ts[0]).item()
    out = sample("consistency", consistency_fn, x, ts, path, noise=torch.Generator().manual_seed(4))
    assert torch.allclose(out.mean(0), GAUSS.means[0].float(), atol=0.05), out.mean(0)
    assert torch.allclose(out.std(0), GAUSS.stds[0].float(), rtol=0.06), out.std(0)


def test_bad_inputs_give_clear_errors():
    path = PATHS["vp-linear-1000"]
    den = GAUSS.denoiser(path)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        get_sampler("dpm")
    with pytest.raises(ValueError, match="non-increasing"):
        sample_euler(den, _noise(2), torch.tensor([0.1, 0.5, 0.0]), path)
    with pytest.raises(ValueError, match="1-D grid"):
        sample_euler(den, _noise(2), torch.tensor([1.0]), path)


def test_samplers_work_on_image_shaped_tensors():
    path = PATHS["flow-shift3"]
    g = GaussianMixture(torch.zeros(1, 3 * 4 * 4), torch.full((1,), 0.5))

    def den(x, t):
        return g.denoiser(path)(x.flatten(1), t).view_as(x)

    for name in SAMPLERS:
        out = sample(name, den, torch.randn(2, 3, 4, 4), path.timesteps(4), path)
        assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()


def test_dpmpp_2m_ve_is_the_reference_recurrence_and_differs_from_dpmpp_2m():
    """The sd3.5 reference's DPM++(2M): k-diffusion's VE-form multistep in t = -log(sigma) on the flow sigmas,
    written here in its exponential form (sigma(t) = exp(-t), first order on the first and the final step)."""
    from t2i.diffusion import sample_dpmpp_2m, sample_dpmpp_2m_ve

    path = PATHS["flow-shift3"]
    den = MIXTURE.denoiser(path)
    x = _noise(64, seed=3) * path.sigma(1.0).item()
    ts = path.timesteps(8)
    sig = path.sigma(ts).double()
    ref, old = x.double(), None
    for i in range(len(ts) - 1):
        d = den(ref.float(), ts[i].expand(64)).double()
        if sig[i + 1] == 0:
            ref = d
            continue
        t, t_next = -sig[i].log(), -sig[i + 1].log()
        h = t_next - t
        dd = d
        if old is not None:
            r = (t - (-sig[i - 1].log())) / h
            dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        ref = (torch.exp(-t_next) / torch.exp(-t)) * ref - torch.expm1(-h) * dd
        old = d
    ours = sample_dpmpp_2m_ve(den, x, ts, path)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    flow = sample_dpmpp_2m(den, x, ts, path)
    assert (ours - flow).norm() / flow.norm() > 0.05  # not the flow-correct solver: the preset must say which


def test_check_sampling_setting_names_the_setting_as_the_caller_calls_it():
    from t2i.diffusion import check_sampling_setting

    assert check_sampling_setting("steps", 8) == 8 and check_sampling_setting("guidance", 0) == 0
    assert check_sampling_setting("sampler", "ddim") == "ddim" and check_sampling_setting("candidates", 2) == 2
    for key, bad, message in (
        ("steps", 0, "--prior-steps must be a whole number >= 1, got 0"),
        ("steps", 2.5, "--prior-steps must be a whole number >= 1, got 2.5"),
        ("candidates", True, "--prior-candidates must be a whole number >= 1, got True"),
        ("guidance", -1.0, "--prior-guidance must be a finite number >= 0"),
        ("guidance", float("inf"), "--prior-guidance must be a finite number >= 0"),
        ("guidance", "3", "--prior-guidance must be a finite number >= 0"),
        ("sampler", "eulr", "unknown --prior-sampler 'eulr'; did you mean 'euler'?"),
    ):
        with pytest.raises(ValueError) as err:
            check_sampling_setting(key, bad, f"--prior-{key}")
        assert message in str(err.value)
    with pytest.raises(ValueError, match="'eta' is not a sampling setting"):
        check_sampling_setting("eta", 1.0)
