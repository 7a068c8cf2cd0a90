"""The caption task: train a ``CaptionEncoder`` (t2i.models.caption) to predict the coarse picture of a caption.

Each batch's captions are tokenized by a trained, frozen CLIP (``task.params.clip``) and read as its input
embeddings; the encoder's states go through its picture head, and the loss is the mean squared error against the
batch images averaged over a ``grid`` x ``grid`` partition. The sample grids show what the encoder predicts for
the sample prompts, each cell blown up to the image size: for "a red circle to the left of a blue square" a red
smudge on the left and a blue one on the right once it reads the relation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..trained import load_trained
from . import Task, check_shape_target, shape_map_target

DEFAULT_PROMPTS = ("a red circle to the left of a blue square|a red circle to the right of a blue square|"
                   "a green triangle above a yellow diamond|a green triangle below a yellow diamond")  # fmt: skip


@dataclass
class CaptionTaskConfig:
    clip: str | None = None  # the trained CLIP (run, checkpoint or model file) whose tokens the encoder reads
    caption_key: str = "caption"
    sample_prompts: str = DEFAULT_PROMPTS  # "|"-separated prompts of the sample grids
    # > 0: weight of the shape maps' squared error (model.params.shape_channels, one per shape) against each cell's
    # coverage by each shape (t2i.shapes.scenes.shape_maps, from data.source=shapes' scene metadata), so the
    # states also say which shape goes where; logged as shape_loss
    shape_weight: float = 0.0


class CaptionTask(Task):
    """Coarse-picture regression of a caption encoder (model ``caption_encoder``) on a frozen CLIP's tokens."""

    params_cls = CaptionTaskConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = self.params
        if p.clip is None:
            raise ValueError("task.params.clip is required: the caption encoder reads a trained CLIP's input "
                             "embeddings (e.g. runs/default_clip or models/sd3-shapes/clip.safetensors)")  # fmt: skip
        if not Path(p.clip).exists():
            raise FileNotFoundError(f"task.params.clip={p.clip} does not exist: train the CLIP first "
                                    "(configs/default/clip.yaml) or point it at a model folder's "
                                    "clip.safetensors")  # fmt: skip
        self.clip = load_trained(p.clip, "clip").eval().requires_grad_(False)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        width = self.clip.model.config.text_config.hidden_size
        if model.cfg.width != width:
            raise ValueError(f"model.params.width={model.cfg.width} must equal the CLIP's text width ({width})")
        check_shape_target(self.cfg, "task.params.shape_weight", self.params.shape_weight,
                           "model.params.shape_channels", model.cfg.shape_channels)  # fmt: skip
        if model.cfg.shape_keyed:
            g = getattr(self.clip.cfg, "picture_grid", 0)
            if g != model.cfg.grid:
                raise ValueError(f"model.params.shape_keyed reads the CLIP picture head's colours: it needs a CLIP "
                                 f"with picture_grid={model.cfg.grid} (the encoder's grid), got {g}")  # fmt: skip
        return model

    def _tokens(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        from t2i.models.text import word_embeddings

        self.clip.to(device)
        ids, mask = self.clip.tokenize(list(captions), device=device)
        with torch.no_grad():
            return word_embeddings(self.clip, ids), mask

    @torch.no_grad()
    def _key_picture(self, images: Tensor) -> Tensor:
        """The colours a ``shape_keyed`` head reads: the CLIP picture head's reading of each image's embedding, as a
        decoder gets it from the prior's sampled embedding."""
        return self.clip.predict_picture(self.clip.embed_image(images.float()))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        from t2i.models.caption import coarse_picture

        net = unwrap(model)
        device = net.cells.device
        tokens, mask = self._tokens(batch[self.params.caption_key], device)
        target = coarse_picture(batch["image"].to(device).float(), net.cfg.grid)
        if self.params.shape_weight <= 0:
            picture = net.picture(model(tokens, mask), mask)
            return (picture.float() - target).square().mean((1, 2, 3))
        key = self._key_picture(batch["image"].to(device)) if net.cfg.shape_keyed else None
        picture, shapes = net.pictures(model(tokens, mask), mask, key)
        shape_loss = (shapes.float() - shape_map_target(batch, net.cfg.grid, device)).square().mean((1, 2, 3))
        self.extra_metrics = {"shape_loss": float(shape_loss.detach().mean())}
        return (picture.float() - target).square().mean((1, 2, 3)) + self.params.shape_weight * shape_loss

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, *, seed: int, device: torch.device, steps: int | None = None):
        net = unwrap(model)
        prompts = [s.strip() for s in self.params.sample_prompts.split("|") if s.strip()]
        if not prompts:
            return None
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        was_training = net.training
        net.eval()
        try:
            tokens, mask = self._tokens(prompts, device)
            pictures = net.picture(net(tokens, mask), mask).float()
        finally:
            net.train(was_training)
        size = self.cfg.data.image_size
        return F.interpolate(pictures, size=(size, size), mode="nearest").clamp(-1, 1)


@torch.no_grad()
def score_caption_encoder(encoder: nn.Module, clip: nn.Module, *, split: str = "eval", size: int = 64) -> dict:
    """How well a caption encoder's pictures follow the relation prompts of a benchmark split: the share whose
    predicted coarse picture is closer to the prompt's ground-truth scene than to that scene mirrored along the
    relation's axis (``relation_accuracy``; 0.5 for an encoder blind to the direction), and the picture error."""
    from t2i.data.dataset import ShapesDataset
    from t2i.models.caption import coarse_picture, relation_accuracy
    from t2i.models.text import word_embeddings

    ds = ShapesDataset(split, size)
    chosen = [i for i in range(len(ds)) if ds.prompt(i).spec.category == "position"]  # render only these
    items = [ds[i] for i in chosen]
    captions = [it["caption"] for it in items]
    relations = [next((c.relation for c in ds.prompt(i).spec.include if c.relation), None) for i in chosen]
    ids, mask = clip.tokenize(captions)
    pictures = encoder.picture(encoder(word_embeddings(clip, ids), mask), mask).float()
    targets = coarse_picture(torch.stack([it["image"] for it in items]).float(), encoder.cfg.grid)
    return {"prompts": len(items), "relation_accuracy": relation_accuracy(pictures, targets, relations),
            "mse": float((pictures - targets).square().mean())}  # fmt: skip
