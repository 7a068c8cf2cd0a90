"""SD3 ControlNet: the official SD3.5-Large key layout and parameter count on ``meta``, equivalence with diffusers'
``SD3ControlNetModel`` (weights through t2i's converter), loading all three file layouts, the two injection
conventions against a hand-written schedule (SD3.5 spec §1.7, §5.6), and the zero-initialised start."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from t2i.io.controlnet import controlnet_diffusers_to_official, controlnet_official_to_diffusers, detect_controlnet
from t2i.io.safetensors_io import save_weights
from t2i.models.controlnet import (
    PRESETS,
    ActiveControl,
    ControlledMMDiT,
    ControlNet,
    controlnet_config_for,
    load_controlnet,
)
from t2i.models.mmdit import PRESETS as MMDIT_PRESETS
from t2i.models.mmdit import MMDiT, controlnet_block_picker, count_parameters

pytest.importorskip("diffusers")
from diffusers import SD3ControlNetModel
from sd3_helpers import diffusers_twin, randomize_


def official_keys(depth: int) -> set[str]:
    """The SD3.5-Large ControlNet keys written out from spec §2.3, independently of the model code."""
    keys = {"control_type"}
    emb = ["pos_embed.proj", "pos_embed_input.proj"]
    emb += [f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "text_embedder") for i in (1, 2)]
    for n in range(depth):
        emb += [f"transformer_blocks.{n}.{m}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                                        "adaLN_modulation.1")]  # fmt: skip
        emb.append(f"controlnet_blocks.{n}")
    return keys | {f"{m}.{s}" for m in emb for s in ("weight", "bias")}


@pytest.mark.parametrize("kind", ["blur", "canny", "depth"])
def test_full_size_sd35_large_controlnet_on_meta(kind):
    net = ControlNet(PRESETS[f"sd3.5-large-{kind}"], device="meta")
    sd = net.state_dict()
    assert set(sd) == official_keys(19)
    D = 2432
    assert sd["transformer_blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["transformer_blocks.18.adaLN_modulation.1.weight"].shape == (6 * D, D)
    assert sd["pos_embed_input.proj.weight"].shape == (D, 16, 2, 2)
    assert sd["time_text_embed.text_embedder.linear_1.weight"].shape == (D, 2048)
    # 19 plain blocks (18D^2+15D), 19 output Linears, the t / pooled embedders, two patch embeddings
    expected = 19 * (18 * D**2 + 15 * D) + 19 * (D**2 + D) + (256 * D + 2 * D + D**2) + (2048 * D + 2 * D + D**2)
    expected += 2 * (64 * D + D)
    assert count_parameters(net) == expected == 2_153_677_056
    assert ["blur", "canny", "depth"].index(kind) == int(net.control_type)
    assert len(controlnet_official_to_diffusers(sd)) == len(sd) - 3 + 19 * 4  # q/k/v split, extras dropped


# -- equivalence with diffusers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    base = randomize_(MMDiT(replace(MMDIT_PRESETS["tiny"], depth=4))).eval()
    net = randomize_(ControlNet(replace(controlnet_config_for(base.cfg, depth=2), stored_patch_embed=False)), 1)
    return base, net.eval()


def diffusers_controlnet(net: ControlNet, base: MMDiT) -> SD3ControlNetModel:
    """The diffusers twin of ``net`` in the SD3.5 (joint-free) layout, sharing the base's patch embedding as
    diffusers' ControlNet pipeline arranges it."""
    c = net.cfg
    ref = SD3ControlNetModel(
        sample_size=base.cfg.pos_embed_base_size * c.patch_size, patch_size=c.patch_size,
        in_channels=c.in_channels, num_layers=c.depth, attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads, joint_attention_dim=None, caption_projection_dim=c.hidden_size,
        pooled_projection_dim=c.pooled_dim, out_channels=c.in_channels, pos_embed_max_size=None,
        pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False,
    )  # fmt: skip
    sd = {k: v for k, v in net.state_dict().items() if k != "control_type"}
    ref.load_state_dict(controlnet_official_to_diffusers(sd), strict=True)
    ref.pos_embed = ref._get_pos_embed_from_transformer(diffusers_twin(base))
    return ref.eval()


