"""SD3 inpainting: the loop against diffusers' ``StableDiffusion3InpaintPipeline`` on a tiny random 16-channel
MMDiT (the same start, the same latent mask, the known latents re-noised with the starting noise after every step),
and what the mask keeps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from t2i.models.mmdit import PRESETS as MMDIT_PRESETS
from t2i.models.mmdit import MMDiT
from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3InpaintPipeline
from sd3_helpers import diffusers_twin, randomize_

H, W = 64, 32  # an 8 x 4 latent: non-square


@pytest.fixture(scope="module")
def tiny():
    cfg = replace(MMDIT_PRESETS["tiny-x"], patch_size=2, in_channels=16)  # diffusers blends only 16-channel models
    model = randomize_(MMDiT(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    emb = {"context": torch.randn(2, 30, 32, generator=g), "pooled": torch.randn(2, 64, generator=g),
           "negative_context": torch.randn(2, 30, 32, generator=g),
           "negative_pooled": torch.randn(2, 64, generator=g)}  # fmt: skip
    z0 = torch.randn(2, 16, H // 8, W // 8, generator=g)  # the image to keep, as MMDiT-space latents
    mask = torch.zeros(2, 1, H, W)
    mask[0, :, : H // 2] = 1.0  # repaint the top half of image 0
    mask[1, :, :, W // 2 :] = 0.7  # and the right half of image 1 (0.7 binarises to 1)
    return model, diffusers_twin(model), emb, z0, mask


def _diffusers(ref, emb, z0, mask, steps: int, strength: float, seeds):
    # the VAE only sets the latent scale factor (8) and 16 latent channels: image latents go in, latents come out
    vae = DiffusersVAE(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=16, norm_num_groups=2,
                       shift_factor=0.0, scaling_factor=1.0)  # fmt: skip
    pipe = StableDiffusion3InpaintPipeline(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                           vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                           tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=emb["context"], pooled_prompt_embeds=emb["pooled"],
                negative_prompt_embeds=emb["negative_context"], negative_pooled_prompt_embeds=emb["negative_pooled"],
                image=z0, mask_image=mask, masked_image_latents=z0, height=H, width=W, strength=strength,
                num_inference_steps=steps,
                guidance_scale=4.5, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images  # fmt: skip


@pytest.mark.parametrize(("steps", "strength"), [(6, 1.0), (10, 0.6)])
def test_inpainting_matches_diffusers(tiny, steps, strength):
    model, ref, emb, z0, mask = tiny
    pipe = SD3Pipeline(model, preset=SD3Preset(steps=steps, guidance=4.5))
    ours = pipe(**emb, seeds=[3, 4], height=H, width=W, init_latents=z0, mask_image=mask, strength=strength,
                output="latent")  # fmt: skip
    theirs = _diffusers(ref, emb, z0, mask, steps, strength, [3, 4])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_the_kept_region_comes_back_and_the_mask_matters(tiny):
    model, _, emb, z0, mask = tiny
    pipe = SD3Pipeline(model, preset=SD3Preset(steps=4, guidance=4.5))
    args = dict(**emb, seeds=[3, 4], height=H, width=W, init_latents=z0, strength=1.0, output="latent")
    out = pipe(**args, mask_image=mask)
    keep = torch.nn.functional.interpolate(1 - (mask >= 0.5).float(), size=(H // 8, W // 8)) > 0
    torch.testing.assert_close(out[keep.expand_as(out)], z0[keep.expand_as(z0)], rtol=0, atol=0)  # pasted at t = 0
    assert (out - z0)[~keep.expand_as(out)].abs().mean() > 0.1  # the masked region was generated anew
    soft = pipe(**args, mask_image=mask, mask_blur=4.0)
    assert (soft - out).abs().max() > 1e-3  # a blurred edge blends instead of cutting
    one = pipe(**{**args, **{k: v[1:] for k, v in emb.items()}, "seeds": [4], "init_latents": z0[1:]},
               mask_image=mask[1:])  # fmt: skip
    torch.testing.assert_close(one, out[1:], atol=1e-5, rtol=0)  # image k does not depend on the batch


def test_inpainting_input_errors(tiny):
    model, _, emb, z0, mask = tiny
    pipe = SD3Pipeline(model, preset=SD3Preset(steps=2))
    base = dict(**emb, seeds=[3, 4], height=H, width=W, output="latent")
    with pytest.raises(ValueError, match="needs the image to keep"):
        pipe(**base, mask_image=mask)
    with pytest.raises(ValueError, match="one channel"):
        pipe(**base, init_latents=z0, mask_image=torch.zeros(2, 3, H, W))
    with pytest.raises(ValueError, match=r"mask_image is \(32, 32\)"):
        pipe(**base, init_latents=z0, mask_image=torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        pipe(**base, init_latents=z0, mask_image=torch.zeros(3, 1, H, W))
    with pytest.raises(ValueError, match="init_latents must be"):
        pipe(**base, init_latents=z0[:, :4], mask_image=mask)
