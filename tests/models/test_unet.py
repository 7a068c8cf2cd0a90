"""The unCLIP decoder Unet: shapes, determinism, strict constructor, conditioning masks, self-conditioning, learned
variance, save/load, and a tiny overfit."""

from __future__ import annotations

import time

import pytest
import torch

from t2i.diffusion import DenoisingObjective, VPPath
from t2i.models.unet import PRESETS, Unet, UnetConfig, variance_bound_loss


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> Unet:
    base = dict(
        dim=16,
        dim_mults=(1, 2),
        num_res_blocks=1,
        attn_levels=(False, True),
        self_attn=(False, True),
        heads=2,
        head_dim=8,
        image_embed_dim=12,
        text_embed_dim=10,
    )
    base.update(kw)
    return Unet(**base)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the zero-initialised output layers by small random weights so every input can show in the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def inputs(b=2, size=8, gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    return dict(
        x=torch.randn(b, 3, size, size, generator=g),
        t=torch.tensor([10.0, 700.0][:b] + [300.0] * max(0, b - 2)),
        image_embed=torch.randn(b, 12, generator=g),
        text_tokens=torch.randn(b, 5, 10, generator=g),
        text_mask=torch.tensor([[1, 1, 1, 0, 0]] * b, dtype=torch.bool),
    )


def run(model, d, **extra):
    d = {**d, **extra}
    return model(d.pop("x"), d.pop("t"), **d)


def test_shapes_and_presets():
    model = randomize(tiny())
    out = run(model, inputs())
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    big = Unet(PRESETS["tiny"])
    assert big(torch.randn(1, 3, 16, 16), torch.tensor([5.0])).shape == (1, 3, 16, 16)
    sr = randomize(tiny(lowres_cond=True, lowres_noise_cond=True))
    out = run(sr, inputs(), lowres=torch.randn(2, 3, 8, 8), lowres_t=torch.tensor([0.1, 0.2]))
    assert out.shape == (2, 3, 8, 8)


def test_zero_init_starts_at_zero_and_is_deterministic():
    torch.manual_seed(3)
    a = tiny()
    torch.manual_seed(3)
    b = tiny()
    assert run(a, inputs()).abs().max() == 0  # zero-initialised output conv: the net starts predicting 0
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)  # same seed, same weights
    randomize(a)
    b.load_state_dict(a.state_dict())
    b.eval()
    torch.testing.assert_close(run(a, inputs()), run(b, inputs()), rtol=0, atol=0)
    torch.testing.assert_close(run(a, inputs()), run(a, inputs()), rtol=0, atol=0)


def test_batch_independence():
    model = randomize(tiny())
    full = run(model, inputs(b=3))
    one = run(model, {k: v[:1] for k, v in inputs(b=3).items()})
    torch.testing.assert_close(full[:1], one, rtol=1e-5, atol=1e-5)


def test_strict_constructor():
    with pytest.raises(ValueError, match="did you mean 'dim'"):
        Unet(dimm=32)
    with pytest.raises(ValueError, match="unknown UnetConfig argument 'sparse_attn_window'"):
        Unet(sparse_attn_window=2)
    with pytest.raises(ValueError, match="one entry per level"):
        Unet(dim_mults=(1, 2), attn_levels=(True,), self_attn=(False,))
    with pytest.raises(ValueError, match="lowres_noise_cond needs lowres_cond"):
        Unet(lowres_noise_cond=True)
    with pytest.raises(ValueError, match="either"):
        Unet(UnetConfig(), dim=8)


def test_missing_or_unexpected_conditioning_is_an_error():
    sr = tiny(lowres_cond=True)
    with pytest.raises(ValueError, match="pass lowres="):
        run(sr, inputs())
    plain = tiny(image_embed_dim=0, text_embed_dim=0)
    with pytest.raises(ValueError, match="image_embed_dim=0"):
        run(plain, inputs())
    with pytest.raises(ValueError, match="return_variance"):
        run(tiny(), inputs(), return_variance=True)


def test_cfg_masks_really_drop_the_condition():
    model = randomize(tiny())
    d = inputs()
    other = {**d, "image_embed": torch.randn(2, 12), "text_tokens": torch.randn(2, 5, 10)}
    drop = torch.tensor([True, True])
    # dropped image embedding: the output no longer depends on it, and equals "no embedding" (the null one)
    a = run(model, d, drop_image=drop)
    b = run(model, other, drop_image=drop, text_tokens=d["text_tokens"])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, run(model, {**d, "image_embed": None}))
    # dropped text: independent of the tokens and equal to passing no text at all
    a = run(model, d, drop_text=drop)
    b = run(model, {**other, "image_embed": d["image_embed"]}, drop_text=drop)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, run(model, {**d, "text_tokens": None, "text_mask": None}))
    # and not dropping does depend on them; masked-out (padding) text positions never do
    assert not torch.allclose(run(model, d), run(model, {**d, "image_embed": other["image_embed"]}))
    padded = d["text_tokens"].clone()
    padded[:, 3:] = 100.0
    torch.testing.assert_close(run(model, d), run(model, {**d, "text_tokens": padded}))
    # per-sample: dropping sample 0 leaves sample 1 untouched
    mixed = run(model, d, drop_image=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[1], run(model, d)[1])


