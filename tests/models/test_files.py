"""The one model-file format: round trips, the tokenizer of CLIP files, older files, and trained-run loading."""

from __future__ import annotations

import pytest
import torch
from model_folders import tiny_clip

from t2i.models.files import clip_extra, load_model_file, load_trained, model_file_name, save_model_file


def test_model_file_round_trip_keeps_config_and_fp16_weights(tmp_path):
    from t2i.models import build_model

    net = build_model("unclip_prior", dict(embed_dim=16, depth=1, heads=2, head_dim=8))
    save_model_file(tmp_path / "p.safetensors", "unclip_prior", net, note={"a": 1})
    back, extra = load_model_file(tmp_path / "p.safetensors")
    assert extra == {"note": {"a": 1}}
    assert back.cfg == net.cfg and not back.training
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items(), strict=True):
        assert b.dtype == torch.float32, k
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)


def test_clip_file_keeps_its_tokenizer(tmp_path):
    clip = tiny_clip()
    save_model_file(tmp_path / "c.safetensors", "clip", clip, **clip_extra(clip))
    back, _ = load_model_file(tmp_path / "c.safetensors")
    assert back.tokenizer.vocab == clip.tokenizer.vocab
    ids, _ = back.tokenize(["a red circle"])
    torch.testing.assert_close(ids, clip.tokenize(["a red circle"])[0])
    with torch.no_grad():
        a = clip.embed_text(["a red circle"])[0]
        b = back.embed_text(["a red circle"])[0]
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # fp16 storage


def test_load_model_file_refuses_other_files(tmp_path):
    from t2i.io import save_weights

    save_weights(tmp_path / "x.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a t2i model file"):
        load_model_file(tmp_path / "x.safetensors")


def test_files_written_before_the_one_format_still_load(tmp_path):
    """``Unet.save`` used to write a ``t2i_model: unet`` key; such files load as ``unclip_unet`` models."""
    import dataclasses
    import json

    from t2i.io import save_weights
    from t2i.models import build_model
    from t2i.models.unet import Unet

    net = build_model(
        "unclip_unet",
        dict(
            dim=8,
            dim_mults=(1, 2),
            num_res_blocks=1,
            attn_levels=(False, True),
            self_attn=(False, False),
            groups=4,
            heads=2,
            head_dim=8,
        ),
    )
    meta = {"t2i_model": "unet", "model_config": json.dumps(dataclasses.asdict(net.cfg), sort_keys=True)}
    save_weights(tmp_path / "old.safetensors", net.state_dict(), metadata=meta)
    assert model_file_name(tmp_path / "old.safetensors") == "unclip_unet"
    back = Unet.load(tmp_path / "old.safetensors")
    assert back.cfg == net.cfg and back.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    assert load_trained(tmp_path / "old.safetensors", "unclip_unet").cfg == net.cfg
    with pytest.raises(ValueError, match="not written by a 'vqgan'"):
        load_trained(tmp_path / "old.safetensors", "vqgan")


def test_savable_models_write_the_one_format_in_full_precision(tmp_path):
    from t2i.io import read_metadata
    from t2i.models.prior import PriorNetwork

    net = PriorNetwork(embed_dim=16, depth=1, heads=2, head_dim=8)
    net.save(tmp_path / "p.safetensors")
    assert read_metadata(tmp_path / "p.safetensors")["t2i_component"] == "unclip_prior"
    back, _ = load_model_file(tmp_path / "p.safetensors", expect="unclip_prior")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)  # fp32 kept: no fp16 rounding
    with pytest.raises(ValueError, match="holds a 'unclip_prior' model, not a 'vqgan'"):
        load_model_file(tmp_path / "p.safetensors", expect="vqgan")
