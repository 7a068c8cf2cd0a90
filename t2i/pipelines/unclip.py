"""The unCLIP cascade (Ramesh et al. 2022): CLIP text -> prior -> base decoder -> super-resolution stages.

Composition only: every piece of sampling math (the samplers, learned-variance DDPM, RePaint, guidance,
thresholding, self-conditioning, low-res augmentation) lives in ``t2i.diffusion``, and each stage's spec and the
function that samples it (``PriorSpec``/``sample_prior``, ``DecoderStage``/``run_stage``) in ``unclip_stages``.
Here: ``UnCLIPPipeline``, which encodes the prompts, runs the prior and the decoder stages in turn, and edits:
variations (decode an image's CLIP embedding), interpolation (slerp, fixed noise), text-diff edits and RePaint
inpainting (Lugmayr et al. 2022) whose known region is VQ-encoded, not resized, in latent stages.

Settings per call: ``image_embeds_from_text`` and ``decode`` take ``steps``, ``sampler`` and ``guidance`` for one
request and never write them into the pipeline's specs, so one pipeline can serve concurrent requests.

Seeds: sample ``k`` of a request keeps its noise whatever the batch (``t2i.diffusion.Seeds``); each stage and the
prior draw from their own offset of the sample's seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.diffusion import LowresAugment, Seeds
from t2i.models.caption import check_fits_clip, check_text_map
from t2i.models.clip import ClipEncoder
from t2i.nn.offload import placed

from .unclip_stages import DecoderStage, PriorSpec, run_stage, sample_prior, stage_seeds

# the cascade's public names, wherever they are defined (LowresAugment is the core's, kept importable from here)
__all__ = ["DecoderStage", "LowresAugment", "PriorSpec", "UnCLIPPipeline", "run_stage", "sample_prior", "slerp"]


def slerp(a: Tensor, b: Tensor, frac: Tensor | float) -> Tensor:
    """Spherical interpolation of unit vectors (B, D) at ``frac`` (B,) or scalar; exact at 0 and 1."""
    frac = torch.as_tensor(frac, dtype=a.dtype, device=a.device).expand(a.shape[0])[:, None]
    a_n, b_n = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    out = (torch.sin((1 - frac) * omega) / so) * a + (torch.sin(frac * omega) / so) * b
    return torch.where(frac == 0, a, torch.where(frac == 1, b, out))


def _with_settings(spec, **settings):
    """``spec`` with the settings that are not None replaced: a copy for one call, the original left untouched."""
    settings = {k: v for k, v in settings.items() if v is not None}
    return replace(spec, **settings) if settings else spec


class UnCLIPPipeline:
    """CLIP + prior + decoder cascade.

    Args:
        clip: the ClipEncoder (tokenizer included) the prior and decoders were trained with.
        prior: prior sampling spec (None: only image-embedding inputs, e.g. variations).
        stages: decoder stages in increasing size.
        device: where each stage runs; None runs every module where it already is.
        offload: with ``device``, move each module there only while it runs (one stage on the device at a time).
        autocast: a dtype (e.g. ``torch.bfloat16``) to run the decoder stages under autocast, or None (fp32). With
            bf16, Unets in ``channels_last`` layout (``net.to(memory_format=torch.channels_last)``) run their
            convolutions 1.3x faster again; the model-folder loader moves them so for ``"precision": "bf16"``. The
            CLIP text tower and the prior stay in fp32: in bf16 the prior's embeddings depend on the batch they
            were sampled in (about 2e-3, from the kernels' blocking), and the decoder turns that into visibly
            different images, so a seed would no longer give the same image alone and in a batch.
    """

    def __init__(
        self,
        clip: ClipEncoder,
        prior: PriorSpec | None,
        stages: Sequence[DecoderStage],
        *,
        device: str | torch.device | None = None,
        offload: bool = False,
        autocast: torch.dtype | None = None,
        caption: nn.Module | None = None,
    ):
        if not stages:
            raise ValueError("the cascade needs at least one DecoderStage")
        if stages[0].lowres is not None:
            raise ValueError("the first stage generates from noise; give it lowres=None and lowres_cond=False")
        for prev, st in itertools.pairwise(stages):
            if st.size <= prev.size or st.lowres.lowres_size != prev.size:
                raise ValueError(
                    f"stage sizes must increase and each lowres_size equal the previous size ({prev.size})"
                )
        for st in stages:
            e = st.net.cfg.image_embed_dim
            if e and e != clip.embed_dim:
                raise ValueError(f"stage {st.size}: Unet image_embed_dim={e} but CLIP embeds in {clip.embed_dim}")
        if prior is not None and prior.net.cfg.embed_dim != clip.embed_dim:
            raise ValueError(f"prior embed_dim={prior.net.cfg.embed_dim} but CLIP embeds in {clip.embed_dim}")
        mapped = [st.size for st in stages if st.net.cfg.text_map_grid]
        if mapped and caption is None:
            raise ValueError(f"stage {mapped[0]} reads a text map: give the caption encoder that makes it (caption=)")
        if caption is not None:
            if (not any(st.text_words for st in stages) and not (prior is not None and prior.text_words)
                    and not mapped):  # fmt: skip
                raise ValueError(
                    "a caption encoder replaces the word tokens: give a stage (or the prior) with text_words=True"
                )
            check_fits_clip(caption, clip)
            for st in stages:
                if st.net.cfg.text_map_grid:
                    cfg = st.net.cfg
                    check_text_map(caption, clip, cfg.text_map_grid, cfg.text_map_channels, f"stage {st.size}")
            caption = caption.eval().requires_grad_(False)
        self.clip, self.prior, self.stages, self.caption = clip, prior, list(stages), caption
        self.device = None if device is None else torch.device(device)
        self.offload, self.autocast = offload, autocast
        if device is not None and not offload:
            nets = (clip, caption, prior.net if prior else None, *[s.net for s in stages], *[s.latent for s in stages])
            for m in nets:
                if m is not None:
                    m.to(self.device)

    def _where(self, module):
        return placed(module, self.device if self.offload else None)

    def _amp(self, module):
        """Autocast to ``self.autocast`` on ``module``'s device, or nothing."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(next(module.parameters()).device.type, dtype=self.autocast)

    # -- 1. text ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(text embeddings, per-token encodings, mask); with the input embeddings of the tokens appended when a
        stage reads them (``DecoderStage.text_words``), or the caption encoder's states of them when the pipeline
        has one. The prior and stages without ``text_words`` see the encodings only."""
        words = any(st.text_words or st.net.cfg.text_map_grid for st in self.stages) or (
            self.prior is not None and self.prior.text_words
        )
        with self._where(self.clip), self._where(self.caption):
            embed, tokens, mask = self.clip.embed_text(list(prompts), words=words, caption=self.caption)
        return embed, tokens, mask

    def _text_for(self, text_words: bool, tokens: Tensor | None, mask: Tensor | None):
        """The part of ``encode_prompts``' tokens a prior or stage reads: all of them, or the encodings only."""
        n = self.clip.context_length
        if text_words or tokens is None or tokens.shape[1] <= n:
            return tokens, mask
        return tokens[:, :n], mask[:, :n]

    @torch.no_grad()
    def _text_map(self, tokens: Tensor | None, mask: Tensor | None, image_embed: Tensor) -> Tensor | None:
        """The caption encoder's layout map of the prompts, from the states ``encode_prompts`` appended; a
        ``shape_keyed`` encoder's shape maps read the colours the CLIP picture head sees in ``image_embed``."""
        n = self.clip.context_length
        if tokens is None:
            return None  # no caption (image variations): the map is left out, as for guidance's unconditional half
        if tokens.shape[1] != 2 * n:
            raise ValueError("a stage reads a text map: pass text_tokens from encode_prompts")
        key = None
        if self.caption.cfg.shape_keyed:
            with self._where(self.clip):
                key = self.clip.predict_picture(image_embed.to(next(self.clip.parameters()).device))
        with self._where(self.caption):
            dev = next(self.caption.parameters()).device
            key = None if key is None else key.to(dev)
            return self.caption.layout_map(tokens[:, n:].to(dev), mask[:, n:].to(dev), key).float()

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        with self._where(self.clip):
            dev = next(self.clip.parameters()).device
            return self.clip.embed_image(images.to(dev))

    # -- 2. prior ----------------------------------------------------------------------------------------------

    def image_embeds_from_text(
        self,
        prompts: Sequence[str],
        seeds: Seeds,
        callback: Callable | None = None,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        candidates: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """CLIP image embeddings (B, E) sampled by the prior for ``prompts``, with the prompts' tokens and mask.

        Args:
            prompts, seeds: one seed per prompt.
            callback: gets the prior sampler's per-step dict.
            steps, sampler, guidance, candidates: this call's prior settings (``candidates``: samples per prompt,
                the one closest to the text embedding kept); None keeps the ``PriorSpec``'s. The spec itself is
                never changed.
        """
        if self.prior is None:
            raise ValueError("this pipeline has no prior; pass image embeddings or images instead of prompts")
        spec = _with_settings(self.prior, steps=steps, sampler=sampler, guidance=guidance, num_candidates=candidates)
        embed, tokens, mask = self.encode_prompts(prompts)
        prior_tokens, prior_mask = self._text_for(spec.text_words, tokens, mask)
        with self._where(spec.net):
            image_embed = sample_prior(
                spec, embed, text_tokens=prior_tokens, text_mask=prior_mask, seeds=seeds, callback=callback
            )
        return image_embed, tokens, mask

    # -- 3. decoder cascade ------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        image_embed: Tensor,
        *,
        seeds: Seeds,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        start_stage: int = 0,
        stop_stage: int | None = None,
        image: Tensor | None = None,
        inpaint_mask: Tensor | None = None,
        resample: int = 5,
        callback: Callable | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | Sequence[float] | None = None,
    ) -> Tensor:
        """Run stages ``start_stage .. stop_stage`` (inclusive) from image embeddings; images in [-1, 1].

        Args:
            image_embed, seeds: CLIP image embeddings (B, E) and one seed per sample.
            text_tokens, text_mask: the prompts' CLIP tokens, for stages whose Unet attends to text.
            start_stage, stop_stage: a partial run; ``image`` is then the output of stage ``start_stage - 1``.
            image, inpaint_mask: inpainting: the image and its mask (B, 1, H, W), True where the image is kept.
            resample: RePaint passes per step when inpainting.
            callback: gets each stage sampler's per-step dict, with the stage index under ``"stage"``.
            steps, sampler, guidance: this call's settings: one value for every stage, or one per stage of the
                pipeline (e.g. guidance ``[3.0, 1.0]``: guide the base stage only; steps ``[25, None]``: the
                upsampler keeps its own); None keeps each stage's own. The pipeline's stages are never changed.
        """
        stop = len(self.stages) - 1 if stop_stage is None else stop_stage
        if not 0 <= start_stage <= stop < len(self.stages):
            raise ValueError(f"need 0 <= start_stage <= stop_stage < {len(self.stages)}")
        if start_stage > 0 and image is None:
            raise ValueError(f"start_stage={start_stage} needs image= (the output of stage {start_stage - 1})")
        if inpaint_mask is not None and image is None:
            raise ValueError("inpainting needs image= (the image whose masked-in region is kept)")
        steps, sampler, guidance = (self._per_stage(v, name) for v, name in
                                    ((steps, "steps"), (sampler, "sampler"), (guidance, "guidance")))  # fmt: skip
        prev = image if start_stage > 0 else None
        text_map = None
        if any(self.stages[k].net.cfg.text_map_grid for k in range(start_stage, stop + 1)):
            text_map = self._text_map(text_tokens, text_mask, image_embed)
        for k in range(start_stage, stop + 1):
            stage = _with_settings(self.stages[k], steps=steps[k], sampler=sampler[k], guidance=guidance[k])
            tokens, mask = self._text_for(stage.text_words, text_tokens, text_mask)
            if stage.text_words and tokens is not None and tokens.shape[1] != 2 * self.clip.context_length:
                raise ValueError(f"stage {k} reads word tokens too: pass text_tokens from encode_prompts")
            with self._where(stage.net), self._where(stage.latent), self._amp(stage.net):
                prev = run_stage(
                    stage,
                    seeds=stage_seeds(seeds, k),
                    image_embed=image_embed,
                    text_tokens=tokens,
                    text_mask=mask,
                    text_map=text_map,
                    prev=prev,
                    known=image if inpaint_mask is not None else None,
                    known_mask=inpaint_mask,
                    resample=resample,
                    callback=None if callback is None else lambda d, k=k: callback({**d, "stage": k}),
                ).float()
        return prev

    def _per_stage(self, value, name: str) -> list:
        """One setting per stage from one value for all (or None) or a sequence of one per stage."""
        if value is None or isinstance(value, int | float | str):
            return [value] * len(self.stages)
        if len(value) != len(self.stages):
            raise ValueError(f"{name} needs one value or one per stage ({len(self.stages)}), got {len(value)}")
        return list(value)

    # -- 4. user-facing entry points -----------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        start_stage: int = 0,
        stop_stage: int | None = None,
        image: Tensor | None = None,
    ) -> Tensor:
        """Text to images in [-1, 1]: prior, then the cascade (optionally only part of it)."""
        seeds = Seeds.from_base(seed, len(prompts))
        image_embed, tokens, mask = self.image_embeds_from_text(prompts, seeds)
        return self.decode(
            image_embed,
            seeds=seeds,
            text_tokens=tokens,
            text_mask=mask,
            start_stage=start_stage,
            stop_stage=stop_stage,
            image=image,
        )

    def variations(self, images: Tensor, *, seed: int = 0, stop_stage: int | None = None) -> Tensor:
        """Variations of ``images``: decode their CLIP image embeddings with fresh noise (paper Sec. 3.1)."""
        embed = self.embed_images(images)
        return self.decode(embed, seeds=Seeds.from_base(seed, len(embed)), stop_stage=stop_stage)

    def interpolate(
        self, a: Tensor | str, b: Tensor | str, *, steps: int = 5, seed: int = 0, stop_stage: int | None = None
    ) -> Tensor:
        """``steps`` images along the slerp between two images' (or two prompts' prior) embeddings, all decoded
        with the same noise, so the endpoints are exactly the decodings of the endpoint embeddings (Sec. 3.2)."""
        ea, eb = self._endpoint(a, seed), self._endpoint(b, seed)
        frac = torch.linspace(0, 1, steps, device=ea.device)
        embeds = slerp(ea.expand(steps, -1), eb.expand(steps, -1), frac)
        return self.decode(embeds, seeds=Seeds([seed] * steps), stop_stage=stop_stage)

    def _endpoint(self, x: Tensor | str, seed: int) -> Tensor:
        if isinstance(x, str):
            return self.image_embeds_from_text([x], Seeds([seed]))[0]
        if x.ndim == 1:
            return F.normalize(x[None].float(), dim=-1)  # already an embedding
        return self.embed_images(x[None] if x.ndim == 3 else x[:1])

    def text_diff(
        self,
        image: Tensor,
        source: str,
        target: str,
        *,
        amounts: Sequence[float] = (0.25, 0.5),
        seed: int = 0,
        stop_stage: int | None = None,
    ) -> Tensor:
        """Text-diff edits (Sec. 3.3): slerp the image embedding toward normalize(z_target - z_source)."""
        z_i = self.embed_images(image[None] if image.ndim == 3 else image[:1])
        z_t, _, _ = self.encode_prompts([source, target])
        diff = F.normalize((z_t[1] - z_t[0])[None].to(z_i), dim=-1)
        frac = torch.tensor(list(amounts), device=z_i.device, dtype=z_i.dtype)
        embeds = slerp(z_i.expand(len(frac), -1), diff.expand(len(frac), -1), frac)
        return self.decode(embeds, seeds=Seeds([seed] * len(frac)), stop_stage=stop_stage)

    def inpaint(
        self,
        image: Tensor,
        mask: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        seed: int = 0,
        resample: int = 5,
        stop_stage: int | None = None,
    ) -> Tensor:
        """Fill the region where ``mask`` (B, 1, H, W) is False; conditioned on ``prompts`` through the prior, or
        on the image's own CLIP embedding when no prompts are given."""
        seeds = Seeds.from_base(seed, len(image))
        if prompts is not None:
            embed, tokens, tmask = self.image_embeds_from_text(prompts, seeds)
        else:
            embed, tokens, tmask = self.embed_images(image), None, None
        return self.decode(
            embed,
            seeds=seeds,
            text_tokens=tokens,
            text_mask=tmask,
            image=image,
            inpaint_mask=mask.bool(),
            resample=resample,
            stop_stage=stop_stage,
        )
