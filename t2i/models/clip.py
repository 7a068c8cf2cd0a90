"""CLIP for unCLIP (Radford et al. 2021): text and image towers with projections, tokenizer and preprocessing.

The towers of a from-scratch model (``ClipEncoder.from_config``, ``ScratchClip``, the model files and folders t2i
writes) are ``t2i.models.clip_towers.ClipTowers``: the parameters of ``transformers``' ``CLIPModel`` under the same
names, in plain PyTorch, so loading a shipped model never imports transformers (about a second of every cold
start). OpenAI and OpenCLIP weights in Hugging Face format load from a local folder into transformers' own
``CLIPModel``, which their tokenizer needs anyway. Either trains with the symmetric contrastive loss.

The tokenizer belongs to the encoder: ``ClipEncoder`` owns it and every caller tokenizes through
``encoder.tokenize``, so a pipeline cannot pair a model with the wrong vocabulary, context length or special
tokens (DALLE2-pytorch's bundled tokenizer adds no start/end tokens while OpenAI CLIP pools at the end token, so
its text embeddings were wrong). Two tokenizers:

- ``WordTokenizer``: a small word-level vocabulary built locally from a caption corpus the caller passes (the
  shapes models use ``t2i.shapes.captions.shapes_tokenizer``), with a character fallback for unseen words, saved
  next to the model as JSON. No download needed.
- ``HFTokenizer``: the tokenizer files of a local Hugging Face folder (``CLIPTokenizer``'s BPE).

Both put ``<start>`` first and ``<end>`` right after the last kept token (truncation keeps ``<end>``), pad with
the pad id, and report a mask. The text tower pools at the first ``<end>`` (``config.eos_token_id``), which
``tests/models/test_clip.py`` checks against the hidden states.

Images enter in t2i's [-1, 1] convention and are preprocessed as the encoder expects: resize the short side
(bicubic, antialiased), centre crop, normalise with the encoder's mean and std.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i.models.clip_towers import ClipTextConfig, ClipTowers, ClipTowersConfig, ClipVisionConfig
from t2i.models.mmdit import sincos_pos_embed_2d

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


class WordTokenizer:
    """Word-level tokenizer with a character fallback; ids 0-3 are ``<pad> <unk> <start> <end>``.

    ``<end>`` is deliberately not id 2: CLIP (``transformers``', and ``ClipTowers`` after it) treats
    ``eos_token_id == 2`` as a legacy config and then pools at the arg-max id instead of at the end token.
    """

    SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")

    def __init__(self, vocab: Sequence[str], context_length: int = 32):
        if list(vocab[:4]) != list(self.SPECIALS):
            raise ValueError(f"the vocabulary must start with {self.SPECIALS}; build it with WordTokenizer.build")
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (start, a token, end), got {context_length}")
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length
        self.pad_id, self.unk_id, self.start_id, self.end_id = 0, 1, 2, 3

    @classmethod
    def build(cls, texts: Iterable[str], *, context_length: int = 32, min_count: int = 1) -> WordTokenizer:
        """A vocabulary of every word seen ``min_count`` times, plus a-z and 0-9 for the character fallback."""
        counts = Counter(w for text in texts for w in _WORD_RE.findall(text.lower()))
        words = sorted(w for w, c in counts.items() if c >= min_count)
        chars = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c not in words]
        return cls([*cls.SPECIALS, *words, *chars], context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        out = []
        for w in _WORD_RE.findall(text.lower()):
            if w in self.ids:
                out.append(self.ids[w])
            else:  # unseen word: spell it out so nothing becomes <unk> that the vocabulary could express
                out.extend(self.ids.get(c, self.unk_id) for c in w)
        return out

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(ids, mask) of shape (B, context_length): ``<start> tokens <end> <pad>...``, truncated to fit."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            toks = [self.start_id, *self.encode(text)[: self.context_length - 2], self.end_id]
            ids[i, : len(toks)] = torch.tensor(toks)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        lengths = (ids == self.end_id).int().argmax(1) + 1
        mask[torch.arange(ids.shape[1])[None] < lengths[:, None]] = True
        return ids, mask

    def save(self, path: str | Path) -> None:
        data = {"type": "word", "vocab": self.vocab, "context_length": self.context_length}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        data = json.loads(Path(path).read_text())
        if data.get("type") != "word":
            raise ValueError(f"{path} is not a t2i word tokenizer file")
        return cls(data["vocab"], data["context_length"])


class HFTokenizer:
    """The CLIP tokenizer of a local Hugging Face folder, padded to the model's context length."""

    def __init__(self, folder: str | Path, context_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.context_length = context_length
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.start_id, self.end_id = self.tok.bos_token_id, self.tok.eos_token_id

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tok(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"].bool()


@dataclass(frozen=True)
class ClipConfig:
    """A from-scratch CLIP's size (for pretrained weights the folder's ``config.json`` is used instead)."""

    embed_dim: int = 512  # joint embedding (projection) width
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    # > 0: a head that predicts each image's coarse picture (its mean colour over a picture_grid x picture_grid
    # partition) from the image embedding; trained with ``contrastive_loss(picture=...)`` so that the embedding
    # keeps where each colour is, which a contrastive loss against captions that cannot tell left from right
    # does not (the shapes CLIP embeds a scene and its mirror image at cosine 0.98). Not used at inference.
    picture_grid: int = 0
    # How the vision tower's position table starts. "learned": transformers' init, normal(0, 0.02): next to patch
    # tokens about ten times larger it barely registers, and a contrastive loss against captions that cannot tell
    # left from right never grows it, so the tower ends a bag of patches (shuffling the shapes CLIP's 64 patches
    # moves its image embedding by cosine 0.996). "sincos": the 2-D sin-cos table of MAE and SD3, scaled to the
    # patch tokens' size at init and still trained, so where a patch is counts from the first step. Only the
    # initial values differ: the parameters, and loading into transformers' CLIPModel, are the same.
    vision_positions: str = "learned"


# a table: one configuration per row
CLIP_PRESETS: dict[str, ClipConfig] = {
    "tiny": ClipConfig(embed_dim=32, text_width=32, text_layers=2, text_heads=2, context_length=24, vision_width=32,
                       vision_layers=2, vision_heads=2, image_size=32, patch_size=8),
    "small": ClipConfig(embed_dim=128, text_width=128, text_layers=4, text_heads=4, context_length=32,
                        vision_width=128, vision_layers=4, vision_heads=4, image_size=64, patch_size=8),
}  # fmt: skip


def towers_config(cfg: ClipConfig, tokenizer: WordTokenizer) -> ClipTowersConfig:
    """The ``ClipTowers`` config of a from-scratch model for this tokenizer."""
    text = ClipTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.start_id,
        eos_token_id=tokenizer.end_id,
    )
    vision = ClipVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=4 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    return ClipTowersConfig(text, vision, projection_dim=cfg.embed_dim)


class ClipEncoder(nn.Module):
    """A CLIP model together with its tokenizer and image preprocessing.

    Args:
        model: a ``ClipTowers``, or a ``transformers.CLIPModel`` (Hugging Face folders); both have the same
            parameter names and the same ``text_model`` / ``vision_model`` call signatures.
        tokenizer: its ``WordTokenizer`` or ``HFTokenizer``.
        image_mean, image_std: per-channel normalisation of [0, 1] images.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: WordTokenizer | HFTokenizer,
        *,
        image_mean: Sequence[float] = OPENAI_MEAN,
        image_std: Sequence[float] = OPENAI_STD,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        ctx = model.config.text_config.max_position_embeddings
        if tokenizer.context_length > ctx:
            raise ValueError(
                f"tokenizer context_length {tokenizer.context_length} exceeds the model's {ctx} positions"
            )
        if tokenizer.end_id != model.config.text_config.eos_token_id:
            raise ValueError(
                f"the tokenizer's end id {tokenizer.end_id} is not the model's eos_token_id "
                f"{model.config.text_config.eos_token_id}: the text tower would pool at the wrong token"
            )
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: ClipConfig, tokenizer: WordTokenizer) -> ClipEncoder:
        """A randomly initialised CLIP (use ``torch.manual_seed`` for reproducibility) for ``tokenizer``: a
        ``ScratchClip``, so every field of ``cfg`` (the picture head, the position table's start) is honoured."""
        if tokenizer.context_length > cfg.context_length:
            raise ValueError("the tokenizer's context_length must not exceed ClipConfig.context_length")
        return ScratchClip(cfg, tokenizer)

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def text_width(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    # -- text ---------------------------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str], device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer(texts)
        dev = device or self.image_mean.device
        return ids.to(dev), mask.to(dev)

    def encode_text(
        self, ids: Tensor, mask: Tensor | None = None, *, words: bool = False, caption: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """(text_embed (B, E) unit-norm, per-token encodings (B, L, W)) for token ids from ``tokenize``.

        ``words=True`` appends the tower's input embeddings of the same tokens (word plus position, each scaled to
        unit RMS) after the encodings: (B, 2L, W). A small CLIP trained contrastively reads captions as a bag of
        words (in the shapes CLIP "left" and "right" have cosine 0.99 from the first layer on), so its encodings
        barely say which way a relation points; the input embeddings still do, and a decoder that attends to them
        can contextualise them itself (``t2i.models.text.ClipTextConditioner`` does the same for SD3).

        ``caption`` (a trained ``t2i.models.caption.CaptionEncoder``, with ``words=True``) replaces those input
        embeddings by its per-token states, which it was trained to compute from exactly them and which do say
        where each object goes.
        """
        if caption is not None and not words:
            raise ValueError("a caption encoder reads the word tokens: pass words=True with it")
        out = self.model.text_model(
            input_ids=ids, attention_mask=None if mask is None else mask.long(), output_hidden_states=words
        )
        embed = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
        tokens = out.last_hidden_state
        if words:
            first = out.hidden_states[0]
            first = first * torch.rsqrt(first.float().square().mean(-1, keepdim=True) + 1e-12).to(first.dtype)
            if caption is not None:
                keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
                first = (caption(first.float(), keep) * keep[..., None]).to(first.dtype)
            tokens = torch.cat([tokens, first], 1)
        return embed, tokens

    def embed_text(
        self, texts: str | Sequence[str], *, words: bool = False, caption: nn.Module | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(text_embed, text_tokens, text_mask) for raw strings; ``words``, ``caption``: see ``encode_text`` (the
        mask is then repeated for the appended tokens)."""
        ids, mask = self.tokenize(texts)
        embed, tokens = self.encode_text(ids, mask, words=words, caption=caption)
        return embed, tokens, torch.cat([mask, mask], 1) if words else mask

    # -- images -------------------------------------------------------------------------------------------------

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, 3, H, W) of any size -> the tower's normalised (B, 3, S, S) input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = (images.float() + 1) / 2
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top : top + s, left : left + s]
        return (x - self.image_mean) / self.image_std

    def embed_image(self, images: Tensor) -> Tensor:
        """Unit-norm CLIP image embeddings (B, E) of [-1, 1] images."""
        pixels = self.preprocess(images).to(self.model.visual_projection.weight.dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    # -- training -----------------------------------------------------------------------------------------------

    def contrastive_loss(
        self,
        images: Tensor,
        ids: Tensor,
        mask: Tensor | None = None,
        negatives: tuple[Tensor, ...] | None = None,
        image_negatives: Tensor | None = None,
        picture: Tensor | None = None,
        picture_weight: float = 1.0,
    ) -> Tensor:
        """Per-sample symmetric InfoNCE (Radford et al. 2021, Fig. 3): mean of image->text and text->image CE.

        ``negatives = (ids, mask, valid)`` adds one hard-negative caption per sample (NegCLIP, Yuksekgonul et al.
        2023): every image is also contrasted against every valid negative text, so a caption with the same words
        in another order (a relation reversed, colours swapped) must score below the true one. Text->image stays
        over the real captions.

        ``image_negatives`` (N, 3, H, W) are the image-side counterpart (``counterfactual_scenes``: a scene
        mirrored, its colours swapped, an object left out): every caption is also contrasted against each of them,
        so the image embedding has to change when the sides, the binding or the count do. Image->text stays over
        the real images.

        ``picture`` (B, 3, g, g), the images' coarse pictures (``t2i.models.caption.coarse_picture`` with the
        config's ``picture_grid``), adds ``picture_weight`` times the mean squared error of the picture head's
        prediction from each image embedding.
        """
        img = self.embed_image(images)
        txt, _ = self.encode_text(ids, mask)
        scale = self.model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.t()  # (B, B)
        image_to_text = logits
        if negatives is not None:
            neg_ids, neg_mask, valid = negatives
            neg, _ = self.encode_text(neg_ids, neg_mask)
            neg_logits = (scale * img @ neg.t()).masked_fill(~valid[None, :], float("-inf"))
            image_to_text = torch.cat([logits, neg_logits], 1)  # (B, 2B)
        text_to_image = logits.t()
        if image_negatives is not None and len(image_negatives):
            neg_img = self.embed_image(image_negatives)
            text_to_image = torch.cat([text_to_image, scale * txt @ neg_img.t()], 1)  # (B, B + N)
        target = torch.arange(len(img), device=img.device)
        loss = 0.5 * (
            F.cross_entropy(image_to_text, target, reduction="none")
            + F.cross_entropy(text_to_image, target, reduction="none")
        )
        if picture is not None:
            loss = loss + picture_weight * (self.predict_picture(img) - picture.float()).square().mean((1, 2, 3))
        return loss

    def predict_picture(self, image_embed: Tensor) -> Tensor:
        """The coarse picture (B, 3, g, g) the picture head reads from unit-norm image embeddings (B, E)."""
        head = getattr(self, "picture_head", None)
        if head is None:
            raise ValueError("this CLIP has no picture head: build it with picture_grid > 0 (ClipConfig)")
        g = self.cfg.picture_grid
        return head(image_embed.to(head[0].weight.dtype)).float().view(-1, 3, g, g)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``contrastive_loss``, per sample (so DDP's forward hooks see the training computation)."""
        return self.contrastive_loss(*args, **kwargs)

    # -- files --------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """A folder with the model (``config.json`` + ``model.safetensors``, the layout and keys of a Hugging Face
        ``CLIPModel`` folder, so transformers reads it too), the tokenizer and the preprocessing constants."""
        from t2i.io import save_weights

        if not isinstance(self.tokenizer, WordTokenizer):
            raise ValueError("only from-scratch encoders (WordTokenizer) are saved by t2i; HF folders already exist")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.model.config.to_dict(), indent=2, default=str))
        save_weights(folder / "model.safetensors", self.model.state_dict())
        self.tokenizer.save(folder / "t2i_tokenizer.json")
        prep = {"image_mean": self.image_mean.flatten().tolist(), "image_std": self.image_std.flatten().tolist()}
        (folder / "t2i_preprocess.json").write_text(json.dumps(prep))

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None) -> ClipEncoder:
        """Load a folder written by ``save``, or a local Hugging Face CLIP folder (OpenAI / OpenCLIP weights).

        A ``save`` folder (it has ``t2i_tokenizer.json``) loads into ``ClipTowers`` with every key checked, also
        when an older t2i wrote it through transformers' ``save_pretrained``. Hugging Face folders load into
        ``transformers.CLIPModel`` (their configs come in several historical layouts that it reads, and their
        tokenizer needs transformers anyway); they must contain ``config.json``, the weights and the tokenizer
        files; the image mean/std come from ``preprocessor_config.json`` when present, else OpenAI's.
        """
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} has no config.json; it is not a saved CLIP folder")
        mean, std = OPENAI_MEAN, OPENAI_STD
        if (folder / "t2i_tokenizer.json").exists():
            tokenizer = WordTokenizer.load(folder / "t2i_tokenizer.json")
            prep = json.loads((folder / "t2i_preprocess.json").read_text())
            mean, std = tuple(prep["image_mean"]), tuple(prep["image_std"])
            model = _load_towers(folder)
        else:
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            tokenizer = HFTokenizer(folder, model.config.text_config.max_position_embeddings)
            pre = folder / "preprocessor_config.json"
            if pre.exists():
                data = json.loads(pre.read_text())
                mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        enc = cls(model.eval(), tokenizer, image_mean=mean, image_std=std)
        return enc.to(device) if device is not None else enc


def _load_towers(folder: Path) -> ClipTowers:
    """The ``ClipTowers`` of a ``ClipEncoder.save`` folder, every key and shape checked."""
    from t2i.io import CheckpointMismatchError, check_state_dict, load_weights

    cfg = ClipTowersConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG where it was
        model = ClipTowers(cfg)
    sd = load_weights(folder / "model.safetensors")
    try:
        check_state_dict(model.state_dict(), sd, what="CLIP")
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{folder}: {err}") from None
    model.load_state_dict(sd, strict=True)
    return model


class ScratchClip(ClipEncoder):
    """A from-scratch CLIP built from a ``ClipConfig`` and the ``WordTokenizer`` of its captions (the ``clip`` entry
    of ``t2i.models.MODELS``: ``build_model("clip", params, tokenizer=...)``).

    The model never builds its own vocabulary: the caller owns the caption corpus. The shapes models use
    ``t2i.shapes.captions.shapes_tokenizer``, which the caption grammar rebuilds identically every time, so a run
    that stored only its ``ClipConfig`` loads again.
    """

    def __init__(self, cfg: ClipConfig, tokenizer: WordTokenizer):
        self.cfg = cfg
        super().__init__(
            ClipTowers(towers_config(cfg, tokenizer)), tokenizer, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
        )
        if cfg.picture_grid < 0:
            raise ValueError(f"picture_grid must be >= 0 (0: no picture head), got {cfg.picture_grid}")
        if cfg.vision_positions not in ("learned", "sincos"):
            raise ValueError(f"vision_positions must be 'learned' or 'sincos', got {cfg.vision_positions!r}")
        if cfg.vision_positions == "sincos":
            self._init_sincos_positions()
        if cfg.picture_grid:
            e = cfg.embed_dim
            self.picture_head = nn.Sequential(
                nn.Linear(e, 4 * e), nn.GELU(), nn.Linear(4 * e, 3 * cfg.picture_grid**2)
            )

    @torch.no_grad()
    def _init_sincos_positions(self) -> None:
        # The table's RMS is set to what the freshly drawn patch embedding gives a unit-variance input, so position
        # and content enter the first layer norm at one scale; the class token's row starts at zero.
        emb = self.model.vision_model.embeddings
        conv = emb.patch_embedding
        grid = self.cfg.image_size // self.cfg.patch_size
        table = sincos_pos_embed_2d(self.cfg.vision_width, grid, grid)
        target = conv.weight.std() * conv.weight[0].numel() ** 0.5
        emb.position_embedding.weight[0].zero_()
        emb.position_embedding.weight[1:] = table * (target / table.pow(2).mean().sqrt())
