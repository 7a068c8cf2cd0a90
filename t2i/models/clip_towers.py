"""CLIP's text and image towers with their projections (Radford et al. 2021), written for t2i, without transformers.

Why: importing ``transformers``' CLIP costs one to four seconds of every cold start, more than torch itself (its
model code pulls in ``torch._dynamo``, ``torch.distributed.tensor`` and, when installed, ``torchao``; measured in
docs/performance.md), and the only thing the shipped models needed from it was the ``CLIPModel`` inside
``t2i.models.clip.ClipEncoder``. ``ClipTowers`` is that model in plain PyTorch.

Interchangeable with ``transformers.CLIPModel``:

- **Parameter names and shapes are the same** (``text_model.encoder.layers.N.self_attn.q_proj``,
  ``vision_model.pre_layrnorm`` with its historical spelling, ``text_projection``, ``logit_scale``, ...), so a state
  dict moves between the two with ``strict=True`` in both directions and the existing model files load unchanged.
  ``position_ids`` is not a parameter: transformers keeps it as a non-persistent buffer, here it is an ``arange``.
- **The function is the same**: pre-LN blocks, a causal text mask combined with the padding mask, ``quick_gelu`` or
  ``gelu`` per config, the text pooled at the first ``eos_token_id`` (or at the arg-max id when ``eos_token_id ==
  2``, transformers' rule for configs written before it had the right end id), the image pooled at the class token
  after ``post_layernorm``. ``hidden_states`` holds the embeddings followed by every block's output, the last one
  before the final LayerNorm, as transformers returns them.
- **A seed gives the same random weights**: modules are created in transformers' order and re-initialised by its
  rule (``_init_weights`` below), so from-scratch training recipes and the random test models are unchanged.

``tests/models/test_clip_towers.py`` checks all three against ``transformers.CLIPModel``.

    towers = ClipTowers(ClipTowersConfig(ClipTextConfig(...), ClipVisionConfig(...), projection_dim=128))
    out = towers.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    text_embed = towers.text_projection(out.pooler_output)                  # (B, projection_dim)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.errors import check_choice
from t2i.nn.attention import attention

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

# Field names and defaults are transformers' (``CLIPTextConfig``, ``CLIPVisionConfig``, ``CLIPConfig``), so a
# ``config.json`` reads into these dataclasses and ``to_dict`` writes one transformers reads back.


@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # the context length
    hidden_act: str = "quick_gelu"  # OpenAI's CLIPs; OpenCLIP's use "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407  # pooling position; 2 means the legacy arg-max rule


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0


@dataclass(frozen=True)
class ClipTowersConfig:
    text_config: ClipTextConfig = ClipTextConfig()
    vision_config: ClipVisionConfig = ClipVisionConfig()
    projection_dim: int = 512  # the joint embedding width
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipTowersConfig:
        """From a ``CLIPModel`` ``config.json`` (keys this module does not use are ignored)."""

        def pick(sub: type, values: Mapping[str, Any]):
            return sub(**{f.name: values[f.name] for f in dataclasses.fields(sub) if f.name in values})

        top = {k: d[k] for k in ("projection_dim", "logit_scale_init_value", "initializer_factor") if k in d}
        text = pick(ClipTextConfig, d.get("text_config") or {})
        if not isinstance(text.eos_token_id, int | None):
            raise ValueError(f"text_config.eos_token_id must be one id, got {text.eos_token_id!r}")
        return cls(text, pick(ClipVisionConfig, d.get("vision_config") or {}), **top)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` for ``transformers.CLIPModel.from_pretrained`` as well as ``from_dict``."""
        d = dataclasses.asdict(self)
        d.update(model_type="clip", architectures=["CLIPModel"])
        d["text_config"]["projection_dim"] = d["vision_config"]["projection_dim"] = self.projection_dim
        return d


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI's sigmoid approximation of GELU
    "gelu": F.gelu,
}


@dataclass
class ClipTowerOutput:
    """What a tower returns (the fields of transformers' ``BaseModelOutputWithPooling`` that t2i reads)."""

    last_hidden_state: Tensor  # (B, N, W), after the text tower's final LayerNorm; the vision tower has none
    pooler_output: Tensor  # (B, W): end token (text), class token after post_layernorm (image); not projected
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings, then each block's output (output_hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Blocks (shared by both towers)
# ----------------------------------------------------------------------------------------------------------------


class ClipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (the checkpoint layout)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of the {heads} heads")
        self.heads, self.dropout = heads, dropout
        # k, v, q: transformers' creation order, which decides what a seed draws for each
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, w = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, w // self.heads).transpose(1, 2)  # (B, H, N, d)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, H, N, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        check_choice("CLIP hidden_act", act, _ACTIVATIONS)
        self.act = _ACTIVATIONS[act]
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ClipTextConfig | ClipVisionConfig):
        super().__init__()
        w = cfg.hidden_size
        self.self_attn = ClipAttention(w, cfg.num_attention_heads, cfg.attention_dropout)
        self.layer_norm1 = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(w, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoderStack(nn.Module):
    """The blocks, under the ``encoder.layers.N`` names of the checkpoints."""

    def __init__(self, cfg: ClipTextConfig | ClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """Every hidden state: the input, then each block's output."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return tuple(states)


# ----------------------------------------------------------------------------------------------------------------
# Towers
# ----------------------------------------------------------------------------------------------------------------


class ClipTextEmbeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[-1]
        if n > self.position_embedding.num_embeddings:
            raise ValueError(f"{n} tokens exceed the text tower's {self.position_embedding.num_embeddings} positions")
        positions = torch.arange(n, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, N, W)


class ClipTextTower(nn.Module):
    """The text transformer: causal attention, final LayerNorm, pooled at the end token."""

    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ClipTextEmbeddings(cfg)
        self.encoder = ClipEncoderStack(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        _init_weights(self, cfg)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> ClipTowerOutput:
        """``input_ids`` (B, N); ``attention_mask`` (B, N), nonzero at real tokens (padding keys are hidden)."""
        ids = input_ids.view(-1, input_ids.shape[-1])
        n = ids.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()[None, None]  # (1, 1, N, N) causal
        if attention_mask is not None:
            mask = mask & attention_mask.view(-1, 1, 1, n).bool()  # (B, 1, N, N)
        states = self.encoder(self.embeddings(ids), mask)
        last = self.final_layer_norm(states[-1])
        if self.config.eos_token_id == 2:  # the legacy rule: the end token had the largest id in OpenAI's vocab
            at = ids.to(torch.int).argmax(-1)
        else:  # the first end token (padding may reuse its id)
            at = (ids == self.config.eos_token_id).int().argmax(-1)
        pooled = last[torch.arange(len(last), device=last.device), at.to(last.device)]
        return ClipTowerOutput(last, pooled, states if output_hidden_states else None)


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        w, p = cfg.hidden_size, cfg.patch_size
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.randn(w))  # drawn first, as in transformers
        self.patch_embedding = nn.Conv2d(cfg.num_channels, w, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, w)  # patches + class token

    def forward(self, pixel_values: Tensor) -> Tensor:
        size = tuple(pixel_values.shape[-2:])
        if size != (self.image_size, self.image_size):
            raise ValueError(f"the vision tower takes {self.image_size}x{self.image_size} images, got {size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, W, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = self.class_embedding.expand(len(patches), 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight  # (B, 1 + h*w, W)


class ClipVisionTower(nn.Module):
    """The ViT: patch embedding, pre-LN, bidirectional blocks, the class token after post-LN as the pooled vector."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ClipVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint key
        self.encoder = ClipEncoderStack(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        _init_weights(self, cfg)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ClipTowerOutput:
        """``pixel_values`` (B, C, S, S), already normalised."""
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        last = states[-1]
        return ClipTowerOutput(last, self.post_layernorm(last[:, 0]), states if output_hidden_states else None)


class ClipTowers(nn.Module):
    """Text and vision towers, their projections into the joint space, and the learnt logit scale."""

    def __init__(self, config: ClipTowersConfig):
        super().__init__()
        self.config = config
        t, v = config.text_config, config.vision_config
        self.text_model = ClipTextTower(t)
        self.vision_model = ClipVisionTower(v)
        self.visual_projection = nn.Linear(v.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(t.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        with torch.no_grad():  # as in transformers: a generic draw per projection (overwritten), then the scaled one
            factor = config.initializer_factor
            for proj in (self.visual_projection, self.text_projection):
                proj.weight.normal_(0.0, 0.02)
            self.text_projection.weight.normal_(0.0, t.hidden_size**-0.5 * factor)
            self.visual_projection.weight.normal_(0.0, v.hidden_size**-0.5 * factor)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Projected (not normalised) pooled text vectors (B, projection_dim)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected (not normalised) pooled image vectors (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_weights(module: nn.Module, cfg: ClipTextConfig | ClipVisionConfig) -> None:
    """transformers' CLIP initialisation (``CLIPPreTrainedModel._init_weights``), applied in its order.

    The rule: normal weights with std ``initializer_range`` on every linear, conv and embedding, zero biases, unit
    LayerNorms; then the block-level override, scaled by ``initializer_factor``: q/k/v ``W^-1/2 (2L)^-1/2``, out
    ``W^-1/2``, fc1 ``(2W)^-1/2``, fc2 ``W^-1/2 (2L)^-1/2``, embeddings ``0.02`` (text) or ``initializer_range``
    (vision), the class token ``W^-1/2``. Children are visited before their parent (``Module.apply`` order), so
    the generic draw happens and is then overwritten; it is kept because skipping it would shift every later draw,
    and with it every random model that t2i builds from a seed (recipes, test models) away from ``CLIPModel``'s.
    """
    for child in module.children():
        _init_weights(child, cfg)
    factor, w, layers = cfg.initializer_factor, cfg.hidden_size, cfg.num_hidden_layers
    if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
        module.weight.normal_(0.0, cfg.initializer_range)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, ClipTextEmbeddings):
        module.token_embedding.weight.normal_(0.0, 0.02 * factor)
        module.position_embedding.weight.normal_(0.0, 0.02 * factor)
    elif isinstance(module, ClipVisionEmbeddings):
        module.class_embedding.normal_(0.0, w**-0.5 * factor)
        module.patch_embedding.weight.normal_(0.0, cfg.initializer_range * factor)
        module.position_embedding.weight.normal_(0.0, cfg.initializer_range * factor)
    elif isinstance(module, ClipAttention):
        in_std = w**-0.5 * (2 * layers) ** -0.5 * factor
        for proj in (module.q_proj, module.k_proj, module.v_proj):
            proj.weight.normal_(0.0, in_std)
        module.out_proj.weight.normal_(0.0, w**-0.5 * factor)
    elif isinstance(module, ClipMLP):
        module.fc1.weight.normal_(0.0, (2 * w) ** -0.5 * factor)
        module.fc2.weight.normal_(0.0, w**-0.5 * (2 * layers) ** -0.5 * factor)
