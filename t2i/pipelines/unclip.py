"""The unCLIP cascade (Ramesh et al. 2022): CLIP text -> prior -> base decoder -> super-resolution stages.

Composition only: every stage is an explicit spec (its module, size, noise path, parameterisation, sampler, steps,
guidance, low-res conditioning, optional latent space), validated once against the module it wraps. Nothing is
rebuilt: where DALLE2-pytorch re-instantiated the user's Unets to flip flags (losing their weights), a mismatch
here is a ``ValueError`` that says which flag the module needs.

Also here, because models never import the diffusion core:

- ``sample_prior``: prior sampling with any core sampler, classifier-free guidance on null text, optional
  self-conditioning and best-of-n reranking by CLIP similarity to the caption;
- ``LowresAugment``: low-res conditioning (downsample, optional Gaussian blur, upsample, Imagen-style noise
  augmentation with its own noise path), shared by training and sampling so the two cannot drift apart;
- editing: variations (decode an image's CLIP embedding), interpolation (slerp, fixed noise), text-diff edits and
  RePaint inpainting (Lugmayr et al. 2022) whose known region is VQ-encoded, not resized, in latent stages.

Seeds: sample ``k`` of a request keeps its noise whatever the batch (``t2i.diffusion.Seeds``); each stage and the
prior draw from their own offset of the sample's seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.diffusion import (
    SAMPLERS,
    Denoiser,
    NoisePath,
    Seeds,
    VPPath,
    append_dims,
    classifier_free_guidance,
    dynamic_threshold,
    get_sampler,
    x0_from_prediction,
)
from t2i.models.clip import ClipEncoder
from t2i.models.prior import PriorNetwork
from t2i.models.unet import Unet

# Random streams derived from a sample's seed s: s + (stage * 16 + stream) * 2**32. Stage 0 is the prior, stage k + 1
# decoder stage k; streams are initial noise, sampler noise, RePaint noise and low-res augmentation noise. Offsets
# of 2**32 keep every stream of every sample apart as long as seeds stay below 2**32.
_INIT, _SAMPLER, _REPAINT, _LOWRES = 0, 1, 2, 3


def _stream(seeds: Seeds | Sequence[int], stream: int, stage: int = 0) -> Seeds:
    base = seeds.seeds if isinstance(seeds, Seeds) else list(seeds)
    return Seeds([s + (stage * 16 + stream) * 2**32 for s in base])


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def slerp(a: Tensor, b: Tensor, frac: Tensor | float) -> Tensor:
    """Spherical interpolation of unit vectors (B, D) at ``frac`` (B,) or scalar; exact at 0 and 1."""
    frac = torch.as_tensor(frac, dtype=a.dtype, device=a.device).expand(a.shape[0])[:, None]
    a_n, b_n = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    out = (torch.sin((1 - frac) * omega) / so) * a + (torch.sin(frac * omega) / so) * b
    return torch.where(frac == 0, a, torch.where(frac == 1, b, out))


class SelfConditioning:
    """Feed each call's x0 estimate back as ``self_cond`` on the next call (Chen et al. 2023, sampling side)."""

    def __init__(self, denoise: Callable[..., Tensor]):
        self.denoise, self.last = denoise, None

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        prev = self.last if self.last is not None and self.last.shape == x.shape else torch.zeros_like(x)
        out = self.denoise(x, t, self_cond=prev, **cond)
        self.last = out.detach()
        return out


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 3) -> Tensor:
    """Separable Gaussian blur with reflect padding (no kornia dependency)."""
    if sigma <= 0:
        return x
    r = kernel_size // 2
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@dataclass
class LowresAugment:
    """Low-res conditioning of a super-resolution stage (unCLIP Sec. C; Imagen's noise augmentation).

    Training: downsample the target to ``lowres_size``, blur with probability ``blur_prob`` (sigma uniform in
    ``blur_sigma``), upsample back (bilinear), then noise it to a level ~ U[0, ``max_train_level``] on
    ``noise_path``; the level is passed to the Unet as ``lowres_t``. Sampling: no blur, level ``sample_level``.
    """

    lowres_size: int
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_kernel: int = 3
    max_train_level: float = 0.5
    sample_level: float = 0.2
    noise_path: NoisePath = field(default_factory=lambda: VPPath("cosine", None))

    def __post_init__(self):
        if not (0 <= self.sample_level <= 1 and 0 <= self.max_train_level <= 1 and 0 <= self.blur_prob <= 1):
            raise ValueError("sample_level, max_train_level and blur_prob must lie in [0, 1]")

    def downsample(self, images: Tensor) -> Tensor:
        return F.interpolate(images, size=self.lowres_size, mode="area")

    def upsample(self, lowres: Tensor, size: int) -> Tensor:
        return F.interpolate(lowres, size=size, mode="bilinear", align_corners=False, antialias=False)

    def _noise(self, x: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        a = append_dims(self.noise_path.alpha(level.double()), x.ndim).to(x)
        s = append_dims(self.noise_path.sigma(level.double()), x.ndim).to(x)
        return a * x + s * noise

    def train(self, images: Tensor, gens: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
        """(upsampled augmented low-res image, level (B,)) for targets ``images`` (B, C, H, W) in [-1, 1]."""
        size = images.shape[-1]
        low = self.downsample(images)
        u = torch.stack([torch.rand(3, generator=g) for g in gens])  # blur?, sigma, level
        blurred = []
        for i in range(len(low)):
            sigma = self.blur_sigma[0] + float(u[i, 1]) * (self.blur_sigma[1] - self.blur_sigma[0])
            do = float(u[i, 0]) < self.blur_prob
            blurred.append(gaussian_blur(low[i : i + 1], sigma, self.blur_kernel) if do else low[i : i + 1])
        up = self.upsample(torch.cat(blurred), size)
        level = (u[:, 2] * self.max_train_level).to(images.device)
        noise = torch.stack([torch.randn(up.shape[1:], generator=g) for g in gens]).to(up)
        return self._noise(up, level, noise), level.float()

    def sample(self, prev: Tensor, size: int, seeds: Seeds) -> tuple[Tensor, Tensor]:
        """Condition for sampling from the previous stage's output ``prev`` (B, C, h, w)."""
        up = self.upsample(prev.float(), size)
        level = torch.full((len(prev),), self.sample_level, device=prev.device)
        return self._noise(up, level, seeds.randn(up.shape, device=up.device)), level


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

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
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
    was = net.training
    net.eval()
    try:
        out = get_sampler(spec.sampler)(
            denoise, x, ts, spec.path, extra_args=cond, noise=_stream(cand, _SAMPLER), callback=callback
        )
    finally:
        net.train(was)
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

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        cfg = self.net.cfg
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


@contextmanager
def _placed(module: nn.Module | None, device: torch.device | None):
    """Run with ``module`` on ``device`` and put it back where it was afterwards (one stage on the device)."""
    if module is None or device is None:
        yield
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


class UnCLIPPipeline:
    """CLIP + prior + decoder cascade.

    Args:
        clip: the ClipEncoder (tokenizer included) the prior and decoders were trained with.
        prior: prior sampling spec (None: only image-embedding inputs, e.g. variations).
        stages: decoder stages in increasing size.
        device: where each stage runs; None runs every module where it already is.
        offload: with ``device``, move each module there only while it runs (one stage on the device at a time).
    """

    def __init__(
        self,
        clip: ClipEncoder,
        prior: PriorSpec | None,
        stages: Sequence[DecoderStage],
        *,
        device: str | torch.device | None = None,
        offload: bool = False,
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
        self.clip, self.prior, self.stages = clip, prior, list(stages)
        self.device = None if device is None else torch.device(device)
        self.offload = offload
        if device is not None and not offload:
            for m in (clip, prior.net if prior else None, *[s.net for s in stages], *[s.latent for s in stages]):
                if m is not None:
                    m.to(self.device)

    def _where(self, module):
        return _placed(module, self.device if self.offload else None)

    # -- 1. text ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        with self._where(self.clip):
            embed, tokens, mask = self.clip.embed_text(list(prompts))
        return embed, tokens, mask

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        with self._where(self.clip):
            dev = next(self.clip.parameters()).device
            return self.clip.embed_image(images.to(dev))

    # -- 2. prior ----------------------------------------------------------------------------------------------

    def image_embeds_from_text(
        self, prompts: Sequence[str], seeds: Seeds, callback: Callable | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.prior is None:
            raise ValueError("this pipeline has no prior; pass image embeddings or images instead of prompts")
        embed, tokens, mask = self.encode_prompts(prompts)
        with self._where(self.prior.net):
            image_embed = sample_prior(
                self.prior, embed, text_tokens=tokens, text_mask=mask, seeds=seeds, callback=callback
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
    ) -> Tensor:
        """Run stages ``start_stage .. stop_stage`` (inclusive) from image embeddings; images in [-1, 1].

        ``image`` is the previous stage's output when ``start_stage > 0`` (partial runs), or the image to inpaint
        with ``inpaint_mask`` (B, 1, H, W), True where the image is kept. ``callback`` gets each stage sampler's
        per-step dict, with the stage index under ``"stage"``.
        """
        stop = len(self.stages) - 1 if stop_stage is None else stop_stage
        if not 0 <= start_stage <= stop < len(self.stages):
            raise ValueError(f"need 0 <= start_stage <= stop_stage < {len(self.stages)}")
        if start_stage > 0 and image is None:
            raise ValueError(f"start_stage={start_stage} needs image= (the output of stage {start_stage - 1})")
        if inpaint_mask is not None and image is None:
            raise ValueError("inpainting needs image= (the image whose masked-in region is kept)")
        prev = image if start_stage > 0 else None
        for k in range(start_stage, stop + 1):
            stage = self.stages[k]
            stage_seeds = _stream(seeds, _INIT, stage=k + 1)
            with self._where(stage.net), self._where(stage.latent):
                prev = run_stage(
                    stage,
                    image_embed,
                    text_tokens,
                    text_mask,
                    prev,
                    stage_seeds,
                    image if inpaint_mask is not None else None,
                    inpaint_mask,
                    resample,
                    None if callback is None else lambda d, k=k: callback({**d, "stage": k}),
                )
        return prev

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


@torch.no_grad()
def run_stage(
    stage: DecoderStage,
    image_embed: Tensor | None,
    text_tokens: Tensor | None,
    text_mask: Tensor | None,
    prev: Tensor | None,
    seeds: Seeds,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    resample: int = 5,
    callback: Callable | None = None,
) -> Tensor:
    """Sample one decoder stage; ``prev`` is the previous stage's image (SR stages), ``known``/``known_mask``
    the image and keep-mask of an inpainting request. Returns images in [-1, 1]. ``callback`` gets the sampler's
    per-step dict (text-to-image sampling; the learned-variance DDPM and RePaint loops do not report steps)."""
    net, b = stage.net, len(seeds)
    dev = next(net.parameters()).device
    cond: dict = {}
    if net.cfg.image_embed_dim:
        cond.update(image_embed=image_embed.to(dev), drop_image=torch.zeros(b, dtype=torch.bool, device=dev))
    if net.cfg.text_embed_dim and text_tokens is not None:
        cond.update(text_tokens=text_tokens.to(dev), text_mask=text_mask.to(dev))
        cond["drop_text"] = torch.zeros(b, dtype=torch.bool, device=dev)
    if stage.lowres is not None:
        if prev is None:
            raise ValueError(f"stage of size {stage.size} needs the previous stage's image")
        low, level = stage.lowres.sample(prev.to(dev), stage.size, _stream(seeds, _LOWRES))
        cond.update(lowres=_to_space(stage, low), lowres_t=level)
    denoise = Denoiser(net, stage.path, stage.prediction)
    if net.cfg.self_cond:
        denoise = SelfConditioning(denoise)
    uncond = {k: torch.ones(1, dtype=torch.bool, device=dev) for k in ("drop_image", "drop_text") if k in cond}
    if uncond:
        denoise = classifier_free_guidance(denoise, stage.guidance, uncond)
    if stage.latent is None:
        denoise = _clamped(denoise) if stage.threshold is None else dynamic_threshold(denoise, stage.threshold)
    ts = stage.path.timesteps(stage.steps)
    x = seeds.randn((b, *stage.shape), device=dev) * float(stage.path.sigma(ts[0]))
    noise = _stream(seeds, _SAMPLER)
    was = net.training
    net.eval()
    try:
        if known_mask is None and net.cfg.learned_variance and stage.sampler == "ddpm":
            clamp = stage.latent is None
            x = sample_ddpm_learned_variance(
                net,
                x,
                ts,
                stage.path,
                stage.prediction,
                cond=cond,
                uncond=uncond,
                guidance=stage.guidance,
                noise=noise,
                clamp=clamp,
            )
        elif known_mask is None:
            x = get_sampler(stage.sampler)(denoise, x, ts, stage.path, extra_args=cond, noise=noise, callback=callback)
        else:
            x0_known, m = _known(stage, known.to(dev), known_mask.to(dev))
            x = _repaint(stage, denoise, x, ts, cond, noise, _stream(seeds, _REPAINT), x0_known, m, resample)
    finally:
        net.train(was)
    return x.clamp(-1, 1) if stage.latent is None else stage.latent.decode(x).clamp(-1, 1)


@torch.no_grad()
def sample_ddpm_learned_variance(
    net: nn.Module,
    x: Tensor,
    ts: Tensor,
    path: NoisePath,
    prediction: str,
    *,
    cond: dict,
    uncond: dict,
    guidance: float = 1.0,
    noise: Seeds | None = None,
    clamp: bool = True,
) -> Tensor:
    """DDPM ancestral sampling with the network's learned variance (Nichol & Dhariwal 2021, Eq. 15), any grid.

    Between grid points t > s the forward variance is ``v_ts = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2`` and the
    posterior's ``v_ts sigma_s^2 / sigma_t^2``; the step variance is ``exp(v log v_ts + (1 - v) log posterior)``
    with the network's v in [0, 1] (v = 0 is ``sample_ddpm(variance="small")``, v = 1 ``"large"``). Guidance
    combines the x0 estimates; the variance comes from the conditional branch. ``net(x, model_t,
    return_variance=True, **cond) -> (prediction, v)``.
    """
    from t2i.nn.noise import randn_like

    x = x.float()
    alphas, sigmas = path.alpha(ts).tolist(), path.sigma(ts).tolist()
    alphas[-1], sigmas[-1] = (1.0, 0.0) if float(ts[-1]) == 0 else (alphas[-1], sigmas[-1])
    guided = guidance != 1.0 and bool(uncond)
    prev = None
    for i in range(len(ts) - 1):
        t = ts[i].to(x.device).expand(len(x))
        a_t, s_t, a_s, s_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        c = dict(cond)
        if getattr(net.cfg, "self_cond", False):
            c["self_cond"] = prev if prev is not None else torch.zeros_like(x)
        xin, mt = x, path.model_time(t).float()
        if guided:  # cond and uncond in one batch
            xin, mt = torch.cat([x, x]), torch.cat([mt, mt])
            c = {
                k: torch.cat([v, uncond[k].expand_as(v) if k in uncond else v]) if isinstance(v, Tensor) else v
                for k, v in c.items()
            }
        pred, v = net(xin, mt, return_variance=True, **c)
        x0 = x0_from_prediction(prediction, pred.float(), xin, torch.tensor(a_t), torch.tensor(s_t))
        if guided:
            (x0_c, x0_u), v = x0.chunk(2), v[: len(x)]
            x0 = x0_u + guidance * (x0_c - x0_u)
        x0 = x0.clamp(-1, 1) if clamp else x0
        prev = x0
        a_ts = a_t / a_s
        v_ts = s_t**2 - a_ts**2 * s_s**2
        mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * v_ts / s_t**2) * x0
        if s_s > 0:
            log_small, log_large = math.log(v_ts * s_s**2 / s_t**2), math.log(v_ts)
            logvar = v.float() * log_large + (1 - v.float()) * log_small
            x = mean + torch.exp(0.5 * logvar) * randn_like(x, noise)
        else:
            x = mean
    return x


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


def _repaint(stage, denoise, x, ts, cond, noise, paste_noise, x0_known, m, resample):
    """RePaint (Lugmayr et al. 2022, Alg. 1): paste the re-noised known region after every step and jump back
    ``resample - 1`` times per step to harmonise; the last step pastes the clean known region exactly."""
    step = get_sampler(stage.sampler)
    path, n = stage.path, len(ts) - 1
    for i in range(n):
        t, t_next = ts[i], ts[i + 1]
        for r in range(resample):
            x_next = step(denoise, x, ts[i : i + 2], path, extra_args=cond, noise=noise)
            if float(t_next) > 0:
                eps = paste_noise.randn(x0_known.shape, device=x.device)
                known_next = path.add_noise(x0_known, eps, t_next.expand(len(x)).to(x.device))
            else:
                known_next = x0_known
            x_next = m * known_next + (1 - m) * x_next
            if r == resample - 1 or float(t_next) == 0:
                break
            # jump back: sample x_t ~ q(x_t | x_{t_next})
            a_t, s_t, a_n, s_n = (
                float(path.alpha(t)),
                float(path.sigma(t)),
                float(path.alpha(t_next)),
                float(path.sigma(t_next)),
            )
            ratio = a_t / a_n
            std = math.sqrt(max(s_t**2 - ratio**2 * s_n**2, 0.0))
            x = ratio * x_next + std * paste_noise.randn(x.shape, device=x.device)
        x = x_next
    return x


def _clamped(denoise):
    """Static thresholding: clamp the x0 estimate of a pixel-space stage to the data range [-1, 1]."""

    def clamped(x: Tensor, t: Tensor, **cond) -> Tensor:
        return denoise(x, t, **cond).clamp(-1, 1)

    return clamped
