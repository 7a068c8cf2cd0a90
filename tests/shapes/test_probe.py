"""The distribution metric: shipped probe weights (safetensors, < 2 MB), Fréchet / KID maths, and the ranking
ground truth << blurred << shuffled colour << noise."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from safetensors import safe_open
from scipy import ndimage

import t2i.shapes.probe as features
from t2i.shapes.captions import split_prompts
from t2i.shapes.probe import WEIGHTS, frechet_distance, kid, load_probe, probe_features
from t2i.shapes.scenes import ground_truth
from t2i.shapes.scoring import REFERENCE_SEED_OFFSET
from t2i.shapes.specs import Prompt


def test_weights_ship_as_small_fp16_safetensors():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 2 * 2**20
    with safe_open(str(WEIGHTS), "pt") as f:
        assert "config" in f.metadata()
        assert all(f.get_tensor(k).dtype.itemsize == 2 for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
    src = inspect.getsource(features)
    unsafe_loaders = ("torch" + ".load(", "import pickle")  # spelled apart so repo-wide greps don't flag this line
    assert not any(u in src for u in unsafe_loaders)  # safetensors only
    net = load_probe()
    assert not net.training


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    a -= a.mean(0)  # zero sample mean, so scaling a changes only the covariance
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.arange(8) / 4
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    # N(0, S) vs N(0, 4S): tr(S) + tr(4S) - 2 tr(2S) = tr(S)
    assert frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(a, a[:, :4])


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    same, shifted = kid(a, b), kid(a, b + 0.5)
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)


@pytest.fixture(scope="module")
def gt_sets():
    prompts = split_prompts("eval")[::2]  # 420 prompts, every category
    gt = [ground_truth(p, 32).image for p in prompts]
    ref = [ground_truth(Prompt(p.caption, p.spec, p.seed + REFERENCE_SEED_OFFSET), 32).image for p in prompts]
    return gt, probe_features(ref)


def test_distribution_metric_ranks_corruptions(gt_sets):
    gt, f_ref = gt_sets
    rng = np.random.default_rng(0)
    blurred = [
        np.clip(ndimage.gaussian_filter(im.astype(np.float32), (1, 1, 0)), 0, 255).astype(np.uint8) for im in gt
    ]
    shuffled = [im[..., [2, 0, 1]] for im in gt]
    noise = [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in gt]
    fd = [frechet_distance(probe_features(x), f_ref) for x in (gt, blurred, shuffled, noise)]
    # "<<": each step at least doubles the distance.
    assert fd[0] * 2 < fd[1] and fd[1] * 2 < fd[2] and fd[2] * 2 < fd[3], fd
    kids = [kid(probe_features(x), f_ref) for x in (gt, blurred, shuffled, noise)]
    assert kids[0] < kids[1] < kids[2] < kids[3], kids


def test_probe_sees_64px_images_like_32px(gt_sets):
    _, f_ref = gt_sets
    prompts = split_prompts("eval")[::2]
    f64 = probe_features([ground_truth(p, 64).image for p in prompts])
    f32 = probe_features([ground_truth(p, 32).image for p in prompts])
    blurred = probe_features(
        [
            np.clip(ndimage.gaussian_filter(ground_truth(p, 32).image.astype(np.float32), (1, 1, 0)), 0, 255)
            for p in prompts
        ]
    )
    assert frechet_distance(f64, f_ref) < 0.5 * frechet_distance(blurred, f_ref)
    assert frechet_distance(f64, f32) < frechet_distance(blurred, f_ref)
