"""unCLIP training tasks: CLIP (contrastive), the diffusion prior, one decoder stage, and the VQ-GAN.

Each plugs into the one generic loop (``t2i.train.loop``): it returns per-sample losses and the loop does
accumulation, precision, EMA and checkpoints. Per-sample randomness (noise, times, condition dropping, low-res
augmentation) comes from generators seeded by the sample's draw index, like the diffusion task, so a sample's
noise does not depend on the batch split or a resume.

The prior and decoder tasks need CLIP embeddings. They come from a frozen ``ClipEncoder`` that is never part of
the trained model (so the optimiser cannot touch it): ``clip_path`` names a folder saved by ``ClipEncoder.save``, a
local Hugging Face CLIP folder, or a ``clip`` training run (its folder, a checkpoint, or its weights; the
architecture comes from the config stored there). Without ``clip_path`` a random ``clip_preset`` CLIP seeded by
``clip_seed`` is used: random features are still a fixed, informative embedding of each image, which is what the
smoke configs need, but a real run should point at a trained CLIP. The prior can instead read precomputed embeddings
(``cache_path``, written by ``precompute_embeddings``), looked up by each sample's dataset ``index``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset

from t2i.data.transforms import sample_generator
from t2i.diffusion import (
    DenoisingObjective,
    LowresAugment,
    Seeds,
    VPPath,
    check_sampler,
    make_time_sampler,
    self_conditioned_for_training,
    x0_from_prediction,
)
from t2i.diffusion.paths import append_dims
from t2i.errors import check_choice
from t2i.io import load_weights, save_weights
from t2i.models.caption import check_fits_clip, check_text_map
from t2i.models.clip import ClipEncoder

from ..distributed import unwrap
from ..trained import load_trained, model_inputs
from . import Task, check_shape_target, shape_map_target

NOISE_STREAM, AUG_STREAM = 1, 2


def _gens(cfg, batch) -> list[torch.Generator]:
    return [sample_generator(cfg.run.seed, int(d), NOISE_STREAM) for d in batch["id"]]


def load_clip(clip_path: str | None, preset: str, seed: int) -> ClipEncoder:
    """The frozen CLIP of the prior/decoder tasks (see module docstring)."""
    from pathlib import Path

    from t2i.models.clip import CLIP_PRESETS, ClipEncoder, ScratchClip
    from t2i.shapes.captions import shapes_tokenizer

    check_choice("clip_preset", preset, CLIP_PRESETS)
    if clip_path and (Path(clip_path) / "config.json").exists():
        enc = ClipEncoder.load(clip_path)  # ClipEncoder.save folder or a local Hugging Face CLIP
    elif clip_path:
        enc = load_trained(clip_path, "clip")  # a `t2i train` clip run
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            cfg = CLIP_PRESETS[preset]
            enc = ScratchClip(cfg, shapes_tokenizer(context_length=cfg.context_length))
    enc.eval().requires_grad_(False)
    return enc


@torch.no_grad()
def precompute_embeddings(clip: ClipEncoder, dataset: Dataset, path: str, *, batch_size: int = 64) -> None:
    """Write CLIP image/text embeddings and text encodings of ``dataset`` (items with image, caption, index)."""
    rows: dict[str, list[Tensor]] = {
        "index": [],
        "image_embed": [],
        "text_embed": [],
        "text_tokens": [],
        "text_mask": [],
    }
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([it["image"] for it in items])
        text_embed, tokens, mask = clip.embed_text([it["caption"] for it in items])
        rows["index"].append(torch.tensor([int(it["index"]) for it in items]))
        rows["image_embed"].append(clip.embed_image(images))
        rows["text_embed"].append(text_embed)
        rows["text_tokens"].append(tokens.float())
        rows["text_mask"].append(mask)
    save_weights(path, {k: torch.cat(v) for k, v in rows.items()}, metadata={"content": "unclip_embeddings"})


class _EmbeddingSource:
    """CLIP conditioning for a batch: from precomputed rows (by dataset index) or a frozen CLIP on the fly."""

    def __init__(self, p):
        self.cache = None
        self.words = bool(getattr(p, "text_words", False))
        self.caption = None
        if getattr(p, "caption_encoder", None):
            if not self.words or getattr(p, "cache_path", None):
                raise ValueError(
                    "task.params.caption_encoder needs text_words: true and no cache_path (its states replace "
                    "the word tokens, computed on the fly)"
                )
            self.caption = load_trained(p.caption_encoder, "caption_encoder").eval().requires_grad_(False)
        if getattr(p, "cache_path", None):
            self.cache = load_weights(p.cache_path)
            self.row = {int(i): r for r, i in enumerate(self.cache["index"].tolist())}
            self.clip = None
        else:
            self.clip = load_clip(p.clip_path, p.clip_preset, p.clip_seed)
            if self.caption is not None:
                check_fits_clip(self.caption, self.clip)

    @property
    def embed_dim(self) -> int:
        return self.cache["image_embed"].shape[1] if self.cache is not None else self.clip.embed_dim

    @torch.no_grad()
    def __call__(
        self, batch: dict[str, Any], device, *, need_image: bool = True, need_text: bool = True
    ) -> dict[str, Tensor]:
        if self.cache is not None:
            if "index" not in batch:
                raise ValueError("cache_path lookups need batches with a dataset 'index' (e.g. data.source=shapes)")
            missing = [int(i) for i in batch["index"] if int(i) not in self.row]
            if missing:
                raise ValueError(f"dataset indices {missing[:5]} are not in the embedding cache; recompute it")
            rows = torch.tensor([self.row[int(i)] for i in batch["index"]])
            out = {
                k: self.cache[k][rows].to(device) for k in ("image_embed", "text_embed", "text_tokens", "text_mask")
            }
            out["text_mask"] = out["text_mask"].bool()
            return out
        self.clip.to(device)
        if self.caption is not None:
            self.caption.to(device)
        out: dict[str, Tensor] = {}
        if need_text:
            text_embed, tokens, mask = self.clip.embed_text(
                list(batch["caption"]), words=self.words, caption=self.caption
            )
            out.update(text_embed=text_embed, text_tokens=tokens.float(), text_mask=mask)
        if need_image:
            out["image_embed"] = self.clip.embed_image(batch["image"].to(device))
        return out


# ---------------------------------------------------------------------------------------------------------------
# CLIP


@dataclass
class ClipTaskConfig:
    caption_key: str = "caption"
    # one hard-negative caption per sample (t2i.shapes.captions.counterfactual_captions: relation reversed, colours
    # or shapes swapped, count changed), so the text tower must encode order and binding, not a bag of words
    hard_negatives: bool = False
    # one hard-negative image per sample where its scene has one (t2i.shapes.scenes.counterfactual_scenes: mirrored
    # across the relation's axis, colours or shapes swapped, an object left out), so the image tower must encode
    # the sides, the binding and the count; needs the shapes source (its items carry their scene)
    image_negatives: bool = False
    # > 0: weight of the picture loss (the image embedding must predict the image's coarse picture through the
    # model's picture head; model.params.picture_grid > 0), so that it keeps where each colour is
    picture_weight: float = 0.0
    # train the image side only: the text tower and its projection stay as they are, so whatever reads the text
    # side (the caption encoder trained on its input embeddings, sd3-shapes) is unaffected
    freeze_text: bool = False
    # start from this trained CLIP's towers (a run, checkpoint, weights or model file); unlike model.init_from it
    # leaves a picture head the source lacks at its fresh initialisation
    init_towers: str | None = None


class ClipTask(Task):
    """Contrastive CLIP training from scratch (model ``clip``); per-sample symmetric InfoNCE, optionally with a
    hard-negative caption per sample (``task.params.hard_negatives``)."""

    params_cls = ClipTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.params.image_negatives and cfg.data.source != "shapes":
            raise ValueError(
                "task.params.image_negatives renders each sample's scene changed, so it needs data.source: shapes "
                f"(whose items carry their spec and scene), not {cfg.data.source!r}"
            )
        grid = int(cfg.model.params.get("picture_grid", 0) or 0)
        if self.params.picture_weight < 0:
            raise ValueError(f"task.params.picture_weight must be >= 0, got {self.params.picture_weight}")
        if self.params.picture_weight > 0 and not grid:
            raise ValueError("task.params.picture_weight > 0 trains the picture head: set model.params.picture_grid "
                             "(e.g. 8) so the CLIP has one")  # fmt: skip
        if grid and cfg.data.image_size % grid:
            raise ValueError(f"data.image_size={cfg.data.image_size} does not split into a {grid} x {grid} grid "
                             "(model.params.picture_grid)")  # fmt: skip

    def setup_model(self, model: nn.Module) -> None:
        p = self.params
        if p.init_towers:
            source = load_trained(p.init_towers, "clip")
            model.model.load_state_dict(source.model.state_dict(), strict=True)
        if p.freeze_text:
            model.model.text_model.requires_grad_(False)
            model.model.text_projection.requires_grad_(False)

    def model_inputs(self) -> dict[str, Any]:
        return model_inputs("clip", self.cfg.model.params)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        enc = unwrap(model)
        device = enc.image_mean.device
        captions = list(batch[self.params.caption_key])
        ids, mask = enc.tokenize(captions, device=device)
        negatives = None
        if self.params.hard_negatives:
            from t2i.shapes.captions import counterfactual_captions

            # which rewrite a sample gets cycles with its draw id, so every kind is seen and runs stay reproducible
            options = [counterfactual_captions(c) for c in captions]
            draws = [int(d) for d in batch["id"]]
            texts = [o[d % len(o)] if o else c for o, d, c in zip(options, draws, captions, strict=True)]
            valid = torch.tensor([bool(o) for o in options], device=device)
            negatives = (*enc.tokenize(texts, device=device), valid)
        image_negatives = self._image_negatives(batch, device) if self.params.image_negatives else None
        images = batch["image"].to(device)
        picture = None
        if self.params.picture_weight > 0:
            from t2i.models.caption import coarse_picture

            picture = coarse_picture(images.float(), enc.cfg.picture_grid)
        # in-batch negatives only: under DDP each rank contrasts its own micro-batch (no all-gather)
        return model(images, ids, mask, negatives, image_negatives, picture, self.params.picture_weight)

    @staticmethod
    def _image_negatives(batch: dict[str, Any], device) -> Tensor:
        """One counterfactual scene per sample that has one, rendered at the batch's size, as [-1, 1] images."""
        from t2i.data.dataset import to_tensor
        from t2i.shapes.scenes import Scene, counterfactual_scenes, render
        from t2i.shapes.specs import Spec

        size = batch["image"].shape[-1]
        images = []
        for meta, draw in zip(batch["meta"], batch["id"], strict=True):
            record = json.loads(meta)
            options = counterfactual_scenes(Spec.from_dict(record["spec"]), Scene.from_dict(record["scene"]))
            if options:  # which change a sample gets cycles with its draw id, as for the captions
                images.append(render(options[int(draw) % len(options)], size))
        if not images:
            return torch.zeros(0, *batch["image"].shape[1:], device=device)
        return to_tensor(np.stack(images)).to(device)

    def sample(self, model, n, *, seed, device, steps=None):
        return None  # CLIP has no images to show


