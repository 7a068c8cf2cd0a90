"""VQ-GAN: shapes, strict constructor, EMA and straight-through codebooks, usage tracking, save/load, overfit."""

from __future__ import annotations

import pytest
import torch

from t2i.models.vqgan import PRESETS, VQGAN, VQGANConfig


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> VQGAN:
    base = dict(dim=8, dim_mults=(1, 2), groups=4, latent_channels=4, codebook_size=16)
    base.update(kw)
    return VQGAN(**base)


def test_shapes_and_factor():
    model = tiny().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    assert model.downsample_factor == 2 and z.shape == (2, 4, 8, 8)
    assert model.decode(z).shape == x.shape
    recon, idx, loss = model(x)
    assert recon.shape == x.shape and idx.shape == (2, 8, 8) and loss.shape == (2,)
    torch.testing.assert_close(model.decode_indices(idx), recon)
    assert VQGAN(PRESETS["tiny"]).downsample_factor == 2


def test_strict_constructor():
    with pytest.raises(ValueError, match="did you mean 'codebook_size'"):
        VQGAN(codebook_sise=3)
    with pytest.raises(ValueError, match="unknown quantizer"):
        VQGANConfig(quantizer="gumbel")


def test_decode_snaps_to_codes():
    model = tiny().eval()
    z = model.encode(torch.rand(1, 3, 16, 16))
    q, _ = model.quantizer.lookup(z)
    torch.testing.assert_close(model.decode(z), model.decode(q + 1e-4 * torch.randn_like(q)))  # same codes


def test_ema_codebook_updates_only_in_training_and_tracks_usage():
    model = tiny(restart_dead_codes=False)
    book = model.quantizer.codebook.clone()
    assert not model.quantizer.codebook.requires_grad  # EMA: a buffer, not a parameter
    model.eval()
    model(torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(model.quantizer.codebook, book)
    model.train()
    model(torch.rand(2, 3, 16, 16))
    assert not torch.allclose(model.quantizer.codebook, book)
    stats = model.quantizer.usage_stats()
    assert 0 < stats["codebook_used"] <= 1 and 1 <= stats["codebook_perplexity"] <= 16


def test_straight_through_codebook_gets_gradients():
    model = tiny(quantizer="straight_through").train()
    assert isinstance(model.quantizer.codebook, torch.nn.Parameter)
    recon, _, vq = model(torch.rand(2, 3, 16, 16))
    ((recon**2).mean() + vq.mean()).backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0
    assert model.encoder[0].weight.grad.abs().sum() > 0  # straight-through estimator reaches the encoder


def _kill_codes(model):
    with torch.no_grad():
        q = model.quantizer
        q.codebook[8:] = 1e3  # codes no latent will ever pick
        q.embed_sum[8:] = 1e3
        q.usage[8:] = 0


@pytest.mark.parametrize("decay", [0.5, 0.99])
def test_dead_codes_are_restarted_after_the_usage_horizon(decay):
    model = tiny(codebook_size=16, ema_decay=decay).train()
    model(torch.rand(2, 3, 16, 16))  # first step: codes initialised from encoder outputs
    assert model.quantizer.codebook.abs().max() < 100
    _kill_codes(model)
    model(torch.rand(2, 3, 16, 16))
    if decay == 0.5:  # 2 steps >= the EMA horizon 1/(1 - decay): unused codes are re-seeded
        assert model.quantizer.codebook[8:].abs().max() < 100
    else:  # 2 steps << 100: too early to call any code dead
        assert model.quantizer.codebook[8:].abs().min() > 100


def test_save_load_round_trip(tmp_path):
    model = tiny(discriminator=True, disc_dim=8, disc_layers=2).train()
    model(torch.rand(2, 3, 16, 16))  # move the EMA buffers away from their init
    model.save(tmp_path / "vq.safetensors")
    loaded = VQGAN.load(tmp_path / "vq.safetensors").eval()
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)), rtol=0, atol=0)
    assert loaded.discriminator is not None


def test_tiny_vqgan_overfits_a_handful_of_images():
    """L1 reconstruction of 4 16x16 images falls below 40% of its start within 80 steps."""
    torch.manual_seed(0)
    model = tiny(dim=16, codebook_size=32).train()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 4, 4, generator=g) * 2 - 1).repeat_interleave(4, -1).repeat_interleave(4, -2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def recon_err():
        model.eval()
        with torch.no_grad():
            err = float((model.decode(model.encode(x)) - x).abs().mean())
        model.train()
        return err

    start = recon_err()
    for _ in range(80):
        recon, _, vq = model(x)
        loss = (recon - x).abs().mean() + vq.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert recon_err() < 0.4 * start


def test_codebook_math_stays_fp32_under_bf16_autocast():
    model = tiny().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, _, loss = model(x)
        z = model.encode(x)
        _, idx_auto = model.quantizer.lookup(z)
    assert model.quantizer.codebook.dtype == torch.float32 and torch.isfinite(loss).all()
    assert recon.shape == x.shape
    _, idx_fp32 = model.quantizer.lookup(z.float())
    torch.testing.assert_close(idx_auto, idx_fp32, rtol=0, atol=0)  # the same codes as an fp32 lookup


def test_batch_independent_encode_decode():
    model = tiny().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    full = model.decode(model.encode(x))
    torch.testing.assert_close(full[1:2], model.decode(model.encode(x[1:2])), rtol=1e-5, atol=1e-5)
