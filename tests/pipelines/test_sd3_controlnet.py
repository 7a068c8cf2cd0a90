"""Controlled SD3 sampling: the whole loop against diffusers' ``StableDiffusion3ControlNetPipeline`` (one and two
ControlNets, scales, windows, CFG) on tiny random models with the same latents, the step windows against the
rule written out by hand, and the input errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from t2i.data.control import ControlImageError
from t2i.io.sd3 import vae_official_to_diffusers
from t2i.models.controlnet import ControlNet, controlnet_config_for
from t2i.models.mmdit import PRESETS as MMDIT_PRESETS
from t2i.models.mmdit import MMDiT
from t2i.models.vae import AutoencoderKL, LatentFormat, VAEConfig
from t2i.pipelines.control import Control, active_steps, window_interval
from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset

pytest.importorskip("diffusers")
import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel
from sd3_helpers import diffusers_twin, randomize_

H, W = 64, 32  # an 8 x 4 latent: non-square
VAE_CFG = VAEConfig(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=16, norm_groups=2)


def _deterministic_vae() -> AutoencoderKL:
    """A random VAE whose posterior std is exp(-15): diffusers samples the control latents from the global RNG, so
    both sides can only agree on an (almost) point-mass posterior."""
    vae = randomize_(AutoencoderKL(VAE_CFG, latent_format=LatentFormat(1.5305, 0.0609)), seed=7).eval()
    with torch.no_grad():
        vae.encoder.conv_out.weight[16:] = 0
        vae.encoder.conv_out.bias[16:] = -30.0
    return vae


def _diffusers_vae(vae: AutoencoderKL):
    dvae = diffusers.AutoencoderKL(
        block_out_channels=VAE_CFG.block_out_channels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=2,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    )  # fmt: skip
    dvae.load_state_dict(vae_official_to_diffusers(vae.state_dict()), strict=True)
    return dvae.eval()


def _diffusers_controlnet(net: ControlNet, ref_base) -> SD3ControlNetModel:
    from t2i.io.controlnet import controlnet_official_to_diffusers

    c = net.cfg
    ref = SD3ControlNetModel(
        sample_size=64, patch_size=c.patch_size, in_channels=c.in_channels, num_layers=c.depth,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=None,
        caption_projection_dim=c.hidden_size, pooled_projection_dim=c.pooled_dim, out_channels=c.in_channels,
        pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False,
    )  # fmt: skip
    sd = {k: v for k, v in net.state_dict().items() if k != "control_type"}
    ref.load_state_dict(controlnet_official_to_diffusers(sd), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def tiny():
    cfg = replace(MMDIT_PRESETS["tiny"], patch_size=2, in_channels=16)
    base = randomize_(MMDiT(cfg)).eval()
    nets = []
    for seed, kind in ((1, "canny"), (2, "blur")):
        net = ControlNet(replace(controlnet_config_for(cfg, depth=2, control_type=kind), stored_patch_embed=False))
        nets.append(randomize_(net, seed).eval())
    g = torch.Generator().manual_seed(0)
    emb = {"context": torch.randn(2, 30, 32, generator=g), "pooled": torch.randn(2, 64, generator=g),
           "negative_context": torch.randn(2, 30, 32, generator=g),
           "negative_pooled": torch.randn(2, 64, generator=g)}  # fmt: skip
    images = [torch.rand(1, 3, H, W, generator=g) for _ in nets]  # control images in [0, 1]
    return base, nets, _deterministic_vae(), emb, images


def _diffusers(base, nets, vae, emb, images, scales, windows, steps, seeds):
    ref_base = diffusers_twin(base)
    refs = [_diffusers_controlnet(n, ref_base) for n in nets]
    controlnet = refs[0] if len(refs) == 1 else diffusers.SD3MultiControlNetModel(refs)
    pipe = diffusers.StableDiffusion3ControlNetPipeline(
        transformer=ref_base, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_diffusers_vae(vae),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None, controlnet=controlnet,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    one = len(nets) == 1
    ctrl = [im * 2 - 1 for im in images]  # a tensor is taken as preprocessed: diffusers' own [-1, 1]
    return pipe(prompt_embeds=emb["context"], pooled_prompt_embeds=emb["pooled"],
                negative_prompt_embeds=emb["negative_context"], negative_pooled_prompt_embeds=emb["negative_pooled"],
                control_image=ctrl[0] if one else ctrl, controlnet_conditioning_scale=scales[0] if one else scales,
                control_guidance_start=[w[0] for w in windows], control_guidance_end=[w[1] for w in windows],
                height=H, width=W, num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images  # fmt: skip


@pytest.mark.parametrize(
    ("n", "scales", "windows", "steps"),
    [(1, [0.8], [(0.0, 1.0)], 5), (2, [0.7, 1.3], [(0.0, 0.6), (0.2, 1.0)], 6)],
)
def test_controlled_sampling_matches_diffusers(tiny, n, scales, windows, steps):
    base, nets, vae, emb, images = tiny
    nets, images = nets[:n], images[:n]
    # "none": the tensors are the control images as they are; the ControlNets' "signed" range is diffusers' 2x-1
    controls = [
        Control(im, "none", s, *w, net=net) for im, s, w, net in zip(images, scales, windows, nets, strict=True)
    ]
    pipe = SD3Pipeline(base, vae, preset=SD3Preset(steps=steps, guidance=4.5))
    ours = pipe(**emb, seeds=[3, 4], height=H, width=W, controls=controls, controlnet_layout="diffusers",
                output="latent")  # fmt: skip
    theirs = _diffusers(base, nets, vae, emb, images, scales, windows, steps, [3, 4])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    plain = pipe(**emb, seeds=[3, 4], height=H, width=W, output="latent")
    assert (ours - plain).abs().max() > 1e-3  # the controls did something


def test_windows_follow_the_step_rule(tiny):
    """The ControlNet runs at exactly the grid times of the steps i with start <= i/n and (i+1)/n <= end."""
    base, nets, vae, emb, images = tiny
    steps = 8
    pipe = SD3Pipeline(base, vae, preset=SD3Preset(steps=steps, guidance=1.0))
    seen: list[float] = []
    hook = nets[0].register_forward_hook(lambda m, args, out: seen.append(float(args[2][0])))
    try:
        pipe(**emb, seeds=[3, 4], height=H, width=W, output="latent",
             controls=[Control(images[0], "none", 1.0, 0.25, 0.75, net=nets[0])])  # fmt: skip
    finally:
        hook.remove()
    ts = pipe.schedule(steps, 3.0)[1]
    expected = [i for i in range(steps) if i / steps >= 0.25 and (i + 1) / steps <= 0.75]
    assert expected == active_steps(steps, 0.25, 0.75) == [2, 3, 4, 5]
    assert seen == pytest.approx([float(ts[i]) * 1000 for i in expected], rel=1e-6)
    lo, hi = window_interval(ts, 0.9, 0.95, 1000.0)
    assert lo == hi == float("inf")  # a window shorter than a step holds no step


def test_reference_layout_differs_from_diffusers_only_by_the_last_block(tiny):
    base, nets, vae, emb, images = tiny
    pipe = SD3Pipeline(base, vae, preset=SD3Preset(steps=3, guidance=4.5))
    args = dict(**emb, seeds=[3, 4], height=H, width=W, output="latent",
                controls=[Control(images[0], "none", 1.0, net=nets[0])])  # fmt: skip
    ref, dif = pipe(**args), pipe(**args, controlnet_layout="diffusers")
    assert (ref - dif).abs().max() > 1e-4


def test_control_errors(tiny):
    base, nets, vae, emb, images = tiny
    pipe = SD3Pipeline(base, vae, preset=SD3Preset(steps=2), controlnets=nets)
    base_args = dict(**emb, seeds=[3, 4], height=H, width=W, output="latent")
    with pytest.raises(ControlImageError, match="start < end"):
        Control(images[0], "canny", 1.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="did you mean 'depth'"):
        Control(images[0], "dept")
    with pytest.raises(ValueError, match="no loaded ControlNet takes 'depth'"):
        pipe(**base_args, controls=[Control(images[0][0], "depth")])
    with pytest.raises(ControlImageError, match="3 control images for 2"):
        pipe(**base_args, controls=[Control(torch.rand(3, 3, H, W), "none", net=nets[0])])
    with pytest.raises(ValueError, match="needs a ControlNet"):
        SD3Pipeline(base, vae, preset=SD3Preset(steps=2))(**base_args, controls=[Control(images[0], "canny")])
    # kind "canny" picks the canny ControlNet of the two the pipeline holds
    out = pipe(**base_args, controls=[Control(images[0][0], "blur", 0.5)])
    assert out.shape == (2, 16, H // 8, W // 8)
