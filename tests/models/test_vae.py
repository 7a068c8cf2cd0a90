"""The 16-channel SD3 VAE: official key layout, equivalence with diffusers' ``AutoencoderKL`` through t2i's
converter (SD3.5 spec §7.2 T4), latent format, posterior sampling and tiled decoding."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion import Seeds
from t2i.io.sd3 import detect_vae, vae_diffusers_to_official, vae_official_to_diffusers
from t2i.models.vae import PRESETS, AutoencoderKL, LatentFormat, VAEConfig, count_vae_parameters

diffusers = pytest.importorskip("diffusers")


def diffusers_twin(vae: AutoencoderKL):
    cfg = vae.cfg
    n = len(cfg.block_out_channels)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    ref.load_state_dict(vae_official_to_diffusers(vae.state_dict()), strict=True)
    return ref.eval()


def randomize_(vae: AutoencoderKL, seed: int = 0) -> AutoencoderKL:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def test_full_size_layout_on_meta():
    vae = AutoencoderKL(device="meta")
    sd = vae.state_dict()
    assert count_vae_parameters(vae) == (34_274_208, 49_545_475)  # spec §3.1
    assert len(sd) == 244
    assert not any("quant_conv" in k for k in sd)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert detect_vae(sd) == {
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "in_channels": 3,
        "latent_channels": 16,
    }
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
    conv = vae_official_to_diffusers(sd)
    theirs = ref.state_dict()
    assert set(conv) == set(theirs) and all(conv[k].shape == theirs[k].shape for k in conv)


@pytest.mark.parametrize("name", ["tiny", "tiny2"])
def test_matches_diffusers_and_round_trips(name):
    vae = randomize_(AutoencoderKL(PRESETS[name])).eval()
    ref = diffusers_twin(vae)
    back = vae_diffusers_to_official(ref.state_dict())
    assert set(back) == set(vae.state_dict())
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 48, 32, generator=g)
    with torch.no_grad():
        mean, std = vae.moments(x)
        post = ref.encode(x).latent_dist
        torch.testing.assert_close(mean, post.mean, atol=1e-4, rtol=0)  # measured ~1.4e-6
        torch.testing.assert_close(std, post.std, atol=1e-4, rtol=0)
        z = torch.randn(2, vae.cfg.latent_channels, 6, 4, generator=g)
        torch.testing.assert_close(vae.decode(z), ref.decode(z).sample, atol=1e-4, rtol=0)  # measured ~3e-6


def test_encode_sample_and_mean_and_latent_format():
    vae = randomize_(AutoencoderKL(PRESETS["tiny2"])).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, std = vae.moments(x)
        torch.testing.assert_close(vae.encode(x, sample=False), mean)
        z = vae.encode(x, noise=Seeds([3, 4]))
        torch.testing.assert_close(z, mean + std * Seeds([3, 4]).randn(mean.shape))
        # per-sample seeds: sample 1 alone gets the same latent as in the batch
        # (to conv rounding, which differs with the batch size)
        torch.testing.assert_close(vae.encode(x[1:], noise=Seeds([4])), z[1:], atol=1e-5, rtol=0)
    fmt = LatentFormat()
    assert (fmt.scale, fmt.shift) == (1.5305, 0.0609)
    torch.testing.assert_close(fmt.process_out(fmt.process_in(z)), z)
    torch.testing.assert_close(fmt.process_in(torch.full((1,), 0.0609)), torch.zeros(1))


def test_tiled_decode():
    vae = randomize_(AutoencoderKL(VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                                             norm_groups=2))).eval()  # fmt: skip
    z = torch.randn(1, 4, 20, 13)
    with torch.no_grad():
        whole = vae.decode(z)
        torch.testing.assert_close(vae.decode(z, tile=32), whole)  # one tile covers it: identical
        tiled = vae.decode(z, tile=8, overlap=4)
    assert tiled.shape == whole.shape == (1, 3, 40, 26)
    assert torch.isfinite(tiled).all()
    # per-tile GroupNorm/attention statistics make it approximate, but it must stay close to the whole decode
    assert (tiled - whole).abs().mean() < 0.5 * whole.abs().mean()
    with pytest.raises(ValueError, match="overlap"):
        vae.decode(z, tile=8, overlap=8)
