import math

import pytest
import torch

from t2i.diffusion import (
    PREDICTIONS,
    DenoisingObjective,
    LogitNormalTime,
    ModeTime,
    RectifiedFlow,
    UniformTime,
    VPPath,
    flow_matching_objective,
    loss_weight,
    make_time_sampler,
    prediction_target,
)
from t2i.diffusion.paths import append_dims

WEIGHTINGS = [None, "min_snr", "sigma_sqrt", "cosmap"]


@pytest.mark.parametrize("path", [VPPath("linear", 1000), RectifiedFlow(shift=3.0)], ids=repr)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber"])
def test_perfect_predictor_has_zero_loss(path, prediction, weighting, loss_type):
    obj = DenoisingObjective(path, prediction, weighting=weighting, loss_type=loss_type)
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = obj.sample_time(5, torch.Generator().manual_seed(0))
    a = append_dims(path.alpha(t), 4).float()
    s = append_dims(path.sigma(t), 4).float()
    perfect = prediction_target(prediction, x0, eps, a, s)
    loss = obj.loss_from_prediction(perfect, x0, eps, t)
    assert loss.shape == (5,)
    assert loss.abs().max() < 1e-5
    assert (obj.loss_from_prediction(perfect + 0.1, x0, eps, t) > 0).all()


def test_call_runs_the_network_on_the_noised_input():
    path = VPPath("cosine", 1000)
    obj = DenoisingObjective(path, "eps")
    x0 = torch.randn(4, 6)
    seen = {}

    def net(x_t, model_time, label):
        seen.update(x_t=x_t, model_time=model_time, label=label)
        return torch.zeros_like(x_t)

    eps = torch.randn(4, 6)
    t = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    loss = obj(net, x0, t=t, eps=eps, label="cat")
    torch.testing.assert_close(seen["x_t"], path.add_noise(x0, eps, t))
    torch.testing.assert_close(seen["model_time"], torch.tensor([249.0, 499.0, 749.0, 999.0]))
    torch.testing.assert_close(loss, (eps**2).mean(1))  # a zero prediction's loss is the target's power


def test_flow_matching_target_is_eps_minus_x0():
    obj = flow_matching_objective(RectifiedFlow())
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert obj.loss_from_prediction(eps - x0, x0, eps, t).abs().max() < 1e-6
    assert isinstance(obj.time_sampler, LogitNormalTime)


def test_min_snr_weights_match_the_paper():
    path = VPPath("linear", 1000)
    t = torch.tensor([0.01, 0.2, 0.8], dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    snr = a**2 / s**2
    torch.testing.assert_close(loss_weight("min_snr", "eps", a, s, gamma=5.0), snr.clamp(max=5) / snr)
    torch.testing.assert_close(loss_weight("min_snr", "v", a, s, gamma=5.0), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(loss_weight("min_snr", "x0", a, s, gamma=5.0), snr.clamp(max=5))
    torch.testing.assert_close(loss_weight("p2", "eps", a, s, gamma=1.0, k=1.0), 1 / (1 + snr))


def test_sd3_weightings():
    path = RectifiedFlow()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    torch.testing.assert_close(loss_weight("sigma_sqrt", "flow", a, s), t**-2)
    torch.testing.assert_close(loss_weight("cosmap", "flow", a, s), 2 / (math.pi * (1 - 2 * t + 2 * t**2)))


def test_time_densities():
    g = torch.Generator().manual_seed(0)
    u = UniformTime()(20000, g)
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() <= 1
    ln = LogitNormalTime(0.0, 1.0)(20000, g)
    assert abs(ln.median() - 0.5) < 0.01
    assert abs(torch.logit(ln.double()).std() - 1.0) < 0.03
    shifted = LogitNormalTime(1.0, 1.0)(20000, g)
    assert abs(shifted.median() - torch.sigmoid(torch.tensor(1.0))) < 0.01
    mode = ModeTime(1.29)(20000, g)
    # the mode density puts more mass in the middle than uniform
    assert ((mode - 0.5).abs() < 0.25).float().mean() > 0.55
    assert make_time_sampler("cosmap")(10, g).shape == (10,)
    with pytest.raises(ValueError, match="unknown time sampler"):
        make_time_sampler("beta")
    with pytest.raises(ValueError, match="mode scale"):
        ModeTime(5.0)


def test_discrete_paths_train_on_their_lattice():
    obj = DenoisingObjective(VPPath("linear", 10), "eps")
    t = obj.sample_time(1000, torch.Generator().manual_seed(0))
    assert set((t * 10).round().long().tolist()) == set(range(1, 11))
    assert torch.allclose(t * 10, (t * 10).round())


def test_shifted_training_times():
    path = RectifiedFlow(shift=3.0)
    obj = DenoisingObjective(path, "flow", time_sampler=UniformTime(), shift_times=True)
    t = obj.sample_time(20000, torch.Generator().manual_seed(0))
    assert t.mean() > 0.6  # shift 3 moves mass toward noise
    with pytest.raises(ValueError, match="shift_times"):
        DenoisingObjective(VPPath(), "eps", shift_times=True).sample_time(3)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="unknown weighting"):
        DenoisingObjective(VPPath(), weighting="snr")
    with pytest.raises(ValueError, match="unknown loss_type"):
        DenoisingObjective(VPPath(), loss_type="l3")
    with pytest.raises(ValueError, match="p2 weighting"):
        loss_weight("p2", "v", torch.ones(1), torch.ones(1))
