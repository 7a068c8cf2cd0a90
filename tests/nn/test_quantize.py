"""Weight-only int8 quantization (torchao): which layers, how close to full precision, and offload on top."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("torchao")

from t2i.models.mmdit import PRESETS, MMDiT
from t2i.nn.quantize import quantize_weights, quantized_linears
from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset


def _model(seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    cfg = replace(PRESETS["tiny-x"], num_heads=2, head_dim=32, patch_size=2)  # width 64: linears worth quantizing
    model = MMDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:  # zero-initialised output layers would hide a wrong wiring
                p.normal_(0, 0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.8]),
            {"context": torch.randn(2, 7, 32, generator=g), "pooled": torch.randn(2, 64, generator=g)})  # fmt: skip


def test_int8_weights_stay_close_to_full_precision():
    full, quant = _model(), quantize_weights(_model(), "int8")
    n = quantized_linears(quant)
    wide = sum(isinstance(m, torch.nn.Linear) and m.in_features >= 64 for m in full.modules())
    assert n == wide > 0 and quantized_linears(full) == 0
    x, t, cond = _inputs()
    with torch.no_grad():
        a, b = full(x, t, **cond), quant(x, t, **cond)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.02, rel  # int8 per-row scales: well under one percent here


def test_quantized_pipeline_composes_with_offload_and_refuses_unknown_modes():
    cond = _inputs()[2]
    emb = {"context": cond["context"], "pooled": cond["pooled"]}
    plain = SD3Pipeline(_model(), preset=SD3Preset(steps=2, guidance=1.0))(**emb, seeds=[0, 1], height=64, width=64,
                                                                           output="latent")  # fmt: skip
    pipe = SD3Pipeline(_model(), preset=SD3Preset(steps=2, guidance=1.0), quantize="int8", offload=True, device="cpu")
    out = pipe(**emb, seeds=[0, 1], height=64, width=64, output="latent")
    assert quantized_linears(pipe.transformer) > 0
    assert ((out - plain).norm() / plain.norm()).item() < 0.02
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_weights(_model(), "int4")


def test_generate_quantize_flag(tmp_path):
    from model_folders import tiny_sd3_folder, tiny_unclip_folder

    from t2i.cli.main import main

    sd3 = str(tiny_sd3_folder(tmp_path / "sd3"))
    assert main(["generate", "a red circle", "--model", sd3, "--quantize", "int8", "--steps", "2", "-o",
                 str(tmp_path / "o"), "--quiet", "--no-sheet"]) == 0  # fmt: skip
    assert (tmp_path / "o" / "000-0-a-red-circle.png").is_file()
    unclip = str(tiny_unclip_folder(tmp_path / "unclip"))
    assert main(["generate", "a red circle", "--model", unclip, "--quantize", "int8", "-o", str(tmp_path / "u")]) == 2
