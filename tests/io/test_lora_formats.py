"""LoRA files across layouts: t2i <-> kohya <-> diffusers/peft, checked by the outputs of both implementations."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sd3_helpers import diffusers_twin, randomize_

from t2i.io.lora import convert_lora, detect_format, load_lora, save_lora, sd3_from_diffusers
from t2i.models.mmdit import PRESETS, MMDiT
from t2i.nn.lora import LoRALinear, inject_lora, load_lora_state_dict, lora_state_dict

TARGETS = ["attn.qkv", "attn.proj", "attn2.qkv", "mlp.fc1", "adaLN_modulation.1"]


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 6, 4, generator=g)
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g)
    return x, torch.tensor([999.0, 123.4]), ctx, pooled


def _models():
    cfg = replace(PRESETS["tiny-x"], patch_size=1)
    base = randomize_(MMDiT(cfg)).eval()
    twin = diffusers_twin(base)  # made before injection: the diffusers model knows nothing of the adapter
    model = randomize_(MMDiT(cfg)).eval()
    model.load_state_dict(base.state_dict())
    inject_lora(model, TARGETS, rank=2, alpha=3.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_up["default"].weight.normal_(0, 0.2, generator=g)
    return cfg, base, twin, model


def test_t2i_lora_exported_to_diffusers_gives_the_same_output():
    cfg, base, twin, model = _models()
    x, t, ctx, pooled = _inputs(cfg)
    native = lora_state_dict(model)
    state = convert_lora(native, "diffusers")
    assert detect_format(state) == "diffusers" and any(".attn.to_q.lora_A." in k for k in state)
    twin.load_lora_adapter(state, prefix="transformer", adapter_name="t2i")
    with torch.no_grad():
        ours = model(x, t, ctx, pooled)
        theirs = twin(x, ctx, pooled, t).sample
        plain = base(x, t, ctx, pooled)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_diffusers_lora_with_separate_qkv_loads_into_t2i():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg, base, twin, _ = _models()
    twin.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "add_v_proj", "to_out.0"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2, generator=g)  # distinct A per q/k/v: the fused adapter needs stacked A
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(twin).items()}
    native = sd3_from_diffusers(state)
    assert native["joint_blocks.0.x_block.attn.qkv.lora_down.weight"].shape[0] == 4  # to_q + to_k, rank 2 each
    model = randomize_(MMDiT(cfg)).eval()
    model.load_state_dict(base.state_dict())
    load_lora_state_dict(model, native)
    x, t, ctx, pooled = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, pooled), twin(x, ctx, pooled, t).sample, atol=2e-5, rtol=1e-5)


def test_round_trips_through_every_layout(tmp_path):
    _, _, _, model = _models()
    native = lora_state_dict(model)
    names = [n for n, _ in model.named_modules()]
    kohya = convert_lora(native, "kohya")
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    back = convert_lora(kohya, "t2i", module_names=names)
    assert set(back) == set(native) and all(torch.equal(back[k], native[k]) for k in native)
    with pytest.raises(ValueError, match="module names"):
        convert_lora(kohya, "t2i")
    # diffusers and back: alpha is folded into up, so compare the products, not the tensors
    again = convert_lora(convert_lora(native, "diffusers"), "t2i")
    for m in {k.rsplit(".", 2)[0] for k in native if k.endswith("lora_down.weight")}:

        def delta(sd, m=m):
            r = sd[f"{m}.lora_down.weight"].shape[0]
            return float(sd[f"{m}.alpha"]) / r * sd[f"{m}.lora_up.weight"] @ sd[f"{m}.lora_down.weight"]

        torch.testing.assert_close(delta(again), delta(native), atol=1e-6, rtol=1e-6)
    save_lora(tmp_path / "a.safetensors", kohya, metadata={"base": "tiny-x"})
    loaded, meta = load_lora(tmp_path / "a.safetensors")
    assert meta["t2i_lora_format"] == "kohya" and meta["base"] == "tiny-x" and set(loaded) == set(kohya)
    with pytest.raises(ValueError, match="safetensors only"):
        load_lora(tmp_path / "a.pt")


def test_fast_path_applies_adapters_everywhere():
    cfg, _, _, model = _models()
    x, t, ctx, pooled = _inputs(cfg)
    with torch.no_grad():
        plain = model(x, t, ctx, pooled)
        model.set_fast_path(True)
        fast = model(x, t, ctx, pooled)
    torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-5)


def test_diffusers_lora_alpha_and_patterns_from_the_file_metadata(tmp_path):
    """A file saved by diffusers with lora_alpha != r, an alpha_pattern and a rank_pattern loads at the strength
    diffusers' own loader applies (its scales live only in the file's ``lora_adapter_metadata``)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg, base, twin, _ = _models()
    config = LoraConfig(r=2, lora_alpha=5, rank_pattern={"to_k": 4}, alpha_pattern={"to_out.0": 1, "to_k": 8},
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"])  # fmt: skip
    twin.add_adapter(config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2, generator=g)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(twin),
        transformer_lora_adapter_metadata=twin.peft_config["default"].to_dict(),
    )  # fmt: skip
    state, meta = load_lora(next(tmp_path.glob("*.safetensors")))
    assert "lora_adapter_metadata" in meta
    model = randomize_(MMDiT(cfg)).eval()
    model.load_state_dict(base.state_dict())
    load_lora_state_dict(model, convert_lora(state, "t2i", metadata=meta))
    x, t, ctx, pooled = _inputs(cfg)
    with torch.no_grad():
        theirs = twin(x, ctx, pooled, t).sample
        torch.testing.assert_close(model(x, t, ctx, pooled), theirs, atol=2e-5, rtol=1e-5)
        # without the metadata every scale would be 1: a visibly different model
        unscaled = randomize_(MMDiT(cfg)).eval()
        unscaled.load_state_dict(base.state_dict())
        load_lora_state_dict(unscaled, convert_lora(state, "t2i"))
        assert (unscaled(x, t, ctx, pooled) - theirs).abs().max() > 1e-3