# ---------------------------------------------------------------------------------------------------------------
# prior


@dataclass
class PriorTaskConfig:
    clip_path: str | None = None  # ClipEncoder / HF folder, or a `t2i train` clip run (folder or weights)
    clip_preset: str = "tiny"  # architecture of the random CLIP used when clip_path is null
    clip_seed: int = 0
    cache_path: str | None = None  # precomputed embeddings (precompute_embeddings), instead of running CLIP
    prediction: str = "x0"  # x0 (the paper) or v
    vp_schedule: str = "cosine"
    num_train_timesteps: int | None = 1000
    loss_type: str = "l2"
    drop_text_prob: float = 0.1  # classifier-free guidance: train this fraction unconditionally
    self_cond_prob: float = 0.5  # used when the prior has self_cond=True
    # read the word tokens after the encodings (model.params.max_text_len twice the CLIP's context), or with
    # ``caption_encoder`` a caption encoder's states of them: see DecoderTaskConfig
    text_words: bool = False
    caption_encoder: str | None = None


class PriorTask(Task):
    """Diffusion prior on scaled CLIP image embeddings, conditioned on the caption's CLIP text encodings."""

    params_cls = PriorTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        if p.prediction not in ("x0", "v", "eps"):
            raise ValueError(f"task.params.prediction must be x0, v or eps, got {p.prediction!r}")
        if not 0 <= p.drop_text_prob < 1 or not 0 <= p.self_cond_prob <= 1:
            raise ValueError("drop_text_prob must lie in [0, 1) and self_cond_prob in [0, 1]")
        self.path = VPPath(p.vp_schedule, p.num_train_timesteps)
        self.objective = DenoisingObjective(
            self.path, p.prediction, make_time_sampler("uniform"), loss_type=p.loss_type
        )
        self.embeddings = _EmbeddingSource(p)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if model.cfg.embed_dim != self.embeddings.embed_dim:
            raise ValueError(f"model.params.embed_dim must be the CLIP width {self.embeddings.embed_dim}")
        if self.params.text_words and self.embeddings.clip is not None:
            need = 2 * self.embeddings.clip.context_length
            if not model.cfg.text_token_dim or model.cfg.max_text_len < need:
                raise ValueError(
                    f"task.params.text_words appends the word tokens: the prior needs text_token_dim > 0 and "
                    f"model.params.max_text_len >= {need} (twice the CLIP's context length)"
                )
        return model

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        net = unwrap(model)
        device = next(model.parameters()).device
        emb = self.embeddings(batch, device)
        gens = _gens(self.cfg, batch)
        x0 = net.scale_embed(emb["image_embed"])  # a new tensor: the cached embedding is never scaled in place
        t = torch.cat([self.objective.sample_time(1, g) for g in gens]).to(device)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        u = torch.stack([torch.rand(2, generator=g) for g in gens]).to(device)
        cond = {"text_embed": emb["text_embed"], "drop_text": u[:, 0] < self.params.drop_text_prob}
        if net.cfg.text_token_dim:
            cond.update(text_tokens=emb["text_tokens"], text_mask=emb["text_mask"])
        fn = model
        if net.cfg.self_cond:
            fn = self_conditioned_for_training(
                model, self.params.prediction, self.path, t, u[:, 1] < self.params.self_cond_prob
            )
        return self.objective(fn, x0, t=t, eps=eps, **cond)

    def sample(self, model, n, *, seed, device, steps=None):
        return None  # embeddings, not images


