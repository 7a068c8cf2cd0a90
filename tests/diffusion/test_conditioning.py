"""Self-conditioning at sampling time and the Gaussian blur of low-res augmentation (t2i.diffusion.conditioning)."""

import torch
import torch.nn.functional as F

from t2i.diffusion import (
    LowresAugment,
    Seeds,
    SelfConditioning,
    VPPath,
    classifier_free_guidance,
    gaussian_blur,
    sample_ddim,
)


class _Recorder:
    """x0 = 0.5 x + 0.1 self_cond + context; records the self_cond of every call."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, self_cond, context):
        self.seen.append(self_cond.clone())
        return 0.5 * x + 0.1 * self_cond + context


def test_each_call_sees_the_previous_estimate_starting_from_zeros():
    rec = _Recorder()
    denoise = SelfConditioning(rec)
    path, x = VPPath("cosine", None), torch.randn(3, 4)
    ctx = torch.full((3, 4), 0.2)
    outs = []

    def recorded(x, t, **cond):
        outs.append(denoise(x, t, **cond))
        return outs[-1]

    sample_ddim(recorded, x, path.timesteps(3), path, extra_args={"context": ctx})
    assert len(outs) == 3
    assert torch.equal(rec.seen[0], torch.zeros(3, 4))
    for prev, seen in zip(outs[:-1], rec.seen[1:], strict=True):
        assert torch.equal(seen, prev)


def test_inside_guidance_each_branch_gets_its_own_estimate():
    rec = _Recorder()
    guided = classifier_free_guidance(SelfConditioning(rec), 3.0, {"context": torch.zeros(1, 4)})
    x, t, ctx = torch.randn(2, 4), torch.full((2,), 0.5), torch.ones(2, 4)
    guided(x, t, context=ctx)
    guided(x, t, context=ctx)
    first_cond, first_uncond = (0.5 * x + ctx), (0.5 * x)  # the two branches' x0 at the first call
    torch.testing.assert_close(rec.seen[1], torch.cat([first_cond, first_uncond]))
    # a batch of another shape (guidance switched off outside its interval) starts again from zeros
    denoise = SelfConditioning(rec)
    denoise(torch.randn(4, 4), t.repeat(2), context=torch.ones(4, 4))
    denoise(x, t, context=ctx)
    assert torch.equal(rec.seen[-1], torch.zeros(2, 4))


def test_gaussian_blur_is_a_normalised_separable_kernel():
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_blur(x, 0.0), x)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 2, 5, 5), 0.7), 0.5), torch.full((1, 2, 5, 5), 0.7))
    k = torch.exp(-0.5 * (torch.arange(-2, 3.0) / 0.8) ** 2)
    k2d = torch.outer(k, k) / k.sum() ** 2
    ref = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2d.expand(3, 1, 5, 5), groups=3)
    torch.testing.assert_close(gaussian_blur(x, 0.8, kernel_size=5), ref)


def test_lowres_sampling_noises_the_upsampled_image_to_its_level():
    aug = LowresAugment(4, sample_level=0.0)
    prev = torch.rand(2, 3, 4, 4) * 2 - 1
    low, level = aug.sample(prev, 8, Seeds([0, 1]))
    torch.testing.assert_close(low, aug.upsample(prev, 8))  # level 0: no noise at all
    assert (level == 0).all()
