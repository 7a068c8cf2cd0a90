"""A small bidirectional caption encoder trained to say where each word's thing goes in the picture.

Why it exists. In "a red circle to the left of a blue square" the side a colour goes on is a conjunction of two
facts: which way the relation word points and which object the sentence names first ("B right of A" draws the
same scene). Neither fact alone says anything about where a colour goes. A denoiser that has to discover the
conjunction through its own attention learns it only from the rare training steps at very high noise, where the
layout is decided, and the shapes MMDiT never did: it put the two objects on the right axis and picked the side
at random, through every continuation and curriculum tried (docs/quality_analysis.md). SD3 gets word roles from
T5, pre-trained on language; a 128-wide CLIP trained contrastively on captions learns a bag of words instead.

The same conjunction is easy with a clean signal. This encoder reads the CLIP's input embeddings of a caption's
tokens (word plus position; the CLIP's later layers wash word order out) through a few bidirectional transformer
blocks and is trained to regress the coarse picture (``grid`` x ``grid`` RGB, the average colour of each cell) of
the caption's scene: learned queries, one per cell, attend to its states and each predicts its cell's colour. The
only way to predict where red goes is for red's states to say so, so after training each word's state carries
where its object goes, as a linear feature an image model's attention can use. Its per-token states then feed the
MMDiT where SD3 puts T5's (``t2i.models.text.ClipTextConditioner``); the coarse-picture head is only for training.

It is trained on the same stream as the image models (``t2i train configs/default/caption.yaml``, task
``caption``) and never sees the benchmark's evaluation prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.nn.attention import attention

from .base import SavableModel, make_config


@dataclass
class CaptionEncoderConfig:
    width: int = 128  # the CLIP's text width: the encoder reads its input embeddings and speaks in the same width
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    grid: int = 8  # the coarse picture the training head predicts: grid x grid cells
    channels: int = 3
    # > 0: a second head predicts this many shape-coverage maps on the same grid (``pictures``; one per shape,
    # task.params.shape_weight): the colour picture says where each colour goes, not which shape goes with it.
    # It has its own cell queries, so it can be added to a trained encoder (model.train_only) without changing
    # the states or the colour picture
    shape_channels: int = 0
    # the shape head's cell queries also read the colour the scene has at their cell (``shape_maps(..., picture=)``,
    # a coarse picture such as a CLIP picture head's reading of an image embedding), so it answers "which shape does
    # the caption give the colour here". Where a caption fixes no layout ("a red triangle and a pink square"), a map
    # from the words alone can only be a blur of every layout; keyed by the image's colours it binds each shape to
    # its colour wherever the image puts it
    shape_keyed: bool = False

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.shape_keyed and not self.shape_channels:
            raise ValueError("shape_keyed needs shape_channels > 0 (the shape maps it keys)")
        if self.shape_channels < 0:
            raise ValueError(f"shape_channels must be >= 0 (0: no shape maps), got {self.shape_channels}")
        if self.depth < 1 or self.grid < 1 or self.channels < 1:
            raise ValueError(f"depth, grid and channels must be >= 1, got {self.depth}, {self.grid}, "
                             f"{self.channels}")  # fmt: skip


class _Block(nn.Module):
    """A pre-norm bidirectional transformer block over the caption's tokens (padding keys masked out)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: Tensor, keys: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attention(q, k, v, keys).transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class CaptionEncoder(SavableModel):
    """``encoder(tokens, mask) -> states``: ``tokens`` ``(B, L, width)`` are the CLIP's input embeddings of a
    caption (unit RMS per token), ``mask`` ``(B, L)`` true at real tokens; ``states`` ``(B, L, width)`` have unit
    RMS per token, zeros at padding. ``encoder.picture(states, mask)`` is the training head: ``(B, channels, grid,
    grid)``, the coarse picture the caption describes, in the images' [-1, 1] range."""

    config_cls = CaptionEncoderConfig
    kind = "caption_encoder"

    def __init__(self, cfg: CaptionEncoderConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = make_config(CaptionEncoderConfig, cfg, kwargs)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False)
        # the training head: one learned query per cell of the coarse picture, attending to the caption's states
        self.cells = nn.Parameter(torch.randn(cfg.grid * cfg.grid, cfg.width) / math.sqrt(cfg.width))
        self.head_q, self.head_kv = nn.Linear(cfg.width, cfg.width), nn.Linear(cfg.width, 2 * cfg.width)
        self.head_out = nn.Linear(cfg.width, cfg.channels)
        if cfg.shape_channels:
            self.shape_cells = nn.Parameter(torch.randn(cfg.grid * cfg.grid, cfg.width) / math.sqrt(cfg.width))
            self.shape_q, self.shape_kv = nn.Linear(cfg.width, cfg.width), nn.Linear(cfg.width, 2 * cfg.width)
            self.shape_head_out = nn.Linear(cfg.width, cfg.shape_channels)
        if cfg.shape_keyed:
            self.shape_colour_in = nn.Linear(cfg.channels, cfg.width)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.width:
            raise ValueError(f"expected caption tokens of shape (B, L, {self.cfg.width}), got {tuple(tokens.shape)}")
        mask = mask.bool()
        keys = mask[:, None, None, :]
        x = tokens
        for block in self.blocks:
            x = block(x, keys)
        return self.norm(x) * mask[..., None].to(x.dtype)  # LayerNorm without affine: unit RMS, zero mean

    def _cells_read(self, states: Tensor, mask: Tensor, cells: Tensor, to_q: nn.Linear, to_kv: nn.Linear) -> Tensor:
        """Each cell's query ((grid * grid, width), or one set per sample) attending to the caption's states:
        (B, grid * grid, width)."""
        B, L, D = states.shape
        H, g = self.cfg.heads, self.cfg.grid
        q = to_q(cells).view(-1, g * g, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = to_kv(states).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
        return attention(q, k, v, mask.bool()[:, None, None, :]).transpose(1, 2).reshape(B, g * g, D)

    def _grid(self, cells: Tensor, head: nn.Linear) -> Tensor:
        g = self.cfg.grid
        return head(cells).transpose(1, 2).reshape(cells.shape[0], head.out_features, g, g)

    def picture(self, states: Tensor, mask: Tensor) -> Tensor:
        return self._grid(self._cells_read(states, mask, self.cells, self.head_q, self.head_kv), self.head_out)

    def shape_maps(self, states: Tensor, mask: Tensor, picture: Tensor | None = None) -> Tensor:
        """(B, shape_channels, grid, grid): each cell's predicted coverage by each shape (``shape_channels`` > 0);
        ``picture`` (B, channels, grid, grid): the scene's coarse colours, which a ``shape_keyed`` head reads."""
        if not self.cfg.shape_channels:
            raise ValueError("this caption encoder has no shape maps (model.params.shape_channels: 0)")
        cells = self.shape_cells
        if self.cfg.shape_keyed:
            g, c = self.cfg.grid, self.cfg.channels
            if picture is None or tuple(picture.shape[1:]) != (c, g, g):
                got = None if picture is None else tuple(picture.shape)
                raise ValueError(f"this caption encoder's shape maps are keyed by the scene's colours: pass "
                                 f"picture= of shape (B, {c}, {g}, {g}), got {got}")  # fmt: skip
            colours = picture.flatten(2).transpose(1, 2).to(cells.dtype)  # (B, g * g, channels)
            cells = cells + self.shape_colour_in(colours)
        cells = self._cells_read(states, mask, cells, self.shape_q, self.shape_kv)
        return self._grid(cells, self.shape_head_out)

    @property
    def layout_channels(self) -> int:
        return self.cfg.channels + self.cfg.shape_channels

    def layout_map(self, states: Tensor, mask: Tensor, picture: Tensor | None = None) -> Tensor:
        """(B, layout_channels, grid, grid): the colour picture with the shape maps (if any) after it, the map a
        decoder reads as its text map (``UnetConfig.text_map_grid``); ``picture`` keys ``shape_keyed`` maps."""
        if not self.cfg.shape_channels:
            return self.picture(states, mask)
        return torch.cat(self.pictures(states, mask, picture), 1)

    def pictures(self, states: Tensor, mask: Tensor, picture: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The colour picture and the shape maps (``shape_channels`` > 0; ``picture`` keys ``shape_keyed`` ones)."""
        shapes = self.shape_maps(states, mask, picture)
        return self.picture(states, mask), shapes


def coarse_picture(images: Tensor, grid: int) -> Tensor:
    """The training target: each image's mean colour over a ``grid`` x ``grid`` partition (area averages)."""
    if images.shape[-1] % grid or images.shape[-2] % grid:
        raise ValueError(f"images of {tuple(images.shape[-2:])} px do not split into a {grid} x {grid} grid")
    return F.adaptive_avg_pool2d(images, grid)


@torch.no_grad()
def relation_accuracy(pictures: Tensor, targets: Tensor, relations: list[str | None]) -> float:
    """The share of relation captions whose predicted coarse picture is closer to its true scene than to that
    scene mirrored along the relation's axis (left/right: flipped horizontally; above/below: vertically). A
    predictor blind to the relation's direction scores about 0.5; one that reads it, near 1."""
    hits = []
    for p, t, rel in zip(pictures, targets, relations, strict=True):
        if rel is None:
            continue
        mirrored = t.flip(-1) if rel in ("left of", "right of") else t.flip(-2)
        hits.append(float((p - t).square().mean() < (p - mirrored).square().mean()))
    if not hits:
        raise ValueError("relation_accuracy needs at least one caption with a relation")
    return sum(hits) / len(hits)


def check_fits_clip(caption: CaptionEncoder, clip: nn.Module) -> None:
    """Raise a clear error unless ``caption`` reads the width of ``clip``'s text tower (a ``ClipEncoder``): a caption
    encoder is trained on one CLIP's input embeddings and means nothing on another's."""
    width = clip.model.config.text_config.hidden_size
    if caption.cfg.width != width:
        raise ValueError(
            f"the caption encoder is {caption.cfg.width} wide but the CLIP's text tower is {width}: train it on "
            "this CLIP (task `caption`)"
        )


def check_text_map(caption: CaptionEncoder, clip: nn.Module, grid: int, channels: int, reader: str) -> None:
    """Raise a clear error unless ``caption`` can make the ``channels`` x ``grid`` x ``grid`` text map a Unet reads
    (``UnetConfig.text_map_grid`` / ``text_map_channels``; ``reader`` names that Unet) on ``clip``'s tokens, with the
    picture head its keyed shape maps read (``shape_keyed``)."""
    check_fits_clip(caption, clip)
    g, c = caption.cfg.grid, caption.layout_channels
    if (grid, channels) != (g, c):
        raise ValueError(f"{reader} reads a {channels} x {grid} x {grid} text map, but the caption encoder makes "
                         f"{c} x {g} x {g}: set text_map_grid={g} and text_map_channels={c}")  # fmt: skip
    if caption.cfg.shape_keyed and getattr(clip, "picture_head", None) is None:
        raise ValueError("the caption encoder's shape maps are keyed by the CLIP picture head's colours of the image "
                         "embedding, but this CLIP has no picture head (picture_grid > 0)")  # fmt: skip
