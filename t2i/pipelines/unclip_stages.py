"""The two kinds of stage of the unCLIP cascade (Ramesh et al. 2022), each a spec and the function that samples it.

- ``PriorSpec`` / ``sample_prior``: CLIP text embedding -> CLIP image embedding, under any core sampler, with
  classifier-free guidance on null text, optional self-conditioning and best-of-n reranking by CLIP similarity;
- ``DecoderStage`` / ``run_stage``: CLIP image embedding (and, for super-resolution, the previous stage's image) ->
  an image, in pixel space or in a VQGAN's latent space, optionally inpainting with RePaint.

Both only compose pieces of ``t2i.diffusion``: a parameterisation wrapper, self-conditioning, guidance and
thresholding around the network, then a registered sampler (or ``sample_repaint``). A spec is validated once against
the module it wraps and the module is never rebuilt: where DALLE2-pytorch re-instantiated the user's Unets to flip
flags (losing their weights), a mismatch here is a ``ValueError`` that says which flag the module needs.
``UnCLIPPipeline`` (``t2i.pipelines.unclip``) strings the stages together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.diffusion import (
    Denoiser,
    LowresAugment,
    NoisePath,
    Seeds,
    SelfConditioning,
    TiledDenoiser,
    check_sampler,
    classifier_free_guidance,
    dynamic_threshold,
    get_sampler,
    sample_repaint,
    static_threshold,
)
from t2i.models.prior import PriorNetwork
from t2i.models.unet import Unet

# Random streams derived from a sample's seed s: s + (stage * 16 + stream) * 2**32. Stage 0 is the prior, stage k + 1
# decoder stage k; streams are initial noise, sampler noise, RePaint noise and low-res augmentation noise. Offsets
# of 2**32 keep every stream of every sample apart as long as seeds stay below 2**32.
_INIT, _SAMPLER, _REPAINT, _LOWRES = 0, 1, 2, 3


def _stream(seeds: Seeds | Sequence[int], stream: int, stage: int = 0) -> Seeds:
    base = seeds.seeds if isinstance(seeds, Seeds) else list(seeds)
    return Seeds([s + (stage * 16 + stream) * 2**32 for s in base])


def stage_seeds(seeds: Seeds, stage: int) -> Seeds:
    """The seeds decoder stage ``stage`` of a request draws from, given the request's seeds (one per sample)."""
    return _stream(seeds, _INIT, stage=stage + 1)


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Sample with ``net`` in eval mode and give it back in the mode it had (a training task samples mid-run)."""
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


# ---------------------------------------------------------------------------------------------------------------
# prior


@dataclass
class PriorSpec:
    """How to sample the prior: its net, the path and parameterisation it was trained with, sampler settings."""

    net: PriorNetwork
    path: NoisePath
    prediction: str = "x0"
    sampler: str = "ddim"
    steps: int = 64
    guidance: float = 1.0
    num_candidates: int = 2  # best-of-n reranking by cosine similarity to the text embedding (paper: n = 2)
    # the net reads the word tokens (or a caption encoder's states of them) after the encodings, as decoder stages
    # with ``text_words`` do (trained with the prior task's ``text_words``)
    text_words: bool = False

    def __post_init__(self):
        check_sampler(self.sampler)
        if self.text_words and not self.net.cfg.text_token_dim:
            raise ValueError("prior text_words needs a prior that reads text tokens (text_token_dim > 0)")
        if self.num_candidates < 1 or self.steps < 1:
            raise ValueError("num_candidates and steps must be at least 1")


@torch.no_grad()
def sample_prior(
    spec: PriorSpec,
    text_embed: Tensor,
    *,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    seeds: Seeds,
    callback: Callable | None = None,
) -> Tensor:
    """Unit-norm CLIP image embeddings (B, E) for text embeddings (B, E); the best of ``num_candidates`` each.
    ``callback`` gets the sampler's per-step dict."""
    net, n, b = spec.net, spec.num_candidates, text_embed.shape[0]
    if len(seeds) != b:
        raise ValueError(f"need one seed per prompt: {b} prompts, {len(seeds)} seeds")
    dev = next(net.parameters()).device
    rep = lambda z: None if z is None else z.to(dev).repeat_interleave(n, 0)  # noqa: E731
    cond = {"text_embed": rep(text_embed), "drop_text": torch.zeros(b * n, dtype=torch.bool, device=dev)}
    if net.cfg.text_token_dim:
        cond.update(text_tokens=rep(text_tokens), text_mask=rep(text_mask))
    cand = [s * n + j for s in seeds.seeds for j in range(n)]  # candidate j of prompt k: its own stream
    denoise = Denoiser(net, spec.path, spec.prediction)
    if net.cfg.self_cond:
        denoise = SelfConditioning(denoise)
    denoise = classifier_free_guidance(
        denoise, spec.guidance, {"drop_text": torch.ones(1, dtype=torch.bool, device=dev)}
    )
    ts = spec.path.timesteps(spec.steps)
    x = Seeds(cand).randn((b * n, net.cfg.embed_dim), device=dev) * float(spec.path.sigma(ts[0]))
    with _eval_mode(net):
        out = get_sampler(spec.sampler)(
            denoise, x, ts, spec.path, extra_args=cond, noise=_stream(cand, _SAMPLER), callback=callback
        )
    emb = F.normalize(net.unscale_embed(out), dim=-1).view(b, n, -1)  # (B, n, E)
    sim = (emb * F.normalize(text_embed.to(dev).float(), dim=-1)[:, None]).sum(-1)  # (B, n)
    return emb[torch.arange(b, device=dev), sim.argmax(1)]


