import pytest
import torch
from torch import nn

from t2i.nn.lora import (
    LoRALinear,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    remove_lora,
    set_adapter_weight,
    unmerge_lora,
)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.attn["qkv"](self.norm(x)).chunk(3, -1)[0]
        x = x + self.attn["proj"](h)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, d=8, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _randomise_adapters(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and name in m.lora_up:
                m.lora_up[name].weight.copy_(torch.randn(m.lora_up[name].weight.shape, generator=g) * 0.1)


def test_injection_is_identity_at_init_and_keeps_base_keys():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 8)
    ref = net(x)
    keys = set(net.state_dict())
    names = inject_lora(net, ["attn.qkv", "attn.proj"], rank=2)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    torch.testing.assert_close(net(x), ref, atol=0, rtol=0)
    assert keys <= set(net.state_dict())  # the model's own keys are unchanged; adapters only add keys


def test_only_adapter_parameters_get_gradients():
    net = Net()
    inject_lora(net, ["*.attn.*"], rank=2)
    trainable = mark_only_lora_trainable(net)
    assert len(trainable) == 8  # down + up for 4 layers
    _randomise_adapters(net)
    net(torch.randn(3, 8)).pow(2).sum().backward()
    for n, p in net.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_merge_matches_and_unmerge_restores_exactly():
    net, x = Net(), torch.randn(5, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inject_lora(net, ["attn.qkv", "mlp.0"], rank=3, alpha=6.0)
    _randomise_adapters(net)
    y = net(x)
    assert merge_lora(net) == 4
    torch.testing.assert_close(net(x), y, atol=1e-5, rtol=1e-5)
    assert not torch.equal(net.blocks[0].attn["qkv"].weight, before["blocks.0.attn.qkv.weight"])
    unmerge_lora(net)
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k
    torch.testing.assert_close(net(x), y)


def test_stacked_adapters_mix_by_weight():
    net, x = Net(depth=1), torch.randn(2, 8)
    base = net.head(x)
    inject_lora(net, ["head"], rank=2, name="a")
    inject_lora(net, ["head"], rank=4, alpha=2.0, name="b", weight=0.5)
    _randomise_adapters(net, "a", 1)
    _randomise_adapters(net, "b", 2)
    layer = net.head
    expected = base + x @ layer.delta_weight("a").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.scale("b") == 0.5 * 2.0 / 4
    set_adapter_weight(net, "a", 0.0)
    torch.testing.assert_close(layer(x), base + x @ layer.delta_weight("b").T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapter named"):
        set_adapter_weight(net, "c", 1.0)


def test_state_dict_round_trip_into_a_fresh_model():
    torch.manual_seed(1)
    net = Net()
    inject_lora(net, ["attn.qkv", "attn.proj"], rank=2, alpha=4.0)
    _randomise_adapters(net)
    sd = lora_state_dict(net)
    assert set(sd) == {
        f"blocks.{i}.attn.{m}.{k}"
        for i in (0, 1)
        for m in ("qkv", "proj")
        for k in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    fresh2 = Net()
    fresh2.load_state_dict({k: v for k, v in net.state_dict().items() if "lora_" not in k})
    load_lora_state_dict(fresh2, sd)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh2(x), net(x))


def test_loading_a_lora_that_does_not_fit_reports_every_problem():
    net = Net()
    inject_lora(net, ["attn.qkv"], rank=2)
    sd = lora_state_dict(net)
    small = Net(d=4)
    with pytest.raises(ValueError) as err:
        load_lora_state_dict(small, sd)
    assert str(err.value).count(": adapter (") == 2
    with pytest.raises(ValueError, match=r"nope: no nn\.Linear of that name"):
        load_lora_state_dict(
            Net(), {"nope.lora_down.weight": torch.zeros(2, 8), "nope.lora_up.weight": torch.zeros(8, 2)}
        )


def test_remove_restores_plain_linear_and_errors():
    net, x = Net(), torch.randn(2, 8)
    y = net(x)
    inject_lora(net, ["head"], rank=2)
    _randomise_adapters(net)
    remove_lora(net)
    assert type(net.head) is nn.Linear
    torch.testing.assert_close(net(x), y)
    with pytest.raises(ValueError, match=r"no nn\.Linear layer matches"):
        inject_lora(net, ["attn.to_q"], rank=2)
    with pytest.raises(ValueError, match="rank"):
        inject_lora(net, ["head"], rank=100)
