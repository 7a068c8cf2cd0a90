"""MMDiT / MMDiT-X: official key layouts and parameter counts on ``meta``, and equivalence with diffusers'
``SD3Transformer2DModel`` loaded with weights converted by t2i's own converter (SD3.5 spec §7.2, T1-T3)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from t2i.io.sd3 import detect_transformer, transformer_diffusers_to_official, transformer_official_to_diffusers
from t2i.models.mmdit import PRESETS, MMDiT, TanhGELU, count_parameters, sincos_pos_embed_2d, timestep_embedding

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from sd3_helpers import diffusers_twin, randomize_  # noqa: E402


def inputs(cfg, dtype=torch.float32, h=12, w=8, ctx_len=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g, dtype=dtype)
    ctx = torch.randn(2, ctx_len, cfg.context_dim, generator=g, dtype=dtype)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g, dtype=dtype)
    t = torch.tensor([999.0, 123.4], dtype=dtype)  # fractional and different per sample
    return x, t, ctx, pooled


# -- full-size presets on meta: official key layouts, shapes and parameter counts ---------------------------------


def official_keys(depth: int, qk: bool, dual: tuple[int, ...]) -> set[str]:
    """The official key list written out from the spec's §2.1 template, independently of the model code."""
    keys = {"pos_embed", "context_embedder.weight", "context_embedder.bias"}
    for m in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2"):
        keys |= {f"{m}.weight", f"{m}.bias"}
    keys |= {f"final_layer.{m}.{s}" for m in ("linear", "adaLN_modulation.1") for s in ("weight", "bias")}
    for n in range(depth):
        for stream in ("context_block", "x_block"):
            pre_only = stream == "context_block" and n == depth - 1
            mods = ["attn.qkv", "adaLN_modulation.1"] + ([] if pre_only else ["attn.proj", "mlp.fc1", "mlp.fc2"])
            if stream == "x_block" and n in dual:
                mods += ["attn2.qkv", "attn2.proj"]
            keys |= {f"joint_blocks.{n}.{stream}.{m}.{s}" for m in mods for s in ("weight", "bias")}
            if qk:
                norms = ["attn.ln_q", "attn.ln_k"]
                if stream == "x_block" and n in dual:
                    norms += ["attn2.ln_q", "attn2.ln_k"]
                keys |= {f"joint_blocks.{n}.{stream}.{m}.weight" for m in norms}
    return keys


@pytest.mark.parametrize(
    "name, params, nkeys, dkeys, P, dual",
    [
        ("sd3.5-large", 8_056_627_520, 923, 1227, 192, ()),
        ("sd3.5-medium", 2_243_171_520, 665, 909, 384, tuple(range(13))),
        ("sd3-medium", 2_028_328_000, 491, 683, 192, ()),
    ],
)
def test_full_size_presets_match_official_layout(name, params, nkeys, dkeys, P, dual):
    model = MMDiT(PRESETS[name], device="meta")
    sd = model.state_dict()
    assert count_parameters(model) == params
    assert len(sd) == nkeys
    cfg = PRESETS[name]
    assert set(sd) == official_keys(cfg.depth, cfg.qk_norm == "rms", dual)
    D = 64 * cfg.depth
    assert sd["pos_embed"].shape == (1, P * P, D)
    assert sd["x_embedder.proj.weight"].shape == (D, 16, 2, 2)
    assert sd["context_embedder.weight"].shape == (D, 4096)
    assert sd["y_embedder.mlp.0.weight"].shape == (D, 2048)
    assert sd["final_layer.linear.weight"].shape == (64, D)
    assert sd[f"joint_blocks.{cfg.depth - 1}.context_block.adaLN_modulation.1.weight"].shape == (2 * D, D)
    n_x0 = 9 if dual else 6
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (n_x0 * D, D)
    # the diffusers layout has the spec's key count, and detection recovers the preset from keys and shapes
    assert len(transformer_official_to_diffusers(sd)) == dkeys
    detected = detect_transformer(sd)
    assert detected["name"] == name
    explicit = replace(cfg, num_heads=cfg.heads, out_channels=cfg.out_ch)
    assert replace(cfg, **detected["params"]) == explicit


def test_per_block_parameter_counts():
    # spec §1.8: "3.5-L block 0 = 212,999,680 and block 37 = 136,085,248; 3.5-M block 0 = 101,506,944, block 13 = ..."
    large = MMDiT(PRESETS["sd3.5-large"], device="meta")
    medium = MMDiT(PRESETS["sd3.5-medium"], device="meta")
    assert count_parameters(large.joint_blocks[0]) == 212_999_680
    assert count_parameters(large.joint_blocks[37]) == 136_085_248
    assert count_parameters(medium.joint_blocks[0]) == 101_506_944
    assert count_parameters(medium.joint_blocks[13]) == 84_980_992