# ---------------------------------------------------------------------------------------------------------------
# decoder stage


@dataclass
class DecoderTaskConfig:
    clip_path: str | None = None
    clip_preset: str = "tiny"
    clip_seed: int = 0
    stage_size: int | None = None  # the size this stage makes, when below data.image_size (CLIP sees the full image)
    lowres_size: int | None = None  # super-resolution stage: the previous stage's size
    blur_prob: float = 0.5
    max_train_level: float = 0.5  # low-res noise augmentation levels ~ U[0, max]
    sample_level: float = 0.2
    latent_path: str | None = None  # a VQGAN (VQGAN.save file or a vqgan run): diffuse in its latent space
    prediction: str = "eps"
    vp_schedule: str = "cosine"
    num_train_timesteps: int | None = 1000
    weighting: str | None = None  # None | p2 | min_snr
    drop_image_prob: float = 0.1
    drop_text_prob: float = 0.5
    self_cond_prob: float = 0.5
    vb_weight: float = 0.001  # hybrid-loss weight of the variance term (learned_variance Unets only)
    sampler: str = "ddim"
    guidance: float = 1.0
    # attend to the CLIP's input embeddings of the caption's tokens too (``ClipEncoder.encode_text(words=True)``):
    # the encodings of a small contrastive CLIP do not say which way a relation points or which colour goes where
    text_words: bool = False
    # a trained caption encoder (task `caption`, on this CLIP): its per-token states replace the word tokens of
    # ``text_words``. They say where each object goes, which the CLIP image embedding barely does (a scene and its
    # mirror image embed at cosine 0.98), so a decoder that reads them can place what the prior's embedding cannot
    caption_encoder: str | None = None
    # start the Unet's image map (model.params.image_map_grid) as the CLIP's picture head (ClipConfig.picture_grid,
    # the same grid, image_map_channels 3): the map is then the coarse picture the embedding holds from the first
    # step, and the Unet learns to draw on it as a super-resolution stage does on its low-res image
    map_from_clip: bool = False
    # > 0: weight of an auxiliary loss that trains the Unet's shape map (model.params.image_shape_map_channels, one
    # channel per shape) to give each cell's coverage by each shape (t2i.shapes.scenes.shape_maps) from the image
    # embedding, so the decoder is told which shape goes where and not only which colour. Needs data.source=shapes
    # (the scenes' metadata); its squared error is logged as shape_map_loss
    shape_map_weight: float = 0.0
    # a trained caption encoder (task `caption`, on this CLIP) whose layout map of each caption (its colour picture
    # and, with shape_channels, its shape maps: CaptionEncoder.layout_map) the Unet reads as its text map
    # (model.params.text_map_grid / text_map_channels must match). The prior's embedding places colours but does
    # not bind shapes to them; this map, read off the words, says which shape of which colour goes where
    text_map_from: str | None = None


