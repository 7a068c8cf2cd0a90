"""The unCLIP cascade: wiring, stage specs, partial runs, low-res augmentation, variations, interpolation,
text-diff edits and inpainting (pixel and latent stages), all with tiny random models on the CPU."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion import Seeds, VPPath
from t2i.models.clip import CLIP_PRESETS, ClipEncoder, WordTokenizer
from t2i.models.prior import PriorNetwork
from t2i.models.unet import Unet
from t2i.models.vqgan import VQGAN
from t2i.pipelines.unclip import DecoderStage, LowresAugment, PriorSpec, UnCLIPPipeline, run_stage, slerp

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def unet(**kw) -> Unet:
    base = dict(
        dim=8,
        dim_mults=(1, 2),
        num_res_blocks=1,
        attn_levels=(False, True),
        self_attn=(False, False),
        heads=2,
        head_dim=8,
        groups=4,
        image_embed_dim=32,
    )
    base.update(kw)
    return randomize(Unet(**base))


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = WordTokenizer.build([*PROMPTS, "a green triangle", "a yellow square"], context_length=8)
    clip = ClipEncoder.from_config(CLIP_PRESETS["tiny"], tok).eval()
    prior = PriorNetwork(embed_dim=32, depth=1, heads=2, head_dim=8, text_token_dim=32, max_text_len=8).eval()
    base = unet(text_embed_dim=32)
    sr = unet(lowres_cond=True, lowres_noise_cond=True, self_cond=True)
    return clip, prior, base, sr


def make_pipe(parts, **kw):
    clip, prior, base, sr = parts
    path = VPPath("cosine", 100)
    stages = [
        DecoderStage(base, 8, path, "eps", sampler="ddim", steps=3, guidance=2.0),
        DecoderStage(sr, 16, path, "v", sampler="ddpm", steps=2, lowres=LowresAugment(8)),
    ]
    return UnCLIPPipeline(clip, PriorSpec(prior, path, "x0", steps=3, guidance=2.0), stages, **kw)


def images(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_text_to_image_shapes_determinism_and_seeds(parts):
    pipe = make_pipe(parts)
    out = pipe(PROMPTS, seed=5)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, pipe(PROMPTS, seed=5), rtol=0, atol=0)
    # image k depends on its own seed only: prompt 1 alone with seed 6 reproduces it
    torch.testing.assert_close(pipe(PROMPTS[1:], seed=6)[0], out[1], rtol=1e-5, atol=1e-5)


def test_cascade_keeps_the_users_modules_and_weights(parts):
    _, _, base, sr = parts
    before = {k: v.clone() for k, v in sr.state_dict().items()}
    pipe = make_pipe(parts)
    pipe(PROMPTS[:1])
    assert pipe.stages[0].net is base and pipe.stages[1].net is sr
    for k, v in sr.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_stage_specs_are_validated_not_rebuilt(parts):
    clip, _, base, _ = parts
    path = VPPath("cosine", 100)
    with pytest.raises(ValueError, match="build the Unet with lowres_cond=True"):
        DecoderStage(unet(), 16, path, lowres=LowresAugment(8))
    with pytest.raises(ValueError, match="lowres_cond=False"):
        DecoderStage(unet(lowres_cond=True), 8, path)
    with pytest.raises(ValueError, match="unknown sampler"):
        DecoderStage(base, 8, path, sampler="magic")
    with pytest.raises(ValueError, match="text_words needs a Unet that attends to text"):
        DecoderStage(unet(), 8, path, text_words=True)
    with pytest.raises(ValueError, match="image_embed_dim=12"):
        UnCLIPPipeline(clip, None, [DecoderStage(unet(image_embed_dim=12), 8, path)])
    sr = DecoderStage(unet(lowres_cond=True), 16, path, lowres=LowresAugment(4))
    with pytest.raises(ValueError, match="lowres_size equal the previous size"):
        UnCLIPPipeline(clip, None, [DecoderStage(base, 8, path), sr])


def test_partial_runs(parts):
    pipe = make_pipe(parts)
    embed = pipe.embed_images(images())
    seeds = Seeds([3, 4])
    full = pipe.decode(embed, seeds=seeds)
    base = pipe.decode(embed, seeds=seeds, stop_stage=0)
    assert base.shape == (2, 3, 8, 8)
    # starting at stage 1 from stage 0's output gives exactly the full run
    torch.testing.assert_close(pipe.decode(embed, seeds=seeds, start_stage=1, image=base), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs image="):
        pipe.decode(embed, seeds=seeds, start_stage=1)


def test_offload_moves_each_stage_and_puts_it_back(parts):
    pipe = make_pipe(parts, device="cpu", offload=True)
    seen = []
    sr = pipe.stages[1].net
    handle = sr.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).device.type))
    try:
        out = pipe.variations(images(1))
    finally:
        handle.remove()
    assert out.shape == (1, 3, 16, 16) and seen and set(seen) == {"cpu"}
    assert next(sr.parameters()).device.type == "cpu"


def test_guidance_changes_the_result(parts):
    clip, _, base, _ = parts
    embed = clip.embed_image(images(1))
    path = VPPath("cosine", 100)
    plain = run_stage(DecoderStage(base, 8, path, steps=3, guidance=1.0), image_embed=embed, seeds=Seeds([0]))
    guided = run_stage(DecoderStage(base, 8, path, steps=3, guidance=4.0), image_embed=embed, seeds=Seeds([0]))
    assert not torch.allclose(plain, guided)


def test_lowres_augmentation():
    aug = LowresAugment(4, blur_prob=0.0, max_train_level=0.0)
    x = images(2, size=8)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    low, level = aug.train(x, gens)
    expect = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(x, size=4, mode="area"), size=8, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(low, expect)  # level 0, no blur: just down and up
    assert (level == 0).all()
    aug = LowresAugment(4, blur_prob=1.0, max_train_level=0.5)
    low, level = aug.train(x, [torch.Generator().manual_seed(i) for i in range(2)])
    assert ((level >= 0) & (level <= 0.5)).all() and not torch.allclose(low, expect)
    low, level = aug.sample(x[:, :, ::2, ::2], 8, Seeds([0, 1]))
    assert low.shape == (2, 3, 8, 8) and (level == 0.2).all()
    with pytest.raises(ValueError):
        LowresAugment(4, sample_level=2.0)


def test_slerp():
    a, b = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1).chunk(2)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=0)
    torch.testing.assert_close(slerp(a, b, 0.5).norm(dim=-1), torch.ones(1))


def test_variations_and_interpolation_endpoints(parts):
    pipe = make_pipe(parts)
    x = images(2)
    embed = pipe.embed_images(x)
    var = pipe.variations(x[:1], seed=7)
    torch.testing.assert_close(var, pipe.decode(embed[:1], seeds=Seeds([7])), rtol=1e-5, atol=1e-5)
    frames = pipe.interpolate(x[0], x[1], steps=3, seed=7)
    assert frames.shape == (3, 3, 16, 16)
    torch.testing.assert_close(frames[0], pipe.decode(embed[:1], seeds=Seeds([7]))[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frames[-1], pipe.decode(embed[1:], seeds=Seeds([7]))[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(frames[1], frames[0])
    # prompts: the endpoints are the decodings of each prompt's prior embedding, with the same noise
    frames = pipe.interpolate(PROMPTS[0], PROMPTS[1], steps=3, seed=2)
    e0 = pipe.image_embeds_from_text(PROMPTS[:1], Seeds([2]))[0]
    torch.testing.assert_close(frames[0], pipe.decode(e0, seeds=Seeds([2]))[0], rtol=1e-5, atol=1e-5)


def test_text_diff_edit(parts):
    pipe = make_pipe(parts)
    x = images(1)
    out = pipe.text_diff(x, "a red circle", "a green triangle", amounts=(0.0, 0.5), seed=1)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0], pipe.variations(x, seed=1)[0], rtol=1e-5, atol=1e-5)  # amount 0: no edit
    assert not torch.allclose(out[0], out[1])


def test_inpainting_keeps_the_known_region(parts):
    pipe = make_pipe(parts)
    x = images(2)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[..., :, :8] = True  # keep the left half
    out = pipe.inpaint(x, mask, seed=3, resample=2)
    keep = mask.expand_as(x)
    assert (out[keep] - x[keep]).abs().max() < 1e-5
    assert (out[~keep] - x[~keep]).abs().mean() > 0.05  # the hole was generated, not copied
    out_text = pipe.inpaint(x, mask, PROMPTS, seed=3, resample=1)
    assert (out_text[keep] - x[keep]).abs().max() < 1e-5


def test_latent_stage_and_latent_inpainting_encode_the_known_region():
    torch.manual_seed(0)
    vq = VQGAN(dim=8, dim_mults=(1, 2), groups=4, latent_channels=4, codebook_size=16).eval()
    path = VPPath("cosine", 100)
    stage = DecoderStage(unet(channels=4), 16, path, steps=3, latent=vq)
    assert stage.shape == (4, 8, 8)
    embed = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    out = run_stage(stage, image_embed=embed, seeds=Seeds([0, 1]))
    assert out.shape == (2, 3, 16, 16)
    encoded = []
    orig = vq.encode
    vq.encode = lambda pix: encoded.append(pix.shape) or orig(pix)
    try:
        x = images(2)
        mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
        mask[..., :, :7] = True  # a boundary inside a latent cell: that cell is not "known"
        out = run_stage(stage, image_embed=embed, seeds=Seeds([0, 1]), known=x, known_mask=mask, resample=1)
    finally:
        vq.encode = orig
    assert encoded == [(2, 3, 16, 16)]  # the known image went through the encoder at full resolution
    from t2i.pipelines.unclip_stages import _known

    z, m = _known(stage, x, mask)
    torch.testing.assert_close(z, vq.encode(x))
    assert m.shape == (2, 1, 8, 8) and m[..., :3].all() and not m[..., 3:].any()
    with pytest.raises(ValueError, match="channels=4"):
        DecoderStage(unet(), 16, path, latent=vq)


def test_random_streams_never_overlap_between_samples_stages_or_uses():
    from t2i.pipelines.unclip_stages import _stream

    seeds = [0, 1, 2, 3]
    all_seeds = [s for stage in range(3) for stream in range(4) for s in _stream(seeds, stream, stage).seeds]
    assert len(set(all_seeds)) == len(all_seeds)  # consecutive sample seeds never share a noise stream


class _FixedVarianceNet(torch.nn.Module):
    """An x0-predicting stand-in whose learned variance output is a constant v."""

    def __init__(self, v: float):
        super().__init__()
        self.v = v
        self.cfg = type("Cfg", (), {"self_cond": False})()

    def forward(self, x, t, return_variance=False, **cond):
        pred = 0.5 * torch.tanh(x) + 0.01 * t[:, None, None, None]
        return (pred, torch.full_like(x, self.v)) if return_variance else pred


@pytest.mark.parametrize(("v", "variance"), [(0.0, "small"), (1.0, "large")])
def test_learned_variance_ddpm_matches_fixed_variances_at_the_ends(v, variance):
    from t2i.diffusion import Denoiser, sample_ddpm

    net, path = _FixedVarianceNet(v), VPPath("cosine", 100)
    ts = path.timesteps(5)
    x = torch.randn(2, 3, 4, 4)
    ours = sample_ddpm(Denoiser(net, path, "x0"), x, ts, path, variance="learned", noise=Seeds([1, 2]))
    ref = sample_ddpm(Denoiser(net, path, "x0"), x, ts, path, variance=variance, noise=Seeds([1, 2]))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_learned_variance_stage_samples_with_guidance():
    stage = DecoderStage(unet(learned_variance=True), 8, VPPath("cosine", 100), sampler="ddpm", steps=3, guidance=2.0)
    embed = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    out = run_stage(stage, image_embed=embed, seeds=Seeds([0, 1]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_per_call_settings_match_a_pipeline_built_with_them_and_leave_the_specs_alone(parts):
    from dataclasses import replace

    pipe = make_pipe(parts)
    specs = [replace(s) for s in pipe.stages], replace(pipe.prior)
    embed, seeds = pipe.embed_images(images()), Seeds([3, 4])
    out = pipe.decode(embed, seeds=seeds, steps=2, sampler="euler_ancestral", guidance=[4.0, 1.0])
    built = UnCLIPPipeline(
        pipe.clip,
        pipe.prior,
        [
            replace(s, steps=2, sampler="euler_ancestral", guidance=g)
            for s, g in zip(pipe.stages, (4.0, 1.0), strict=True)
        ],
    )
    torch.testing.assert_close(out, built.decode(embed, seeds=seeds), rtol=0, atol=0)
    assert not torch.allclose(out, pipe.decode(embed, seeds=seeds))  # the stages' own settings still apply
    # one number guides every stage
    torch.testing.assert_close(
        pipe.decode(embed, seeds=seeds, guidance=4.0),
        UnCLIPPipeline(pipe.clip, pipe.prior, [replace(s, guidance=4.0) for s in pipe.stages]).decode(
            embed, seeds=seeds
        ),
        rtol=0,
        atol=0,
    )
    # per stage: the base stage's settings, the upsampler's own (None)
    mixed = pipe.decode(embed, seeds=seeds, steps=[2, None], sampler=["euler_ancestral", None], guidance=[4.0, None])
    built = UnCLIPPipeline(pipe.clip, pipe.prior, [replace(pipe.stages[0], steps=2, sampler="euler_ancestral",
                                                           guidance=4.0), pipe.stages[1]])  # fmt: skip
    torch.testing.assert_close(mixed, built.decode(embed, seeds=seeds), rtol=0, atol=0)
    prior_out = pipe.image_embeds_from_text(PROMPTS, Seeds([1, 2]), steps=2, sampler="ddpm", guidance=3.0,
                                            candidates=3)[0]  # fmt: skip
    prior_built = UnCLIPPipeline(pipe.clip, replace(pipe.prior, steps=2, sampler="ddpm", guidance=3.0,
                                                    num_candidates=3), pipe.stages)  # fmt: skip
    torch.testing.assert_close(
        prior_out, prior_built.image_embeds_from_text(PROMPTS, Seeds([1, 2]))[0], rtol=0, atol=0
    )
    assert pipe.stages == specs[0] and pipe.prior == specs[1]  # nothing was written into the shared specs


def test_per_call_settings_are_validated(parts):
    pipe = make_pipe(parts)
    embed = pipe.embed_images(images(1))
    with pytest.raises(ValueError, match="one per stage"):
        pipe.decode(embed, seeds=Seeds([0]), guidance=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"steps needs one value or one per stage \(2\), got 1"):
        pipe.decode(embed, seeds=Seeds([0]), steps=[3])
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.decode(embed, seeds=Seeds([0]), sampler="magic")
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.image_embeds_from_text(PROMPTS[:1], Seeds([0]), sampler="magic")
    with pytest.raises(ValueError, match="num_candidates and steps must be at least 1"):
        pipe.image_embeds_from_text(PROMPTS[:1], Seeds([0]), candidates=0)


def test_inpainting_reports_each_step_of_each_stage(parts):
    pipe = make_pipe(parts)
    x, seen = images(1), []
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., :8] = True
    embed = pipe.embed_images(x)
    pipe.decode(embed, seeds=Seeds([0]), image=x, inpaint_mask=mask, resample=2, callback=seen.append)
    assert [(d["stage"], d["i"]) for d in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_a_three_stage_cascade_with_a_tiled_last_stage(parts):
    """8 -> 16 -> 32 px with the last stage in 16 px tiles: it runs end to end; a tile as large as the image is
    exactly the untiled stage; tiling changes the result only a little (each tile sees less context)."""
    clip, prior, base, sr = parts
    path = VPPath("cosine", 100)
    sr2 = unet(lowres_cond=True, lowres_noise_cond=True)

    def cascade(tile):
        stages = [
            DecoderStage(base, 8, path, "eps", sampler="ddim", steps=2, guidance=2.0),
            DecoderStage(sr, 16, path, "v", sampler="ddpm", steps=2, lowres=LowresAugment(8)),
            DecoderStage(sr2, 32, path, "v", sampler="ddim", steps=3, lowres=LowresAugment(16), tile=tile,
                         tile_overlap=4),
        ]  # fmt: skip
        return UnCLIPPipeline(clip, PriorSpec(prior, path, "x0", steps=2, guidance=2.0), stages)

    whole, same, tiled = (cascade(t)(PROMPTS, seed=1) for t in (None, 32, 16))
    assert tiled.shape == (2, 3, 32, 32) and tiled.abs().max() <= 1
    torch.testing.assert_close(same, whole, rtol=0, atol=0)
    assert 0 < (tiled - whole).abs().mean() < 0.2


def test_a_stage_with_a_text_map_reads_the_caption_encoders_layout_of_the_prompts(parts):
    """A base stage built with a text map gets the caption encoder's layout map of the prompts (from the states
    ``encode_prompts`` appends), the same as handing run_stage that map; without a caption (variations) it is left
    out; a pipeline without the caption encoder, or with one of another map size, is refused."""
    from t2i.models.caption import CaptionEncoder

    clip, prior, _, _ = parts
    torch.manual_seed(1)
    caption = CaptionEncoder(width=32, depth=1, heads=2, grid=2, shape_channels=5).eval()
    with torch.no_grad():
        caption.shape_head_out.weight.normal_(0, 1.0)
    base = unet(text_embed_dim=32, text_map_grid=2, text_map_channels=8)
    path = VPPath("cosine", 100)
    stage = DecoderStage(base, 8, path, "eps", sampler="ddim", steps=3, guidance=2.0)
    pipe = UnCLIPPipeline(clip, PriorSpec(prior, path, "x0", steps=3, guidance=2.0), [stage], caption=caption)
    seeds = Seeds.from_base(0, 2)
    embed, tokens, mask = pipe.image_embeds_from_text(PROMPTS, seeds)
    n = clip.context_length
    assert tokens.shape[1] == 2 * n  # the caption encoder's states ride after the encodings
    out = pipe.decode(embed, seeds=seeds, text_tokens=tokens, text_mask=mask)
    text_map = caption.layout_map(tokens[:, n:], mask[:, n:])
    by_hand = run_stage(stage, seeds=seeds, image_embed=embed, text_tokens=tokens[:, :n], text_mask=mask[:, :n],
                        text_map=text_map)  # fmt: skip
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    other = run_stage(stage, seeds=seeds, image_embed=embed, text_tokens=tokens[:, :n], text_mask=mask[:, :n],
                      text_map=-text_map)  # fmt: skip
    assert (other - out).abs().max() > 1e-4  # the map is read
    assert pipe.variations(images(2, 32), seed=0).shape == (2, 3, 8, 8)  # no caption: no map
    with pytest.raises(ValueError, match="reads a text map: give the caption encoder"):
        UnCLIPPipeline(clip, None, [stage])
    small = CaptionEncoder(width=32, depth=1, heads=2, grid=2).eval()  # colour picture only: 3 channels
    with pytest.raises(ValueError, match=r"reads a 8 x 2 x 2 text map, but the caption encoder makes 3 x 2 x 2"):
        UnCLIPPipeline(clip, None, [stage], caption=small)


def test_keyed_text_map_reads_the_colours_of_the_embedding_being_decoded(parts):
    """With a ``shape_keyed`` caption encoder the text map's shape maps read the CLIP picture head's colours of the
    embedding the stage decodes (the prior's sample), so they follow that embedding."""
    import dataclasses

    from t2i.models.caption import CaptionEncoder

    _, prior, _, _ = parts
    torch.manual_seed(2)
    tok = WordTokenizer.build([*PROMPTS, "a green triangle", "a yellow square"], context_length=8)
    clip = ClipEncoder.from_config(dataclasses.replace(CLIP_PRESETS["tiny"], picture_grid=2), tok).eval()
    caption = CaptionEncoder(width=32, depth=1, heads=2, grid=2, shape_channels=5, shape_keyed=True).eval()
    base = unet(text_embed_dim=32, text_map_grid=2, text_map_channels=8)
    path = VPPath("cosine", 100)
    stage = DecoderStage(base, 8, path, "eps", sampler="ddim", steps=2, guidance=2.0)
    pipe = UnCLIPPipeline(clip, PriorSpec(prior, path, "x0", steps=2), [stage], caption=caption)
    seeds = Seeds.from_base(0, 2)
    embed, tokens, mask = pipe.image_embeds_from_text(PROMPTS, seeds)
    n = clip.context_length
    want = caption.layout_map(tokens[:, n:], mask[:, n:], clip.predict_picture(embed))
    torch.testing.assert_close(pipe._text_map(tokens, mask, embed), want, rtol=0, atol=0)
    other = pipe._text_map(tokens, mask, -embed)
    assert (other[:, 3:] - want[:, 3:]).abs().max() > 1e-5 and torch.equal(other[:, :3], want[:, :3])
    out = pipe.decode(embed, seeds=seeds, text_tokens=tokens, text_mask=mask)
    by_hand = run_stage(stage, seeds=seeds, image_embed=embed, text_tokens=tokens[:, :n], text_mask=mask[:, :n],
                        text_map=want)  # fmt: skip
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    with pytest.raises(ValueError, match="this CLIP has no picture head"):
        UnCLIPPipeline(parts[0], None, [stage], caption=caption)