def test_controlnet_matches_diffusers(tiny):
    base, net = tiny
    ref = diffusers_controlnet(net, base)
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 4, 12, 8, generator=g)
    pooled, t = torch.randn(2, 64, generator=g), torch.tensor([870.5, 12.25])
    with torch.no_grad():
        ours = net(base.embed_patches(x), cond, t, pooled, scale=0.7)
        theirs = ref(hidden_states=x, controlnet_cond=cond, conditioning_scale=0.7, pooled_projections=pooled,
                     timestep=t, return_dict=False)[0]  # fmt: skip
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_key_conversion_round_trips_and_detects(tiny):
    _, net = tiny
    sd = {k: v for k, v in net.state_dict().items() if k != "control_type"}
    back = controlnet_diffusers_to_official(controlnet_official_to_diffusers(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    params = detect_controlnet(net.state_dict(), head_dim=8)
    assert params["depth"] == 2 and params["num_heads"] == 4 and params["control_type"] == "canny"
    with pytest.raises(ValueError, match="SD3-Medium-style"):
        controlnet_diffusers_to_official({**controlnet_official_to_diffusers(sd), "context_embedder.weight": sd[
            "controlnet_blocks.0.weight"]})  # fmt: skip
    with pytest.raises(ValueError, match="incomplete or another model"):
        detect_controlnet({"x.weight": torch.zeros(1)})


def test_loads_official_file_diffusers_folder_and_model_file(tiny, tmp_path):
    base, net = tiny
    # an official-layout file: t2i's own state dict with the reference's extra tensors, at head size 64
    full = ControlNet(replace(PRESETS["tiny"], num_heads=1, head_dim=64, control_type="depth"))
    save_weights(tmp_path / "sd3.5_controlnet_depth.safetensors", full.state_dict())
    loaded = load_controlnet(tmp_path / "sd3.5_controlnet_depth.safetensors")
    assert loaded.cfg.control_type == "depth" and loaded.cfg.input_range == "reference"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.state_dict().items())
    # a diffusers folder written by diffusers itself (head size 8 is not the released 64: its config says so)
    diffusers_controlnet(net, base).save_pretrained(tmp_path / "my-blur-controlnet")
    folder = load_controlnet(tmp_path / "my-blur-controlnet")
    assert folder.cfg.control_type == "blur" and folder.cfg.input_range == "signed"  # kind from the folder name
    assert folder.cfg.stored_patch_embed  # the pipeline-attached base patch embedding was saved with it
    for k, v in net.state_dict().items():
        if k != "control_type":
            torch.testing.assert_close(folder.state_dict()[k], v)
    cfg = json.loads((tmp_path / "my-blur-controlnet" / "config.json").read_text())
    (tmp_path / "my-blur-controlnet" / "config.json").write_text(json.dumps({**cfg, "joint_attention_dim": 32}))
    with pytest.raises(ValueError, match="SD3-Medium-style"):
        load_controlnet(tmp_path / "my-blur-controlnet")
    with pytest.raises(FileNotFoundError, match="no ControlNet"):
        load_controlnet(tmp_path / "missing.safetensors")


# -- injection: the two conventions, checked against the spec's rule written out by hand ---------------------------


def test_reference_layout_is_every_block_pair_including_the_last():
    pick = controlnet_block_picker(38, 19, "reference")
    assert [pick(i) for i in range(38)] == [k for k in range(19) for _ in range(2)]  # cn[18] after blocks 36, 37
    dif = controlnet_block_picker(38, 19, "diffusers")
    assert [dif(i) for i in range(38)] == [*[k for k in range(19) for _ in range(2)][:-1], None]
    uneven = controlnet_block_picker(24, 5, "diffusers")  # float interval 4.8
    assert [uneven(i) for i in range(24)] == [*[int(i / 4.8) for i in range(23)], None]
    with pytest.raises(ValueError, match="cannot spread"):
        controlnet_block_picker(5, 2, "reference")  # block 4 would need residual 2
    with pytest.raises(ValueError, match="controlnet_layout"):
        controlnet_block_picker(4, 2, "comfy")


def test_injection_matches_a_hand_computed_forward(tiny):
    """Residual k after blocks 2k and 2k + 1 (reference) or not after the last (diffusers), written out here as a
    plain loop over the base's blocks, independently of MMDiT.forward's bookkeeping."""
    base, _ = tiny
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 4, 6, 6, generator=g), torch.tensor([400.0])
    ctx, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)
    res = [torch.randn(1, 36, base.cfg.hidden_size, generator=g) for _ in range(2)]
    with torch.no_grad():
        c = base.t_embedder(t) + base.y_embedder(pooled)
        for layout, table in (("reference", [0, 0, 1, 1]), ("diffusers", [0, 0, 1, None])):
            h, cx = base.embed_patches(x), base.context_embedder(ctx)
            for i, block in enumerate(base.joint_blocks):
                cx, h = block(cx, h, c)
                h = h if table[i] is None else h + res[table[i]]
            out = base.final_layer(h, c).view(1, 6, 6, 1, 1, 4).permute(0, 5, 1, 3, 2, 4).reshape(1, 4, 6, 6)
            got = base(x, t, ctx, pooled, controlnet_residuals=res, controlnet_layout=layout)
            torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
        # a skipped block takes its residual with it in the reference, not in diffusers
        skip_ref = base(x, t, ctx, pooled, skip_layers=(1,), controlnet_residuals=res)
        skip_dif = base(x, t, ctx, pooled, skip_layers=(1,), controlnet_residuals=res, controlnet_layout="diffusers")
        assert (skip_ref - skip_dif).abs().max() > 1e-4


def test_a_fresh_controlnet_changes_nothing_until_trained(tiny):
    base, _ = tiny
    net = ControlNet(controlnet_config_for(base.cfg, depth=2))
    net.init_from_base(base)
    torch.testing.assert_close(net.transformer_blocks[1].attn.qkv.weight, base.joint_blocks[1].x_block.attn.qkv.weight)
    model = ControlledMMDiT(base, [ActiveControl(net, 1.0)])
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0])
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        plain = base(x, t, ctx, pooled)
        controlled = model(x, t, ctx, pooled, control_latents=torch.randn(2, 1, 4, 8, 8, generator=g))
    torch.testing.assert_close(controlled, plain, atol=0, rtol=0)  # zero output Linears: exactly the base
    loss = model(x, t, ctx, pooled, control_latents=torch.randn(2, 1, 4, 8, 8)).square().mean()
    loss.backward()
    assert net.controlnet_blocks[0].weight.grad.abs().sum() > 0  # and yet it can learn