def test_image_map_starts_as_no_change_and_carries_the_embedding_alone():
    torch.manual_seed(0)
    mapped = tiny(image_map_grid=2, image_map_channels=4)
    plain = tiny()
    state = {k: v for k, v in mapped.state_dict().items() if not k.startswith(("image_to_map.", "map_conv."))}
    assert set(mapped.state_dict()) - set(state) == {
        "image_to_map.0.weight", "image_to_map.0.bias", "image_to_map.2.weight", "image_to_map.2.bias",
        "map_conv.weight", "map_conv.bias",
    }  # fmt: skip
    randomize(plain)
    mapped.load_state_dict({**mapped.state_dict(), **plain.state_dict()})
    mapped.eval()
    # the zero-initialised map conv: a fresh map changes nothing, so the rest of the Unet starts as without it
    torch.testing.assert_close(run(mapped, inputs()), run(plain, inputs()), rtol=0, atol=0)
    with torch.no_grad():
        mapped.map_conv.weight.normal_(0, 0.1)
        # cut the embedding's other two ways in (FiLM shift and context tokens): what is left goes through the map
        for layer in (mapped.image_to_cond, mapped.image_to_tokens):
            layer.weight.zero_()
            layer.bias.zero_()
    d = inputs()
    other = {**d, "image_embed": torch.randn(2, 12)}
    assert (run(mapped, d) - run(mapped, other)).abs().max() > 1e-3
    # a dropped embedding is the null embedding's map, whatever was passed
    drop = torch.tensor([True, True])
    torch.testing.assert_close(run(mapped, d, drop_image=drop), run(mapped, other, drop_image=drop))
    torch.testing.assert_close(run(mapped, d, drop_image=drop), run(mapped, {**d, "image_embed": None}))
    # the map is drawn at any input size (it is upsampled to the first level)
    assert run(mapped, inputs(size=16)).shape == (2, 3, 16, 16)


def test_image_map_config_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="needs image_embed_dim > 0"):
        Unet(image_map_grid=4)
    with pytest.raises(ValueError, match="image_map_grid must be >= 0"):
        tiny(image_map_grid=-1)
    model = randomize(tiny(image_map_grid=4, image_map_channels=2))
    model.save(tmp_path / "unet.safetensors")
    loaded = Unet.load(tmp_path / "unet.safetensors").eval()
    assert loaded.cfg.image_map_grid == 4 and loaded.cfg.image_map_channels == 2
    torch.testing.assert_close(run(model, inputs()), run(loaded, inputs()), rtol=0, atol=0)


