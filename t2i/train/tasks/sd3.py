"""The SD3 training task: rectified-flow matching of an MMDiT on VAE latents with CLIP-L/G + T5 conditioning.

The SD3 recipe (Esser et al. 2024):

- x_t = (1 - t) x0 + t eps on VAE latents in the MMDiT's latent format, velocity target eps - x0, plain MSE;
- logit-normal training times (m=0, s=1, the paper's best ``rf/lognorm(0.00, 1.00)``), warped by the timestep
  shift (3.0 for the released models), as diffusers' SD3 scripts effectively do;
- each text encoder dropped independently per sample (≈46% each in the paper): a dropped encoder's features
  become zeros, which is both the T5-free inference input and, with all three dropped, an unconditional input for
  classifier-free guidance.

Frozen components are loaded from ``task.params.vae`` / ``task.params.text`` (a diffusers folder or official file)
or attached in Python (``task.vae = ...``); batches may instead carry precomputed ``latent`` (MMDiT space) and
``context``/``pooled`` tensors. Two caches avoid re-running the frozen encoders: text embeddings by caption, and
VAE posteriors (mean, std) by image content; a posterior sample is then drawn per draw from the sample's own
generator, so caching never changes the training stream. Noise, times and dropout come from generators seeded by
the draw index, as in the generic diffusion task.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from t2i.data.transforms import sample_generator
from t2i.diffusion import DenoisingObjective, LogitNormalTime, RectifiedFlow, check_sampler
from t2i.models.files import stored_model_name

from ..distributed import unwrap
from ..trained import load_trained
from . import Task

NOISE_STREAM, DROPOUT_STREAM, POSTERIOR_STREAM = 1, 2, 3


@dataclass
class SD3TaskConfig:
    shift: float = 3.0  # timestep shift applied to the logit-normal training times
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str | None = None  # None (paper) | sigma_sqrt | cosmap
    drop_clip_l: float = 0.46  # per-sample probability of zeroing each encoder's features
    drop_clip_g: float = 0.46
    drop_t5: float = 0.46
    clip_widths: tuple[int, int] = (768, 1280)  # CLIP-L, CLIP-G widths (read from the text encoder when loaded)
    clip_tokens: int = 77
    vae: str | None = None  # VAE source (official file or diffusers vae/ folder); None: batches carry latents
    text: str | None = None  # diffusers folder with text_encoder{,_2,_3} + tokenizers; None: batches carry text
    load_t5: bool = True
    t5_length: int = 77
    cache_text: bool = True  # memoise text embeddings by caption
    cache_latents: bool = True  # memoise VAE posteriors by image content
    sampler: str = "euler"  # sample grids
    guidance: float = 4.5
    sample_prompts: str = ""  # "|"-separated prompts of the sample grids (default: the last batch's captions)
    latent_scale: float | None = None  # a VAE trained by t2i: its LatentFormat (None: measured on the data)
    latent_shift: float | None = None
    text_layer: int = -2  # a CLIP trained by t2i as the text encoder: the hidden layer used as context
    text_chars: int = 0  # with such a CLIP: character tokens of the quoted text after its tokens (T5's slot)
    text_words: bool = False  # with such a CLIP: its input embeddings of the prompt's tokens too (T5's slot)
    text_word_positions: float = 0.0  # > 0: a sincos code of each word token's index at this RMS (word order)
    text_word_prefix: float = 0.0  # > 0: each word token plus its left context's mean at this RMS (relations)
    caption_encoder: str | None = None  # a trained caption encoder (task `caption`): its states replace the words


class SD3Task(Task):
    """Flow-matching training of an ``MMDiT`` (model name ``mmdit``) the SD3 way."""

    params_cls = SD3TaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        for name in ("drop_clip_l", "drop_clip_g", "drop_t5"):
            if not 0.0 <= getattr(p, name) < 1.0:
                raise ValueError(f"task.params.{name} must lie in [0, 1), got {getattr(p, name)}")
        check_sampler(p.sampler, "task.params.sampler")
        self.path = RectifiedFlow(p.shift)
        self.objective = DenoisingObjective(
            self.path, "flow", LogitNormalTime(p.logit_mean, p.logit_std), weighting=p.weighting, shift_times=True
        )
        self.seed = cfg.run.seed
        self.vae: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        for name, path in (("vae", p.vae), ("text", p.text), ("caption_encoder", p.caption_encoder)):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(
                    f"task.params.{name}={path} does not exist: train that component first (configs/default/ holds "
                    "the recipes: `make train-defaults` runs them in order), or point it at an existing run, a "
                    "model folder's component file (e.g. models/sd3-shapes/vae.safetensors) or SD3 weights"
                )
        if p.vae is not None:
            self.vae = self._load_vae(p.vae)
            if cfg.run.precision == "bf16":
                # the frozen encoder runs on every batch under bf16 autocast, where oneDNN's convolutions are
                # faster in channels_last (1.2x for 64 images of 64 px, docs/performance.md); same function
                self.vae.to(memory_format=torch.channels_last)
        if p.text is not None:
            if stored_model_name(p.text) == "clip":  # a small CLIP trained by `t2i train` (the shapes models)
                from t2i.models.text import ClipTextConditioner

                caption = load_trained(p.caption_encoder, "caption_encoder") if p.caption_encoder else None
                self.text_encoder = ClipTextConditioner(load_trained(p.text, "clip").eval(), p.text_layer,
                                                        p.text_chars, p.text_words, p.text_word_positions,
                                                        p.text_word_prefix, caption)  # fmt: skip
                self.params.clip_widths, self.params.clip_tokens = self.text_encoder.widths, self.text_encoder.tokens
            else:
                from t2i.models.sd3_loading import load_text_encoder

                self.text_encoder = load_text_encoder(p.text, load_t5=p.load_t5, t5_length=p.t5_length)
        self._text_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._latent_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._last: dict[str, Any] = {}

    def _load_vae(self, source: str) -> nn.Module:
        """An official/diffusers SD3 VAE, or an ``sd3_vae`` trained by ``t2i train`` with its latent format."""
        p = self.params
        if stored_model_name(source) != "sd3_vae":
            from t2i.models.sd3_loading import load_vae

            return load_vae(source, dtype=torch.float32)
        from t2i.models.vae import LatentFormat

        vae = load_trained(source, "sd3_vae").eval().requires_grad_(False)
        if (p.latent_scale is None) != (p.latent_shift is None):
            raise ValueError("set both task.params.latent_scale and task.params.latent_shift, or neither")
        if p.latent_scale is not None:
            vae.latent_format = LatentFormat(p.latent_scale, p.latent_shift)
            return vae
        if self.cfg.data.source != "shapes":
            raise ValueError("measure the VAE's latent format on your data (t2i.train.tasks.vae.latent_format_"
                             "from_data) and set task.params.latent_scale and latent_shift")  # fmt: skip
        from t2i.data.dataset import ShapesDataset

        from .vae import latent_format_from_data

        data = ShapesDataset("train", self.cfg.data.image_size, seed=self.seed + 1)
        vae.latent_format = latent_format_from_data(vae, torch.stack([data[i]["image"] for i in range(512)]))
        print(f"measured the VAE's latent format: task.params.latent_scale={vae.latent_format.scale} "
              f"task.params.latent_shift={vae.latent_format.shift} (set both to pin them)")  # fmt: skip
        return vae

    # -- conditioning and latents ---------------------------------------------------------------------------------

    def _widths(self) -> tuple[int, int]:
        if hasattr(self.text_encoder, "widths"):
            return tuple(self.text_encoder.widths)
        if self.text_encoder is not None:
            return self.text_encoder.clip_l.config.hidden_size, self.text_encoder.clip_g.config.hidden_size
        return tuple(self.params.clip_widths)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """``(context, pooled)`` for captions through the frozen text stack, memoised by caption."""
        if self.text_encoder is None:
            raise ValueError("batches carry captions but no text encoder is set; set task.params.text")
        todo = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if todo:
            ctx, pooled = self.text_encoder(todo)
            if not self.params.cache_text:
                found = dict(zip(todo, zip(ctx, pooled, strict=True), strict=True))
                return torch.stack([found[c][0] for c in captions]), torch.stack([found[c][1] for c in captions])
            for c, x, y in zip(todo, ctx, pooled, strict=True):
                self._text_cache[c] = (x.cpu(), y.cpu())
        return (torch.stack([self._text_cache[c][0] for c in captions]),
                torch.stack([self._text_cache[c][1] for c in captions]))  # fmt: skip

    @torch.no_grad()
    def encode_images(self, images: Tensor, gens: list[torch.Generator]) -> Tensor:
        """MMDiT-space latents: a posterior sample per image from its own generator (posteriors memoised by image
        content when ``cache_latents``)."""
        if self.vae is None:
            raise ValueError("batches carry images but no VAE is set; set task.params.vae or cache latents")
        dev = next(self.vae.parameters()).device
        if self.params.cache_latents:
            keys = [hashlib.sha1(im.float().cpu().numpy().tobytes()).hexdigest() for im in images]
            missing = [i for i, k in enumerate(keys) if k not in self._latent_cache]
            if missing:
                mean, std = self.vae.moments(images[missing].to(dev))
                for i, m, s in zip(missing, mean, std, strict=True):
                    self._latent_cache[keys[i]] = (m.cpu(), s.cpu())
            mean = torch.stack([self._latent_cache[k][0] for k in keys])
            std = torch.stack([self._latent_cache[k][1] for k in keys])
        else:  # a streamed dataset never repeats an image: no hashing, no lookups
            mean, std = (m.cpu() for m in self.vae.moments(images.to(dev)))
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
        return self.vae.latent_format.process_in(mean + std * eps)

    def drop_text(self, context: Tensor, pooled: Tensor, gens: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Zero each encoder's features independently per sample (CLIP-L, CLIP-G, T5)."""
        p = self.params
        u = torch.stack([torch.rand(3, generator=g) for g in gens])  # (B, 3)
        drop = u < torch.tensor([p.drop_clip_l, p.drop_clip_g, p.drop_t5])
        wl, wg = self._widths()
        n = p.clip_tokens
        keep = lambda col: (~drop[:, col]).to(context.dtype).to(context.device)  # noqa: E731
        context, pooled = context.clone(), pooled.clone()
        context[:, :n, :wl] *= keep(0)[:, None, None]
        context[:, :n, wl : wl + wg] *= keep(1)[:, None, None]
        context[:, n:] *= keep(2)[:, None, None]
        pooled[:, :wl] *= keep(0)[:, None]
        pooled[:, wl : wl + wg] *= keep(1)[:, None]
        return context, pooled

    # -- Task interface ---------------------------------------------------------------------------------------------

    prediction = "flow"

    def _inputs(self, batch: dict[str, Any], drop: bool) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """(latents, context, pooled, draw ids) of a batch, text dropped per sample when ``drop``."""
        ids = [int(d) for d in batch["id"]]
        if "latent" in batch:
            x0 = batch["latent"].float()
        else:
            x0 = self.encode_images(batch["image"], [sample_generator(self.seed, d, POSTERIOR_STREAM) for d in ids])
        if "context" in batch:
            context, pooled = batch["context"].float(), batch["pooled"].float()
        else:
            context, pooled = self.encode_text(list(batch["caption"]))
        if drop:
            gens = [sample_generator(self.seed, d, DROPOUT_STREAM) for d in ids]
            context, pooled = self.drop_text(context, pooled, gens)
        self._last = {"shape": tuple(x0.shape[1:]), "captions": list(batch.get("caption", [])),
                      "context": context[:1].cpu(), "pooled": pooled[:1].cpu()}  # fmt: skip
        return x0, context, pooled, ids

    def distill_inputs(self, model: nn.Module, batch: dict[str, Any], device) -> tuple[Tensor, dict, dict]:
        """(latents, cond, uncond) of a batch for the distillation tasks; uncond is the all-dropped (zero) text."""
        x0, context, pooled, _ = self._inputs(batch, drop=False)
        cond = {"context": context.to(device), "pooled": pooled.to(device)}
        uncond = {"context": torch.zeros_like(cond["context"][:1]), "pooled": torch.zeros_like(cond["pooled"][:1])}
        return x0.to(device), cond, uncond

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        device = next(model.parameters()).device
        x0, context, pooled, ids = self._inputs(batch, drop=True)
        gens = [sample_generator(self.seed, d, NOISE_STREAM) for d in ids]
        t = torch.cat([self.objective.sample_time(1, g) for g in gens])  # (B,) float64, shifted logit-normal
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        x0 = x0.to(device)
        return self.objective(
            model, x0, t=t.to(device), eps=eps.to(device), context=context.to(device), pooled=pooled.to(device)
        )

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, *, seed: int, device: torch.device, steps: int | None = None):
        if self.vae is None or "shape" not in self._last:
            return None  # latents without a decoder: nothing to put in an image grid
        net = unwrap(model)
        p = self.params
        pipe = self._pipeline(net, steps or self.cfg.run.sample_steps, device)
        f = self.vae.downscale
        _, h, w = self._last["shape"]
        prompts = [s.strip() for s in p.sample_prompts.split("|") if s.strip()] or self._last["captions"]
        if self.text_encoder is not None and prompts:
            prompts = [prompts[i % len(prompts)] for i in range(n)]
            context, pooled = pipe.encode_prompt(prompts)
            neg = pipe.encode_prompt([""])
        else:  # cached embeddings only: repeat the last batch's first conditioning, zeros as unconditional
            context = self._last["context"].expand(n, -1, -1).to(device)
            pooled = self._last["pooled"].expand(n, -1).to(device)
            neg = (torch.zeros_like(context[:1]), torch.zeros_like(pooled[:1]))
        was_training = net.training
        net.eval()
        try:
            images = pipe(context=context, pooled=pooled, negative_context=neg[0], negative_pooled=neg[1],
                          seeds=list(range(seed, seed + n)), height=h * f, width=w * f, output="tensor")  # fmt: skip
        finally:
            net.train(was_training)
        return images * 2 - 1

    def _pipeline(self, net: nn.Module, steps: int, device):
        from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset

        p = self.params
        preset = SD3Preset(steps=steps, guidance=p.guidance, sampler=p.sampler, shift=p.shift)
        return SD3Pipeline(net, self.vae, self.text_encoder, preset=preset, device=device)

    def caption_sampler(self, model: nn.Module, *, steps: int, device):
        if self.vae is None or self.text_encoder is None:
            return None  # batches carry cached latents / text states: no way from a caption to an image
        pipe = self._pipeline(unwrap(model), steps, device)
        size = self.cfg.data.image_size

        def fn(captions: list[str], seeds: list[int]) -> Tensor:
            return pipe(list(captions), seeds=list(seeds), height=size, width=size, output="tensor")  # [0, 1]

        return fn
