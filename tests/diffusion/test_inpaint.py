"""RePaint (t2i.diffusion.inpaint): the known region comes back exactly, resampling moves the generated region
toward the true conditional of Gaussian-mixture data, and the step sampler and its options are the core's."""

import math

import pytest
import torch

from t2i.diffusion import Denoiser, RectifiedFlow, Seeds, VPPath, get_sampler, sample_ddpm, sample_repaint
from t2i.diffusion.analytic import GaussianMixture

PATHS = {"vp-cosine-1000": VPPath("cosine", 1000), "flow-shift3": RectifiedFlow(shift=3.0)}


def _start(path, steps, shape, seed=0):
    ts = path.timesteps(steps)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(path.sigma(ts[0])), ts


def _smooth_denoiser(x, t, **_):
    """A stand-in x0-denoiser that mixes neighbouring pixels, so the unknown region depends on the known one."""
    return 0.5 * torch.tanh(x + torch.roll(x, 1, dims=-1))


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize("resample", [1, 3])
def test_known_region_is_exact_at_t0(path_name, sampler, resample):
    path = PATHS[path_name]
    x, ts = _start(path, 4, (2, 3, 6, 6))
    known = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :3] = 1
    out = sample_repaint(
        _smooth_denoiser, x, ts, path, known=known, mask=mask, resample=resample, step=get_sampler(sampler),
        noise=Seeds([3, 4]), paste_noise=Seeds([5, 6]),
    )  # fmt: skip
    keep = mask.bool().expand_as(known)
    assert torch.equal(out[keep], known[keep])  # pasted clean at the last step: exact, not approximate
    assert (out[~keep] - known[~keep]).abs().mean() > 0.1  # the hole was generated


def test_resampling_moves_the_hole_toward_the_true_conditional():
    """Data: two Gaussians at (-2, -2) and (2, 2), unit std. Given x1 = 0.5, component 2 has posterior weight
    p = sigmoid(4 x1), so E[x2 | x1] = 2 (2p - 1) = 1.52. Plain pasting (resample=1) loses most of that
    dependence; jumping back and forth harmonises the two coordinates, as RePaint's resampling is meant to."""
    mix = GaussianMixture(torch.tensor([[-2.0, -2.0], [2.0, 2.0]]), torch.tensor([1.0, 1.0]))
    path, c, n = VPPath("cosine", 1000), 0.5, 2000
    truth = 2 * (2 / (1 + math.exp(-4 * c)) - 1)
    known, mask = torch.tensor([[c, 0.0]]).expand(n, 2), torch.tensor([[1.0, 0.0]])
    errors = {}
    for resample in (1, 10):
        x, ts = _start(path, 20, (n, 2))
        out = sample_repaint(
            mix.denoiser(path), x, ts, path, known=known, mask=mask, resample=resample,
            noise=torch.Generator().manual_seed(1), paste_noise=torch.Generator().manual_seed(2),
        )  # fmt: skip
        assert (out[:, 0] == c).all()
        errors[resample] = abs(out[:, 1].mean().item() - truth)  # standard error of the mean: 0.04
    assert errors[1] > 0.8 and errors[10] < 0.5 * errors[1], errors


def test_an_empty_mask_is_the_step_sampler_itself():
    path = PATHS["vp-cosine-1000"]
    x, ts = _start(path, 5, (2, 4))
    out = sample_repaint(
        _smooth_denoiser, x, ts, path, known=torch.zeros(2, 4), mask=torch.zeros(1, 4), resample=1,
        noise=Seeds([7, 8]), paste_noise=Seeds([9, 10]),
    )  # fmt: skip
    plain = sample_ddpm(_smooth_denoiser, x, ts, path, noise=Seeds([7, 8]))
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)


class _FixedVarianceNet(torch.nn.Module):
    """x0-predicting stand-in whose learned variance is a constant v (0: DDPM's "small", 1: its "large")."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, t, return_variance=False):
        pred = 0.5 * torch.tanh(x) + 1e-4 * t[:, None]
        return (pred, torch.full_like(x, self.v)) if return_variance else pred


@pytest.mark.parametrize(("v", "variance"), [(0.0, "small"), (1.0, "large")])
def test_step_args_reach_the_step_and_callback_reports_each_step_once(v, variance):
    path = PATHS["vp-cosine-1000"]
    x, ts = _start(path, 4, (2, 4))
    known, mask = torch.ones(2, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    denoise, seen = Denoiser(_FixedVarianceNet(v), path, "x0"), []

    def repaint(step_args, callback=None):  # fresh Seeds per run: they are stateful noise streams
        return sample_repaint(
            denoise, x, ts, path, known=known, mask=mask, resample=3, step_args=step_args, callback=callback,
            noise=Seeds([1, 2]), paste_noise=Seeds([3, 4]),
        )  # fmt: skip

    learned = repaint({"variance": "learned"}, callback=lambda d: seen.append(d["i"]))
    fixed = repaint({"variance": variance})
    torch.testing.assert_close(learned, fixed, rtol=1e-5, atol=1e-5)
    assert seen == [0, 1, 2, 3]  # once per step, whatever the number of passes
    with pytest.raises(ValueError, match="resample"):
        sample_repaint(denoise, x, ts, path, known=known, mask=mask, resample=0)
