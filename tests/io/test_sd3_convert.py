"""Loading SD3 weights from local files: official single files (prefixed transformer + VAE, separate text-encoder
files) and diffusers folders written by diffusers/transformers themselves; dtype on load, detection, and
safetensors-only. Everything is tiny and random; nothing is downloaded."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from t2i.io import CheckpointMismatchError, CorruptFileError
from t2i.io.sd3 import TRANSFORMER_PREFIX, VAE_PREFIX, split_official_checkpoint, transformer_official_to_diffusers
from t2i.models.mmdit import PRESETS, MMDiT
from t2i.models.sd3_loading import load_mmdit, load_sd3, load_text_encoder, load_vae, read_safetensors
from t2i.models.vae import PRESETS as VAE_PRESETS
from t2i.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd3_helpers import randomize_, write_diffusers_folder  # noqa: E402


def tiny_models():
    model = randomize_(MMDiT(replace(PRESETS["tiny-x"], context_dim=96, patch_size=2))).eval()
    vae = randomize_(AutoencoderKL(VAE_PRESETS["tiny2"])).eval()
    return model, vae


def inputs(model):
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    return (
        torch.randn(1, cfg.in_channels, 8, 6, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 10, cfg.context_dim, generator=g),
        torch.randn(1, cfg.pooled_dim, generator=g),
    )


def test_official_single_file(tmp_path):
    model, vae = tiny_models()
    sd = {TRANSFORMER_PREFIX + k: v.half() for k, v in model.state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file(sd, path)
    assert set(split_official_checkpoint(sd)) == {"transformer", "vae"}
    parts = load_sd3(path, dtype=torch.bfloat16, vae_dtype=torch.float32, vae_norm_groups=4, load_text=False)
    assert parts.model_name == "custom" and parts.text_encoder is None
    assert parts.transformer.cfg == replace(model.cfg, num_heads=4, out_channels=4, pos_embed_base_size=64)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in parts.transformer.parameters())
    for k, v in parts.transformer.state_dict().items():  # fp16 file -> bf16 model, tensor by tensor
        assert torch.equal(v, model.state_dict()[k].half().bfloat16()), k
    for k, v in parts.vae.state_dict().items():
        assert torch.equal(v, vae.state_dict()[k]), k
    # a bare transformer file (no prefix) loads the same way, in any dtype
    bare = tmp_path / "bare.safetensors"
    save_file(model.state_dict(), bare)
    loaded = load_mmdit(bare, dtype=torch.float32)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs(model)), model(*inputs(model)), atol=1e-6, rtol=0)
    only_dit = tmp_path / "only_dit.safetensors"
    save_file({TRANSFORMER_PREFIX + k: v for k, v in model.state_dict().items()}, only_dit)
    with pytest.raises(ValueError, match="no VAE"):
        load_vae(only_dit)


@pytest.mark.parametrize(
    "lost",
    [
        "final_layer.linear.weight",
        "context_embedder.weight",
        "joint_blocks.0.context_block.attn.ln_k.weight",
        "joint_blocks.1.x_block.attn.ln_q.weight",
    ],
)
def test_a_lost_transformer_key_is_named_with_the_file(tmp_path, lost):
    model, _ = tiny_models()
    sd = dict(model.state_dict())
    del sd[lost]
    path = tmp_path / "dit.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_mmdit(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and lost in msg
    assert "unexpected" not in msg  # one lost QK-norm weight is one missing key, not QK-norm switched off


@pytest.mark.parametrize(
    "lost", ["encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down.1.block.0.conv1.weight"]
)
def test_a_lost_vae_key_is_named_with_the_file(tmp_path, lost):
    _, vae = tiny_models()
    sd = {k: v for k, v in vae.state_dict().items() if k != lost}
    path = tmp_path / "vae.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointMismatchError, match=lost) as err:
        load_vae(path, norm_groups=4)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("content", [b"", b"\x00" * 5, b"\xff" * 64])
def test_unreadable_weights_files_are_named(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    for load in (load_mmdit, load_vae, read_safetensors):
        with pytest.raises(CorruptFileError, match=r"broken\.safetensors is not a readable safetensors file"):
            load(path)


def test_only_safetensors_are_loaded(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        read_safetensors(path)
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        load_mmdit(path)


def test_diffusers_folder(tmp_path):
    model, vae = tiny_models()
    clip_l, clip_g, t5 = write_diffusers_folder(tmp_path, model, vae)

    parts = load_sd3(tmp_path, dtype=torch.float32, t5_length=12)
    for ours, theirs in ((parts.transformer, model), (parts.vae, vae)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    with torch.no_grad():  # same weights; 1-ulp differences come from how the loaded tensors are laid out
        torch.testing.assert_close(parts.transformer(*inputs(model)), model(*inputs(model)), atol=1e-6, rtol=0)
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(parts.vae.decode(z), vae.decode(z), atol=1e-6, rtol=0)
    assert parts.vae.latent_format.scale == 1.5305 and parts.vae.latent_format.shift == 0.0609
    ctx, pooled = parts.text_encoder(["a red cube"])
    assert ctx.shape == (1, 77 + 12, 96) and pooled.shape == (1, 64)
    ids = parts.text_encoder.tokenize(["a red cube"])
    assert (ids["g"][0, -1] == 0) and (ids["l"][0, -1] == 513)
    no_t5 = load_sd3(tmp_path, dtype=torch.bfloat16, load_t5=False)
    assert no_t5.text_encoder.t5 is None and no_t5.transformer.dtype == torch.bfloat16
    assert no_t5.text_encoder.clip_l.dtype == torch.bfloat16

    # official text-encoder files (bare HF-layout state dicts, CLIP-L without text_projection) + those tokenizers
    te = tmp_path / "text_encoders"
    te.mkdir()
    save_file({k: v for k, v in clip_l.state_dict().items() if "text_projection" not in k}, te / "clip_l.safetensors")
    save_file(clip_g.state_dict(), te / "clip_g.safetensors")
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    save_file(t5_sd, te / "t5xxl_fp16.safetensors")
    text = load_text_encoder(
        clip_l=te / "clip_l.safetensors",
        clip_g=te / "clip_g.safetensors",
        t5=te / "t5xxl_fp16.safetensors",
        tokenizers=tmp_path,
        configs={"clip_l": clip_l.config, "clip_g": clip_g.config, "t5": t5.config},
        t5_length=12,
    )
    assert text.clip_l_projection_is_identity()
    ctx2, pooled2 = text(["a red cube"])
    torch.testing.assert_close(ctx2, ctx)  # CLIP-L pooled is unprojected by default, so the files agree
    torch.testing.assert_close(pooled2, pooled)


def test_vae_folder_with_quant_conv_is_refused(tmp_path):
    d = diffusers.AutoencoderKL(block_out_channels=(4,), norm_num_groups=1, latent_channels=4)
    d.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="no quant convs"):
        load_vae(tmp_path / "vae")


def test_converter_rejects_foreign_keys():
    sd = transformer_official_to_diffusers(MMDiT(PRESETS["tiny"], device="meta").state_dict())
    from t2i.io.sd3 import transformer_diffusers_to_official

    with pytest.raises(ValueError, match="unrecognised"):
        transformer_diffusers_to_official({**sd, "transformer_blocks.0.foo.weight": torch.zeros(1)})
