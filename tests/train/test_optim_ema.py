"""Optimisers, parameter groups, lr schedules and EMA math."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from t2i.train.config import OptimConfig, ScheduleConfig
from t2i.train.ema import EMA, ema_decay
from t2i.train.optim import Lamb, Lion, LRSchedule, build_optimizer, lr_factor, param_groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3)
        self.pos = nn.Parameter(torch.zeros(1, 4, 4))  # rank 3, but listed by no_weight_decay()

    def no_weight_decay(self):
        return {"pos"}


def test_no_weight_decay_on_norms_biases_embeddings():
    net = _Net()
    decay, no_decay = param_groups(net, 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"fc.weight", "conv.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "emb.weight",
        "fc.bias",
        "norm.weight",
        "norm.bias",
        "gn.weight",
        "gn.bias",
        "conv.bias",
        "pos",
    }


def test_weight_decay_really_skips_norms():
    net = _Net()
    opt = build_optimizer(net, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay can move a parameter
    opt.step()
    assert torch.equal(net.norm.weight, before["norm.weight"]) and torch.equal(net.emb.weight, before["emb.weight"])
    assert torch.allclose(net.fc.weight, before["fc.weight"] * (1 - 0.1 * 0.5))


def test_lion_matches_its_definition():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.2)
    g = torch.tensor([0.3, -0.1, 0.0])
    p.grad = g.clone()
    opt.step()
    # m0 = 0: update = sign(0.1 g) ; p <- p (1 - lr wd) - lr update ; m <- 0.01 g
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.02) - 0.1 * torch.sign(g)
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * g)


def _lamb_reference(w, grads, lr, b1, b2, eps, wd):
    """You et al. 2020, Alg. 2 written out step by step in float64 (phi = identity)."""
    w, m, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        u = r + wd * w
        w = w - lr * (w.norm() / u.norm()) * u
    return w


def test_lamb_matches_the_papers_update():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=g)
    grads = [torch.randn(4, 3, generator=g) * 10 ** (k - 1) for k in range(4)]  # gradient scales 0.1 .. 100
    p = nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    expected = _lamb_reference(w0, grads, 0.05, 0.9, 0.99, 1e-6, 0.1)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_lamb_steps_are_relative_to_each_tensors_norm():
    """The trust ratio: a tensor 100x larger moves 100x further for the same gradient direction, whatever the
    gradient's scale; a tensor of zeros (a fresh bias) still moves (trust ratio 1)."""
    small, big, zero = nn.Parameter(torch.ones(5)), nn.Parameter(100 * torch.ones(5)), nn.Parameter(torch.zeros(5))
    opt = Lamb([small, big, zero], lr=0.01)
    for p, scale in ((small, 1e-3), (big, 1e3), (zero, 1.0)):
        p.grad = scale * torch.arange(1.0, 6.0)
    opt.step()
    moved = [(1 - small.detach()).norm(), (100 - big.detach()).norm()]
    torch.testing.assert_close(moved[1] / moved[0], torch.tensor(100.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(moved[0], torch.tensor(0.01 * 5**0.5), rtol=1e-4, atol=0)  # lr x ||w||
    assert zero.detach().abs().max() > 0


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("cosine", 0, 0.25),  # warmup (step + 1) / 4
        ("cosine", 3, 1.0),
        ("cosine", 4, 1.0),  # decay starts at 1 after warmup
        ("cosine", 9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10))),
        ("cosine", 14, 0.1),  # end of the run: the floor
        ("linear", 9, 0.1 + 0.9 * 0.5),
        ("linear", 14, 0.1),
        ("constant", 12, 1.0),
        ("exponential", 4 + 20, 0.5**2),
    ],
)
def test_schedule_values(name, step, expected):
    cfg = ScheduleConfig(name=name, warmup_steps=4, min_lr_ratio=0.1, decay_rate=0.5, decay_steps=10)
    assert lr_factor(cfg, step, total_steps=14) == pytest.approx(expected)


def test_schedule_sets_lr_and_resumes():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, ScheduleConfig(name="linear", warmup_steps=2), peak_lr=2.0, total_steps=6)
    assert opt.param_groups[0]["lr"] == 1.0  # first step: warmup 1/2
    for _ in range(3):
        sched.step()
    other = LRSchedule(opt, ScheduleConfig(name="linear", warmup_steps=2), peak_lr=2.0, total_steps=6)
    other.load_state_dict(sched.state_dict())
    assert other.get_lr() == sched.get_lr() == pytest.approx(2.0 * (1 - 1 / 4))


def test_ema_decay_rules():
    assert ema_decay(0, decay=0.999, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay(10**6, decay=0.999, warmup=True) == 0.999
    assert ema_decay(0, decay=0.9, warmup=False) == 0.9
    # half-life in samples: after half_life samples the old weights count one half
    d = ema_decay(10**6, half_life=1000, samples_per_update=10, warmup=True)
    assert d**100 == pytest.approx(0.5)
    # batch-size invariant: 10 updates of 100 samples decay as much as 100 updates of 10
    d_big = ema_decay(10**6, half_life=1000, samples_per_update=100)
    assert d_big**10 == pytest.approx(d**100)
    # half-life warmup: capped by the samples seen so far
    assert ema_decay(0, half_life=1000, samples_per_update=10) == pytest.approx(0.5)


def test_ema_update_math_and_buffers():
    net = nn.BatchNorm1d(2)
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.running_mean.fill_(5.0)
    ema.update(net)
    # ema = 0.9 * 1 + 0.1 * 2 for the weight; buffers are copied
    assert torch.allclose(ema.module.weight, torch.full((2,), 1.1))
    assert torch.equal(ema.module.running_mean, torch.full((2,), 5.0))
    ema.update(net)
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.9 * 1.1 + 0.2))
    assert ema.num_updates == 2 and not ema.module.weight.requires_grad


def test_ema_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay=1.0)
    with pytest.raises(ValueError, match="half_life"):
        EMA(nn.Linear(1, 1), half_life=0)


@pytest.mark.parametrize(
    ("name", "cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("lion", Lion), ("lamb", Lamb)]
)
def test_every_optimizer_name_builds_and_steps(name, cls):
    net = _Net()
    opt = build_optimizer(net, OptimConfig(name=name, lr=1e-2, weight_decay=0.1))
    assert isinstance(opt, cls)
    before = net.fc.weight.detach().clone()
    net.fc(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, net.fc.weight)