def test_meta_keys_match_diffusers_meta_model():
    # diffusers' own SD3.5-Medium on meta: same keys and shapes as ours converted (this checks the converter too)
    cfg = PRESETS["sd3.5-medium"]
    with torch.device("meta"):
        ref = SD3Transformer2DModel(
            sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        )  # fmt: skip
    ours = transformer_official_to_diffusers(MMDiT(cfg, device="meta").state_dict())
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_build_on_any_dtype_and_meta():
    m = MMDiT(PRESETS["tiny-x"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters()) and m.pos_embed.dtype == torch.bfloat16
    meta = MMDiT(PRESETS["tiny-x"], device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.load_state_dict(m.state_dict(), assign=True)  # meta -> real without an fp32 copy
    assert not any(p.is_meta for p in meta.parameters()) and meta.dtype == torch.bfloat16


# -- T1: embeddings, crop, unpatchify -------------------------------------------------------------------------------


def test_timestep_and_pos_embedding_match_diffusers():
    from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed

    t = torch.tensor([0.0, 3.5, 999.0, 123.4])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    torch.testing.assert_close(timestep_embedding(t), ref, atol=1e-6, rtol=0)
    for dim, grid, base in ((32, 96, 32), (64, 16, 8)):
        theirs = get_2d_sincos_pos_embed(dim, grid, base_size=base, output_type="pt").float()
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid, base), theirs, atol=1e-6, rtol=0)


def test_pos_embed_too_large_raises_clear_error():
    cfg = replace(PRESETS["tiny"], pos_embed_max_size=8)
    m = MMDiT(cfg)
    x, t, ctx, pooled = inputs(cfg, h=8, w=8)
    m(x, t, ctx, pooled)  # exactly the grid: fine
    with pytest.raises(ValueError, match="generate a smaller image"):
        m(inputs(cfg, h=10, w=8)[0], t, ctx, pooled)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        MMDiT(replace(cfg, patch_size=2))(inputs(cfg, h=7, w=8)[0], t, ctx, pooled)


# -- T2/T3: converter round trip and forward equivalence with diffusers ---------------------------------------------


@pytest.mark.parametrize("name, patch", [("tiny", 1), ("tiny-x", 1), ("tiny-x", 2)])
def test_forward_matches_diffusers_fp32(name, patch):
    cfg = replace(PRESETS[name], patch_size=patch)
    model = randomize_(MMDiT(cfg)).eval()
    ref = diffusers_twin(model)
    back = transformer_diffusers_to_official(ref.state_dict())  # T2: exact round trip
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    x, t, ctx, pooled = inputs(cfg)  # non-square 12x8 latent, per-sample fractional t
    with torch.no_grad():
        for skip in ((), (1,), (cfg.depth - 1,)):
            ours = model(x, t, ctx, pooled, skip_layers=skip)
            theirs = ref(x, ctx, pooled, t, skip_layers=list(skip) or None).sample
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # measured <= 1e-6


def test_forward_matches_diffusers_fp64_and_bf16():
    cfg = replace(PRESETS["tiny-x"], patch_size=2)
    model = randomize_(MMDiT(cfg))
    ref = diffusers_twin(model)
    x, t, ctx, pooled = inputs(cfg)
    with torch.no_grad():
        ours = model.double()(x.double(), t.double(), ctx.double(), pooled.double())
        theirs = ref.double()(x.double(), ctx.double(), pooled.double(), t.double()).sample
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=0)  # measured 1.3e-8 (fp32 sinusoid)
        ours = model.bfloat16()(x, t, ctx, pooled).float()
        theirs = ref.bfloat16()(x.bfloat16(), ctx.bfloat16(), pooled.bfloat16(), t).sample.float()
        assert (ours - theirs).abs().max() < 5e-2  # bf16 rounding of two different op orders; outputs O(1)


def test_tanh_gelu_is_exact_in_fp32_and_within_bf16_rounding_in_bf16():
    x = torch.linspace(-8, 8, 20001)
    act = TanhGELU()
    assert torch.equal(act(x), torch.nn.functional.gelu(x, approximate="tanh"))  # fp32: the reference's form
    ref = torch.nn.functional.gelu(x.bfloat16().double(), approximate="tanh")  # fp64 tanh form on the bf16 inputs
    err = (act(x.bfloat16()).double() - ref).abs()
    assert act(x.bfloat16()).dtype == torch.bfloat16
    assert err.max() < 8.5e-3  # measured 8.2e-3; PyTorch's own bf16 tanh kernel: 7.8e-3
    assert (err / ref.abs().clamp_min(1)).max() < 2**-7  # within one bf16 rounding step of the value