class DecoderTask(Task):
    """One decoder stage (base or super-resolution, pixel or latent) conditioned on CLIP image embeddings."""

    params_cls = DecoderTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        check_sampler(p.sampler, "task.params.sampler")
        self.path = VPPath(p.vp_schedule, p.num_train_timesteps)
        self.objective = DenoisingObjective(
            self.path, p.prediction, make_time_sampler("uniform"), weighting=p.weighting
        )
        self.embeddings = _EmbeddingSource(p)
        self.lowres = None
        if p.lowres_size is not None:
            self.lowres = LowresAugment(
                p.lowres_size, blur_prob=p.blur_prob, max_train_level=p.max_train_level, sample_level=p.sample_level
            )
        self.latent = load_trained(p.latent_path, "vqgan").eval().requires_grad_(False) if p.latent_path else None
        self.layout = None
        if p.text_map_from:
            if self.embeddings.clip is None:
                raise ValueError("task.params.text_map_from reads the captions through the CLIP: drop cache_path")
            self.layout = load_trained(p.text_map_from, "caption_encoder").eval().requires_grad_(False)
        self._last: dict[str, Tensor] | None = None

    def build_model(self) -> nn.Module:
        model = super().build_model()
        c = model.cfg
        if c.lowres_cond != (self.lowres is not None):
            raise ValueError("model.params.lowres_cond must be true exactly when task.params.lowres_size is set")
        if c.image_embed_dim and c.image_embed_dim != self.embeddings.embed_dim:
            raise ValueError(f"model.params.image_embed_dim must be the CLIP width {self.embeddings.embed_dim}")
        want = self.latent.cfg.latent_channels if self.latent is not None else 3
        if c.channels != want:
            raise ValueError(
                f"model.params.channels must be {want} for this stage's {'latent' if self.latent else 'pixel'} space"
            )
        if self.params.map_from_clip:
            clip = self.embeddings.clip
            head = getattr(clip, "picture_head", None)
            if head is None:
                raise ValueError(
                    "task.params.map_from_clip starts the image map as the CLIP's picture head: it needs a CLIP "
                    "trained with model.params.picture_grid > 0 (task.params.clip_path, no cache_path)"
                )
            grid = clip.cfg.picture_grid
            if (c.image_map_grid, c.image_map_channels) != (grid, 3):
                raise ValueError(
                    f"task.params.map_from_clip: set model.params.image_map_grid={grid} (the CLIP's picture_grid) "
                    f"and image_map_channels=3, got {c.image_map_grid} and {c.image_map_channels}"
                )
            # here, before model.init_from or a resume, which then keep their own trained map
            model.image_to_map.load_state_dict(head.state_dict())
        check_shape_target(self.cfg, "task.params.shape_map_weight", self.params.shape_map_weight,
                           "model.params.image_shape_map_channels", c.image_shape_map_channels)  # fmt: skip
        if bool(c.text_map_grid) != (self.layout is not None):
            raise ValueError("model.params.text_map_grid > 0 needs task.params.text_map_from (the caption "
                             "encoder whose layout map the Unet reads), and text_map_from needs "
                             "text_map_grid > 0")  # fmt: skip
        if self.layout is not None:
            check_text_map(self.layout, self.embeddings.clip, c.text_map_grid, c.text_map_channels,
                           "the Unet (model.params)")  # fmt: skip
        return model

    @torch.no_grad()
    def _text_map(self, captions: list[str], device, image_embed: Tensor | None = None) -> Tensor:
        """The layout map of each caption; a ``shape_keyed`` encoder's shape maps read the colours the CLIP picture
        head sees in ``image_embed`` (here the true image's; at sampling the prior's sample)."""
        from t2i.models.text import word_embeddings

        clip = self.embeddings.clip
        self.layout.to(device)
        ids, mask = clip.tokenize(list(captions), device=device)
        key = clip.predict_picture(image_embed) if self.layout.cfg.shape_keyed else None
        return self.layout.layout_map(self.layout(word_embeddings(clip, ids), mask), mask, key).float()

    def _space(self, images: Tensor) -> Tensor:
        if self.latent is None:
            return images
        self.latent.to(images.device)
        with torch.no_grad():
            return self.latent.encode(images)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        from t2i.models.unet import variance_bound_loss

        net, p = unwrap(model), self.params
        device = next(model.parameters()).device
        images = batch["image"].to(device=device, dtype=torch.float32)
        emb = self.embeddings(
            batch, device, need_image=bool(net.cfg.image_embed_dim), need_text=bool(net.cfg.text_embed_dim)
        )
        if p.stage_size is not None and p.stage_size != images.shape[-1]:
            # as in DALL-E 2, CLIP embeds the full-resolution image and the base stage makes a downsampled copy
            images = F.interpolate(images, size=(p.stage_size, p.stage_size), mode="area")
        gens = _gens(self.cfg, batch)
        u = torch.stack([torch.rand(3, generator=g) for g in gens]).to(device)
        cond: dict[str, Tensor] = {}
        if net.cfg.image_embed_dim:
            cond.update(image_embed=emb["image_embed"], drop_image=u[:, 0] < p.drop_image_prob)
        if net.cfg.text_embed_dim:
            cond.update(
                text_tokens=emb["text_tokens"], text_mask=emb["text_mask"], drop_text=u[:, 1] < p.drop_text_prob
            )
        if self.layout is not None:  # hidden with the caption (drop_text) for guidance
            key = emb["image_embed"] if self.layout.cfg.shape_keyed else None
            cond.update(text_map=self._text_map(batch["caption"], device, key), drop_text=u[:, 1] < p.drop_text_prob)
        if self.lowres is not None:
            aug = [sample_generator(self.cfg.run.seed, int(d), AUG_STREAM) for d in batch["id"]]
            low, level = self.lowres.train(images, aug)
            cond.update(lowres=self._space(low), lowres_t=level)
        x0 = self._space(images)
        self._last = {"images": images[:16].detach(), **{k: v[:16].detach() for k, v in cond.items()}}
        t = torch.cat([self.objective.sample_time(1, g) for g in gens]).to(device)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        fn = model
        if net.cfg.self_cond:
            fn = self_conditioned_for_training(model, p.prediction, self.path, t, u[:, 2] < p.self_cond_prob)
        if not net.cfg.learned_variance:
            loss = self.objective(fn, x0, t=t, eps=eps, **cond)
        else:  # hybrid loss (iDDPM): the simple loss on the mean plus the variance bound on the learned variance
            x_t = self.path.add_noise(x0, eps, t)
            pred, v = fn(x_t, self.path.model_time(t).float(), return_variance=True, **cond)
            simple = self.objective.loss_from_prediction(pred, x0, eps, t)
            a = append_dims(self.path.alpha(t), x0.ndim).to(x0)
            s = append_dims(self.path.sigma(t), x0.ndim).to(x0)
            x0_hat = x0_from_prediction(p.prediction, pred.float(), x_t, a, s)
            loss = simple + p.vb_weight * variance_bound_loss(self.path, x0, x_t, x0_hat, v.float(), t)
        if p.shape_map_weight > 0:  # on every sample's own embedding, dropped for guidance or not
            target = shape_map_target(batch, net.cfg.image_map_grid, device)
            shape_loss = (net.shape_map(emb["image_embed"]).float() - target).square().mean((1, 2, 3))
            self.extra_metrics = {"shape_map_loss": float(shape_loss.detach().mean())}
            loss = loss + p.shape_map_weight * shape_loss
        return loss

    @torch.no_grad()
    def sample(self, model, n, *, seed, device, steps=None):
        """Reconstructions of the last training images from their own CLIP image embeddings (the decoder sanity
        check the reference lacked): if these are noise, the decoder is not learning."""
        from t2i.pipelines.unclip import DecoderStage, run_stage

        if self._last is None:
            return None
        last = {k: v[:n].to(device) for k, v in self._last.items()}
        images = last["images"]
        stage = DecoderStage(
            model,
            images.shape[-1],
            self.path,
            self.params.prediction,
            sampler=self.params.sampler,
            steps=steps or self.cfg.run.sample_steps,
            guidance=self.params.guidance,
            lowres=self.lowres,
            latent=self.latent,
            text_words=self.params.text_words,
        )
        prev = self.lowres.downsample(images) if self.lowres is not None else None
        return run_stage(
            stage,
            seeds=Seeds.from_base(seed, len(images)),
            image_embed=last.get("image_embed"),
            text_tokens=last.get("text_tokens"),
            text_mask=last.get("text_mask"),
            text_map=last.get("text_map"),
            prev=prev,
        )


