import pytest
import torch

from t2i.diffusion import (
    PREDICTIONS,
    Denoiser,
    EpsDenoiser,
    FlowDenoiser,
    RectifiedFlow,
    VDenoiser,
    VPPath,
    X0Denoiser,
    append_dims,
    prediction_target,
    x0_from_prediction,
)

PATHS = [VPPath("linear", 1000), VPPath("cosine", None), RectifiedFlow(shift=3.0)]


def _oracle(prediction, path, x0, eps):
    """A 'network' that outputs the exact target for the x_t it is given (it knows x0 and eps)."""

    def net(x_t, model_time):
        t = (
            model_time.double() / path.time_scale
            if not isinstance(path, VPPath) or path.num_train_timesteps is None
            else (model_time.double() + 1) / path.num_train_timesteps
        )
        a = append_dims(path.alpha(t), x0.ndim).float()
        s = append_dims(path.sigma(t), x0.ndim).float()
        return prediction_target(prediction, x0, eps, a, s)

    return net


@pytest.mark.parametrize("path", PATHS, ids=repr)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("shape", [(4, 8), (4, 3, 5, 5)])
def test_denoiser_recovers_x0_from_a_perfect_network(prediction, path, shape):
    x0, eps = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = path.add_noise(x0, eps, t)
    den = Denoiser(_oracle(prediction, path, x0, eps), path, prediction)
    torch.testing.assert_close(den(x_t, t), x0, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_round_trip(prediction):
    x0, eps = torch.randn(6, 5), torch.randn(6, 5)
    a, s = torch.rand(6, 1) * 0.9 + 0.05, torch.rand(6, 1) * 0.9 + 0.05  # not variance preserving on purpose
    x = a * x0 + s * eps
    pred = prediction_target(prediction, x0, eps, a, s)
    torch.testing.assert_close(x0_from_prediction(prediction, pred, x, a, s), x0, atol=1e-5, rtol=1e-5)


def test_named_wrappers_and_flow_formula():
    path = RectifiedFlow()
    net = lambda x, t: torch.ones_like(x)  # noqa: E731
    for cls, name in [(EpsDenoiser, "eps"), (VDenoiser, "v"), (X0Denoiser, "x0"), (FlowDenoiser, "flow")]:
        assert cls(net, path).prediction == name
    x, t = torch.randn(3, 4), torch.tensor([0.2, 0.5, 1.0])
    torch.testing.assert_close(FlowDenoiser(net, path)(x, t), x - t[:, None] * 1.0)


def test_denoiser_computes_in_fp32_around_a_bf16_network():
    path = VPPath("linear", 1000)
    net = lambda x, t: (0.5 * x).to(torch.bfloat16)  # noqa: E731
    x = torch.randn(2, 4)
    out = EpsDenoiser(net, path)(x, torch.tensor([0.5, 0.5]))
    assert out.dtype == torch.float32


def test_scalar_time_broadcasts_and_model_time_is_passed():
    seen = {}

    def net(x, t, **cond):
        seen["t"], seen["cond"] = t, cond
        return torch.zeros_like(x)

    path = VPPath("linear", 1000)
    X0Denoiser(net, path)(torch.randn(3, 2), torch.tensor(0.5, dtype=torch.float64), label=1)
    assert seen["t"].shape == (3,) and torch.allclose(seen["t"], torch.full((3,), 499.0))
    assert seen["cond"] == {"label": 1}


def test_unknown_prediction():
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        Denoiser(lambda x, t: x, RectifiedFlow(), "score")