def test_shape_map_starts_as_no_change_and_is_its_own_mlp(tmp_path):
    torch.manual_seed(0)
    both = tiny(image_map_grid=2, image_map_channels=3, image_shape_map_channels=5)
    one = randomize(tiny(image_map_grid=2, image_map_channels=3))
    added = set(both.state_dict()) - set(one.state_dict())
    assert added == {
        "image_to_shape_map.0.weight", "image_to_shape_map.0.bias", "image_to_shape_map.2.weight",
        "image_to_shape_map.2.bias", "shape_map_conv.weight", "shape_map_conv.bias",
    }  # fmt: skip
    both.load_state_dict({**both.state_dict(), **one.state_dict()})
    both.eval()
    # a trained decoder given a fresh shape map draws as before (its convolution starts at zero)
    torch.testing.assert_close(run(both, inputs()), run(one.eval(), inputs()), rtol=0, atol=0)
    e = torch.randn(2, 12)
    assert both.shape_map(e).shape == (2, 5, 2, 2)
    with torch.no_grad():
        both.shape_map_conv.weight.normal_(0, 0.1)
        both.image_to_shape_map[2].weight.normal_(0, 0.5)
    assert (run(both, inputs()) - run(one, inputs())).abs().max() > 1e-3  # and reads it once trained
    both.save(tmp_path / "unet.safetensors")
    loaded = Unet.load(tmp_path / "unet.safetensors").eval()
    assert loaded.cfg.image_shape_map_channels == 5
    torch.testing.assert_close(run(both, inputs()), run(loaded, inputs()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only with image_map_grid > 0"):
        tiny(image_shape_map_channels=5)
    with pytest.raises(ValueError, match="image_shape_map_channels must be >= 0"):
        tiny(image_map_grid=2, image_shape_map_channels=-1)


def test_text_map_starts_as_no_change_and_is_hidden_with_the_text(tmp_path):
    """A text map (the caption's layout picture) enters through its own zero-initialised convolution, so a trained
    decoder given one draws as before; once trained it is read, and drop_text (or no map) leaves it out."""
    torch.manual_seed(0)
    with_map = tiny(text_map_grid=2, text_map_channels=8)
    plain = randomize(tiny())
    assert set(with_map.state_dict()) - set(plain.state_dict()) == {"text_map_conv.weight", "text_map_conv.bias"}
    with_map.load_state_dict({**with_map.state_dict(), **plain.state_dict()})
    with_map.eval()
    text_map = torch.randn(2, 8, 2, 2)
    torch.testing.assert_close(run(with_map, inputs(), text_map=text_map), run(plain, inputs()), rtol=0, atol=0)
    with torch.no_grad():
        with_map.text_map_conv.weight.normal_(0, 0.1)
    read = run(with_map, inputs(), text_map=text_map)
    assert (read - run(with_map, inputs(), text_map=-text_map)).abs().max() > 1e-3
    # hidden per sample with the caption (drop_text): equal to no map and no text at all
    drop = torch.tensor([True, False])
    dropped = run(with_map, inputs(), text_map=text_map, drop_text=drop)
    bare = run(with_map, {**inputs(), "text_tokens": None, "text_mask": None})
    torch.testing.assert_close(dropped[0], bare[0])
    torch.testing.assert_close(dropped[1], read[1])
    with_map.save(tmp_path / "unet.safetensors")
    loaded = Unet.load(tmp_path / "unet.safetensors").eval()
    torch.testing.assert_close(run(loaded, inputs(), text_map=text_map), read, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"text_map must have shape \(2, 8, 2, 2\)"):
        run(with_map, inputs(), text_map=torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="text_map_grid=0"):
        run(plain, inputs(), text_map=text_map)
    with pytest.raises(ValueError, match="text_map_grid must be >= 0"):
        tiny(text_map_grid=-1)


def test_self_conditioning_input():
    model = randomize(tiny(self_cond=True))
    d = inputs()
    zeros = run(model, d)
    torch.testing.assert_close(zeros, run(model, d, self_cond=torch.zeros(2, 3, 8, 8)))
    assert not torch.allclose(zeros, run(model, d, self_cond=torch.randn(2, 3, 8, 8)))
    assert model.init_conv.in_channels == 6


def test_learned_variance_option():
    assert tiny().out_conv.out_channels == 3  # off by default
    model = randomize(tiny(learned_variance=True))
    pred, v = run(model, inputs(), return_variance=True)
    assert pred.shape == v.shape == (2, 3, 8, 8)
    assert run(model, inputs()).shape == (2, 3, 8, 8)  # the denoiser wrappers see only the prediction
    path = VPPath("cosine", 50)
    x0 = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1 / 50, 0.5], dtype=torch.float64)
    x_t = path.add_noise(x0, torch.randn_like(x0), t)
    v = torch.full_like(x0, 0.5, requires_grad=True)
    kl = variance_bound_loss(path, x0, x_t, x0 + 0.1, v, t)
    assert kl.shape == (2,) and torch.isfinite(kl).all() and (kl >= 0).all()
    kl.sum().backward()
    assert v.grad.abs().sum() > 0
    # the true posterior (mean and beta-tilde variance) gives KL 0
    x0_true = x0.clone()
    zero = variance_bound_loss(path, x0, x_t, x0_true, torch.zeros_like(x0), t)
    assert zero[1].abs() < 1e-5


def test_grad_checkpointing_matches():
    model = randomize(tiny()).train()
    d = {**inputs(), "drop_image": torch.tensor([True, False])}
    run(model, d).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter gets a gradient
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    run(model, d).square().mean().backward()
    for a, p in zip(g1, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model = randomize(tiny(self_cond=True, learned_variance=True))
    model.save(tmp_path / "unet.safetensors")
    loaded = Unet.load(tmp_path / "unet.safetensors").eval()
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(run(model, inputs()), run(loaded, inputs()), rtol=0, atol=0)
    from t2i.models.prior import PriorNetwork

    with pytest.raises(ValueError, match="not a 'unclip_prior'"):
        PriorNetwork.load(tmp_path / "unet.safetensors")


def test_bf16_autocast_close_to_fp32():
    model = randomize(tiny())
    ref = run(model, inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, inputs())
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


def test_tiny_decoder_overfits_a_handful_of_images():
    """A ~20k-parameter Unet memorises 4 8x8 images conditioned on their embeddings: the eps loss on a fixed
    set of (t, noise) pairs falls below 25% of its starting value within 150 steps (a few seconds on one core)."""
    torch.manual_seed(0)
    model = Unet(
        dim=16,
        dim_mults=(1, 2),
        num_res_blocks=1,
        attn_levels=(False, True),
        self_attn=(False, False),
        heads=2,
        head_dim=8,
        image_embed_dim=8,
    )
    path = VPPath("cosine", 1000)
    obj = DenoisingObjective(path, "eps")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    emb = torch.randn(4, 8, generator=g)
    t_eval = torch.tensor([0.1, 0.3, 0.5, 0.7] * 4, dtype=torch.float64)
    eps_eval = torch.randn(16, 3, 8, 8, generator=g)

    def eval_loss():
        with torch.no_grad():
            return float(
                obj(model, x0.repeat(4, 1, 1, 1), t=t_eval, eps=eps_eval, image_embed=emb.repeat(4, 1)).mean()
            )

    start = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for _ in range(150):
        loss = obj(model, x0.repeat(4, 1, 1, 1), generator=g, image_embed=emb.repeat(4, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < 0.25 * start, (start, end, time.perf_counter() - t0)