# ---------------------------------------------------------------------------------------------------------------
# VQ-GAN


@dataclass
class VQGANTaskConfig:
    recon_loss: str = "l1"  # l1 | l2
    gan_weight: float = 0.0  # adversarial weight (needs model.params.discriminator=true); 0 disables
    gan_start: int = 0  # optimiser step after which the adversarial terms switch on


class VQGANTask(Task):
    """Reconstruction + VQ losses, and an optional hinge GAN trained with the same optimiser.

    The generator term is computed through the discriminator with *detached* weights (``functional_call``) and the
    discriminator term on detached reconstructions, so each part of the model only gets its own gradient.
    """

    params_cls = VQGANTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.params.recon_loss not in ("l1", "l2"):
            raise ValueError(f"task.params.recon_loss must be l1 or l2, got {self.params.recon_loss!r}")
        if self.params.gan_weight < 0:
            raise ValueError("task.params.gan_weight must be >= 0")
        self._calls = 0
        self._last: Tensor | None = None

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if self.params.gan_weight > 0 and model.discriminator is None:
            raise ValueError("task.params.gan_weight > 0 needs model.params.discriminator=true")
        return model

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        net = unwrap(model)
        device = next(model.parameters()).device
        x = batch["image"].to(device=device, dtype=torch.float32)
        self._last = x[:16].detach()
        recon, _, vq = model(x)
        err = (recon - x).abs() if self.params.recon_loss == "l1" else (recon - x) ** 2
        loss = err.flatten(1).mean(1) + vq
        step = self._calls // max(self.cfg.optim.grad_accum, 1)
        self._calls += 1
        if self.params.gan_weight > 0 and step >= self.params.gan_start:
            disc = net.discriminator
            frozen = {k: v.detach() for k, v in disc.named_parameters()}
            g = -functional_call(disc, frozen, (recon,)).flatten(1).mean(1)  # generator hinge term
            d = F.relu(1 - disc(x)).flatten(1).mean(1) + F.relu(1 + disc(recon.detach())).flatten(1).mean(1)
            loss = loss + self.params.gan_weight * g + d
        return loss

    @torch.no_grad()
    def sample(self, model, n, *, seed, device, steps=None):
        """Reconstructions of the last training images (top half of the grid: inputs)."""
        if self._last is None:
            return None
        x = self._last[: max(1, n // 2)].to(device)
        was = model.training
        model.eval()
        try:
            recon = model.decode(model.encode(x))
        finally:
            model.train(was)
        return torch.cat([x, recon]).clamp(-1, 1)