def test_grad_checkpointing_and_grads_reach_every_parameter():
    cfg = replace(PRESETS["tiny-x"], depth=2)
    model = randomize_(MMDiT(cfg))
    x, t, ctx, pooled = inputs(cfg, h=4, w=6)
    model(x, t, ctx, pooled).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    dead = {n for n, g in grads.items() if g.abs().sum() == 0}
    # the last block's context queries only feed context outputs, which that block discards (as in the official
    # model): their QK-norm weight is the one parameter without a gradient
    assert dead == {f"joint_blocks.{cfg.depth - 1}.context_block.attn.ln_q.weight"}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x, t, ctx, pooled).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_training_init_is_adaln_zero():
    model = MMDiT(PRESETS["tiny"])
    x, t, ctx, pooled = inputs(PRESETS["tiny"])
    assert model(x, t, ctx, pooled).abs().max() == 0  # zero output layer: training starts from v = 0
    assert not torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))


def test_detect_transformer_tiny_custom():
    model = MMDiT(PRESETS["tiny-x"], device="meta")
    det = detect_transformer(transformer_official_to_diffusers(model.state_dict()))
    assert det["name"] == "custom"
    assert det["params"]["head_dim"] == 8 and det["params"]["x_block_self_attn_layers"] == (0,)
    with pytest.raises(ValueError, match="not an SD3 transformer"):
        detect_transformer({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)})
    assert re.match(r"custom", det["name"])


@pytest.mark.slow
def test_full_size_sd35_medium_matches_diffusers_256px():
    """Full SD3.5-Medium config, random weights, fp32, 256x256 px (32x32 latent) against diffusers.

    diffusers' model is built on ``meta`` and takes views of t2i's tensors (``assign=True``), so the two 2.2B
    models share one copy of the weights (about 10 GB instead of 20).
    """
    cfg = PRESETS["sd3.5-medium"]
    model = MMDiT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("adaLN" in name or name.startswith("final_layer.linear")) and name.endswith("weight"):
                p.normal_(0, 0.02, generator=g)  # zero in the training init, which would hide everything
            elif name.endswith("bias"):
                p.normal_(0, 0.1, generator=g)
            elif name.endswith(("ln_q.weight", "ln_k.weight")):
                p.normal_(1, 0.1, generator=g)
    with torch.device("meta"):
        ref = SD3Transformer2DModel(
            sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        )  # fmt: skip
    ref.load_state_dict(transformer_official_to_diffusers(model.state_dict()), strict=True, assign=True)
    ref.eval()
    x, t, ctx, pooled = inputs(cfg, h=32, w=32, ctx_len=154 + 77)
    with torch.no_grad():
        for skip in ((), (7, 8, 9)):
            ours = model(x[:1], t[1:], ctx[:1], pooled[:1], skip_layers=skip)
            theirs = ref(x[:1], ctx[:1], pooled[:1], t[1:], skip_layers=list(skip) or None).sample
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            print(f"skip_layers={skip}: max |diff| {(ours - theirs).abs().max().item():.3g}, relative L2 {rel:.3g}")
            assert theirs.std() > 0.1  # a non-trivial output
            assert rel < 1e-5, rel


@pytest.mark.parametrize("name", ["tiny", "tiny-x"])
def test_fast_path_equals_plain_path(name):
    cfg = replace(PRESETS[name], patch_size=2, depth=3, x_block_self_attn_layers=(0, 2) if name == "tiny-x" else ())
    model = randomize_(MMDiT(cfg))
    x, t, ctx, pooled = inputs(cfg)
    plain = model(x, t, ctx, pooled, skip_layers=(1,))
    plain.square().mean().backward()
    grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # noqa: E731 (skipped/unused: None)
    grads = {n: grad(p).clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_fast_path(True)
    fast = model(x, t, ctx, pooled, skip_layers=(1,))
    fast.square().mean().backward()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grad(p), grads[n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():  # and in bf16 it agrees with diffusers as closely as the plain path does
        ref = diffusers_twin(model)
        ours = model.bfloat16()(x, t, ctx, pooled).float()
        theirs = ref.bfloat16()(x.bfloat16(), ctx.bfloat16(), pooled.bfloat16(), t).sample.float()
        assert (ours - theirs).abs().max() < 5e-2