# ---------------------------------------------------------------------------------------------------------------
# decoder stages


@dataclass
class DecoderStage:
    """One stage of the cascade.

    Args:
        net: the stage's Unet (never rebuilt; validated against this spec).
        size: output image size in pixels.
        path, prediction: the noise path and parameterisation the Unet was trained with.
        sampler, steps, guidance: sampling settings (guidance 1 disables classifier-free guidance).
        lowres: low-res conditioning for super-resolution stages (None for the base stage).
        latent: a VQGAN whose latent space this stage diffuses in (None for pixel space).
        threshold: dynamic-thresholding percentile for pixel stages (None: clamp x0 to [-1, 1]).
        tile, tile_overlap: denoise in overlapping tiles of this many pixels (of the stage's space) when the image
            is larger, blending them every step (``t2i.diffusion.TiledDenoiser``): bounded memory for 1024 px stages.
        text_words: the Unet attends to the CLIP's input embeddings of the prompt's tokens too, after its encodings
            (``ClipEncoder.encode_text(words=True)``; trained with the decoder task's ``text_words``).
    """

    net: Unet
    size: int
    path: NoisePath
    prediction: str = "eps"
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 1.0
    lowres: LowresAugment | None = None
    latent: nn.Module | None = None
    threshold: float | None = None
    tile: int | None = None
    tile_overlap: int = 32
    text_words: bool = False

    def __post_init__(self):
        check_sampler(self.sampler)
        cfg = self.net.cfg
        if self.text_words and not cfg.text_embed_dim:
            raise ValueError(
                f"stage of size {self.size}: text_words needs a Unet that attends to text (text_embed_dim)"
            )
        if cfg.lowres_cond != (self.lowres is not None):
            need = "lowres_cond=True" if self.lowres is not None else "lowres_cond=False"
            raise ValueError(
                f"stage of size {self.size}: its Unet has lowres_cond={cfg.lowres_cond} but the spec "
                f"{'has' if self.lowres else 'has no'} low-res conditioning; build the Unet with {need} (t2i never "
                "rebuilds your module)"
            )
        if self.latent is not None:
            f = self.latent.downsample_factor
            if self.size % f or cfg.channels != self.latent.cfg.latent_channels:
                raise ValueError(
                    f"latent stage: size {self.size} must be divisible by the VQGAN's factor {f} and the Unet needs "
                    f"channels={self.latent.cfg.latent_channels} (has {cfg.channels})"
                )
        elif cfg.channels != 3:
            raise ValueError(f"pixel stage: the Unet needs channels=3 (has {cfg.channels}); or give latent=")

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.latent is None:
            return (3, self.size, self.size)
        f = self.latent.downsample_factor
        return (self.latent.cfg.latent_channels, self.size // f, self.size // f)


@torch.no_grad()
def run_stage(
    stage: DecoderStage,
    *,
    seeds: Seeds,
    image_embed: Tensor | None = None,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    text_map: Tensor | None = None,
    prev: Tensor | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    resample: int = 5,
    callback: Callable | None = None,
) -> Tensor:
    """Sample one decoder stage with the stage's own settings; images in [-1, 1].

    Args:
        stage: the stage spec.
        seeds: one per sample; the stage's noise streams (initial, sampler, RePaint, low-res) derive from them.
        image_embed, text_tokens, text_mask: the conditioning of Unets that take CLIP image embeddings or text.
        text_map: the caption's layout map, for Unets with a text map (``UnetConfig.text_map_grid``).
        prev: the previous stage's images (super-resolution stages).
        known, known_mask: an inpainting request: the image, and its keep-mask (B, 1, H, W), True where kept.
        resample: RePaint passes per step.
        callback: gets the sampler's per-step dict (once per step when inpainting).
    """
    net, b = stage.net, len(seeds)
    dev = next(net.parameters()).device
    cond: dict = {}
    if net.cfg.image_embed_dim:
        cond.update(image_embed=image_embed.to(dev), drop_image=torch.zeros(b, dtype=torch.bool, device=dev))
    if net.cfg.text_embed_dim and text_tokens is not None:
        cond.update(text_tokens=text_tokens.to(dev), text_mask=text_mask.to(dev))
        cond["drop_text"] = torch.zeros(b, dtype=torch.bool, device=dev)
    if net.cfg.text_map_grid and text_map is not None:
        cond.update(text_map=text_map.to(dev), drop_text=torch.zeros(b, dtype=torch.bool, device=dev))
    if stage.lowres is not None:
        if prev is None:
            raise ValueError(f"stage of size {stage.size} needs the previous stage's image")
        low, level = stage.lowres.sample(prev.to(dev), stage.size, _stream(seeds, _LOWRES))
        cond.update(lowres=_to_space(stage, low), lowres_t=level)
    denoise = Denoiser(net, stage.path, stage.prediction)
    if stage.tile is not None:  # innermost: guidance and self-conditioning see whole images
        denoise = TiledDenoiser(denoise, stage.tile, stage.tile_overlap)
    if net.cfg.self_cond:
        denoise = SelfConditioning(denoise)
    uncond = {k: torch.ones(1, dtype=torch.bool, device=dev) for k in ("drop_image", "drop_text") if k in cond}
    if uncond:
        denoise = classifier_free_guidance(denoise, stage.guidance, uncond)
    if stage.latent is None:  # pixel stages: keep x0 in the data range
        denoise = static_threshold(denoise) if stage.threshold is None else dynamic_threshold(denoise, stage.threshold)
    step = get_sampler(stage.sampler)
    # a Unet that learned its variance (iDDPM) samples DDPM with it; other samplers only need its x0
    step_args = {"variance": "learned"} if stage.sampler == "ddpm" and net.cfg.learned_variance else {}
    ts = stage.path.timesteps(stage.steps)
    x = seeds.randn((b, *stage.shape), device=dev) * float(stage.path.sigma(ts[0]))
    noise = _stream(seeds, _SAMPLER)
    with _eval_mode(net):
        if known_mask is None:
            x = step(denoise, x, ts, stage.path, extra_args=cond, noise=noise, callback=callback, **step_args)
        else:
            x0_known, m = _known(stage, known.to(dev), known_mask.to(dev))
            x = sample_repaint(
                denoise,
                x,
                ts,
                stage.path,
                known=x0_known,
                mask=m,
                resample=resample,
                step=step,
                step_args=step_args,
                extra_args=cond,
                callback=callback,
                noise=noise,
                paste_noise=_stream(seeds, _REPAINT),
            )
    return x.clamp(-1, 1) if stage.latent is None else stage.latent.decode(x).clamp(-1, 1)


def _to_space(stage, pixels: Tensor) -> Tensor:
    return pixels if stage.latent is None else stage.latent.encode(pixels)


def _known(stage, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The known region in the stage's space: VQ-encoded for latent stages (not resized pixels)."""
    pix = F.interpolate(image.float(), size=stage.size, mode="area") if image.shape[-1] != stage.size else image
    m = F.interpolate(mask.float(), size=stage.size, mode="nearest")
    if stage.latent is None:
        return pix, m
    f = stage.latent.downsample_factor
    # a latent cell is known only if every pixel under it is (min-pool), so no unknown pixel leaks in
    return stage.latent.encode(pix), -F.max_pool2d(-m, f)
