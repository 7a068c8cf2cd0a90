"""Step-for-step equivalence of t2i's samplers with diffusers' schedulers on the same model and grid."""

import pytest
import torch

from t2i.diffusion import EpsDenoiser, FlowDenoiser, RectifiedFlow, VPPath, sample_ddim, sample_dpmpp_2m, sample_euler
from t2i.diffusion.analytic import GaussianMixture

diffusers = pytest.importorskip("diffusers")

MIXTURE = GaussianMixture(torch.tensor([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.2]]), torch.tensor([0.3, 0.5]))


def _eps_net(path: VPPath):
    """An eps-predicting network built from the exact denoiser; diffusers passes 0-based step indices."""
    exact = MIXTURE.denoiser(path)

    def net(x, timestep):
        t = (torch.as_tensor(timestep, dtype=torch.float64).round() + 1) / path.num_train_timesteps
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        a, s = path.alpha(t).float()[:, None], path.sigma(t).float()[:, None]
        return (x - a * exact(x, t)) / s

    return net


def _run_diffusers(scheduler, net, x, steps):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [5, 20])
def test_ddim_matches_diffusers(steps):
    from diffusers import DDIMScheduler

    path = VPPath("linear", 1000)
    net, x = _eps_net(path), torch.randn(16, 3)
    ref = _run_diffusers(
        DDIMScheduler(beta_schedule="linear", timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True),
        net,
        x,
        steps,
    )
    ours = sample_ddim(EpsDenoiser(net, path), x, path.timesteps(steps), path)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [5, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    path = VPPath("linear", 1000)
    net, x = _eps_net(path), torch.randn(16, 3)
    sched = DPMSolverMultistepScheduler(
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
    )
    ref = _run_diffusers(sched, net, x, steps)
    ours = sample_dpmpp_2m(EpsDenoiser(net, path), x, path.timesteps(steps), path)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [4, 28])
def test_flow_euler_matches_diffusers(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = RectifiedFlow(shift=3.0)
    exact = MIXTURE.denoiser(path)

    def velocity_net(x, timestep):  # diffusers passes sigma * 1000
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(x.shape[0]) / 1000
        return (x - exact(x, t)) / t.float()[:, None]

    x = torch.randn(16, 3)
    ref = _run_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), velocity_net, x, steps)
    ours = sample_euler(FlowDenoiser(velocity_net, path), x, path.timesteps(steps), path)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
