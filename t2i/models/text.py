"""The SD3 text stack: CLIP-L/14 + OpenCLIP bigG/14 + T5-v1.1-XXL -> ``(context, pooled)`` (Esser et al. 2024).

Built on ``transformers`` (``CLIPTextModelWithProjection`` twice, ``T5EncoderModel``) with tokenizers from local
folders. What SD3 takes from each encoder (SD3.5 spec §4):

- CLIP-L and CLIP-G: the **penultimate** layer's hidden states (no final LayerNorm), 77 tokens each; pooled = the
  final-LN'd EOS state, CLIP-G's projected by ``text_projection``. CLIP-L's pooled vector is taken *unprojected*
  as the official reference does (its ``clip_l.safetensors`` ships no projection); diffusers projects it, which
  agrees only when that projection is the identity, so ``clip_l_projection=True`` reproduces diffusers.
- T5: the last hidden state (after T5's final RMS norm), no attention mask, so pad tokens count: the sequence
  length changes the output. 77 matches the reference for short prompts, 256 is diffusers' default.
- ``context = [pad_4096(CLIP-L ‖ CLIP-G) ; T5]`` along the sequence, CLIP tokens first: ``(B, 77 + L_t5, 4096)``;
  ``pooled = CLIP-L ‖ CLIP-G``: ``(B, 2048)``. Without T5 its rows are zeros (they still pass the context
  embedder and are attended to, as in diffusers' T5-free mode).

CLIP-L pads with EOS, CLIP-G with token 0 ("!"), whatever the tokenizer folders say, because that is what the
models were trained with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .caption import check_fits_clip

CLIP_LENGTH = 77


def _module_device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


class SD3TextEncoder(nn.Module):
    """CLIP-L + CLIP-G (+ optional T5) encoders and tokenizers producing SD3's ``(context, pooled)``.

    Args:
        clip_l, clip_g: ``transformers.CLIPTextModelWithProjection`` models.
        t5: a ``transformers.T5EncoderModel`` or None (then T5 rows are zeros).
        tokenizer_l, tokenizer_g, tokenizer_t5: Hugging Face tokenizers (needed only to encode strings).
        t5_length: T5 tokens per prompt (77 as the reference for short prompts, 256 as diffusers).
        t5_truncate: cut longer T5 prompts to ``t5_length`` (diffusers); False pads to at least ``t5_length``
            and keeps every token (the reference; the batch is padded to its longest prompt).
        context_dim: width of the context when T5 is absent (4096, T5-XXL's width).
        clip_l_projection: project CLIP-L's pooled vector (diffusers) instead of using it raw (reference).
    """

    def __init__(
        self,
        clip_l: nn.Module,
        clip_g: nn.Module,
        t5: nn.Module | None = None,
        *,
        tokenizer_l=None,
        tokenizer_g=None,
        tokenizer_t5=None,
        t5_length: int = 77,
        t5_truncate: bool = True,
        context_dim: int = 4096,
        clip_l_projection: bool = False,
    ):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        if t5_length < 1:
            raise ValueError(f"t5_length must be positive, got {t5_length}")
        self.t5_length, self.t5_truncate = t5_length, t5_truncate
        self.context_dim = int(t5.config.d_model) if t5 is not None else context_dim
        self.clip_l_projection = clip_l_projection
        width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if width > self.context_dim:
            raise ValueError(f"CLIP widths ({width}) exceed the context width {self.context_dim}")

    # -- tokenisation -------------------------------------------------------------------------------------------

    @staticmethod
    def _clip_ids(tokenizer, prompts: Sequence[str], pad_id: int) -> Tensor:
        if tokenizer is None:
            raise ValueError("this text encoder has no CLIP tokenizers; pass token ids to encode_tokens instead")
        enc = tokenizer(
            list(prompts), padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
        )
        ids = enc["input_ids"]
        # force the trained padding token: EOS for CLIP-L, 0 ("!") for CLIP-G
        return torch.where(enc["attention_mask"].bool(), ids, torch.full_like(ids, pad_id))

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids ``{"l", "g", "t5"?}``: CLIP ``(B, 77)`` each, T5 ``(B, L)``."""
        eos = self.tokenizer_l.eos_token_id if self.tokenizer_l is not None else None
        out = {"l": self._clip_ids(self.tokenizer_l, prompts, eos), "g": self._clip_ids(self.tokenizer_g, prompts, 0)}
        if self.t5 is not None:
            if self.tokenizer_t5 is None:
                raise ValueError("T5 is loaded but its tokenizer is not; pass tokenizer_t5 or drop T5")
            pad = self.tokenizer_t5.pad_token_id or 0
            if self.t5_truncate:
                enc = self.tokenizer_t5(
                    list(prompts), padding="max_length", max_length=self.t5_length, truncation=True,
                    return_tensors="pt",
                )  # fmt: skip
            else:
                enc = self.tokenizer_t5(list(prompts), padding="longest", return_tensors="pt")
            ids = torch.where(enc["attention_mask"].bool(), enc["input_ids"], pad)
            if ids.shape[1] < self.t5_length:
                ids = F.pad(ids, (0, self.t5_length - ids.shape[1]), value=pad)
            out["t5"] = ids
        return out

    # -- encoding -----------------------------------------------------------------------------------------------

    @staticmethod
    def _clip(model: nn.Module, ids: Tensor, project: bool) -> tuple[Tensor, Tensor]:
        """Penultimate hidden states ``(B, 77, W)`` and the EOS pooled vector (projected or not)."""
        out = model.text_model(input_ids=ids.to(_module_device(model)), output_hidden_states=True)
        pooled = out.pooler_output
        if project:
            pooled = model.text_projection(pooled)
        return out.hidden_states[-2], pooled

    def encode_tokens(self, ids_l: Tensor, ids_g: Tensor, ids_t5: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(context (B, 77 + L_t5, D), pooled (B, W_l + W_g))`` from token ids, in float32."""
        if ids_l.shape[1] != CLIP_LENGTH or ids_g.shape[1] != CLIP_LENGTH:
            raise ValueError(f"CLIP token ids must be exactly {CLIP_LENGTH} long (SD3 adds the full position table)")
        h_l, p_l = self._clip(self.clip_l, ids_l, self.clip_l_projection)
        h_g, p_g = self._clip(self.clip_g, ids_g, True)
        lg = torch.cat([h_l.float(), h_g.float().to(h_l.device)], dim=-1)  # (B, 77, W_l + W_g)
        lg = F.pad(lg, (0, self.context_dim - lg.shape[-1]))  # zero channels up to the T5 width
        if self.t5 is not None and ids_t5 is not None:
            t5 = self.t5(input_ids=ids_t5.to(_module_device(self.t5))).last_hidden_state.float().to(lg.device)
        else:
            t5 = lg.new_zeros(lg.shape[0], self.t5_length, self.context_dim)
        pooled = torch.cat([p_l.float(), p_g.float().to(p_l.device)], dim=-1)
        return torch.cat([lg, t5], dim=1), pooled

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode prompts to ``(context, pooled)``; the empty string gives SD3's unconditional embedding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenize(prompts)
        return self.encode_tokens(ids["l"], ids["g"], ids.get("t5"))

    def clip_l_projection_is_identity(self, atol: float = 1e-3) -> bool:
        """Whether CLIP-L's ``text_projection`` is I, i.e. the reference and diffusers pooled vectors agree."""
        w = self.clip_l.text_projection.weight
        if w.shape[0] != w.shape[1]:
            return False
        return bool(torch.allclose(w.float(), torch.eye(w.shape[0], device=w.device), atol=atol))


# -- standard configurations of the released encoders (for the official single files, which carry no config) -----


def _clip_text_config(width: int, layers: int, heads: int, act: str):
    """The released CLIP text towers share their vocabulary, context and special tokens; they differ in size."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                          projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)  # fmt: skip


def clip_l_config():
    return _clip_text_config(768, 12, 12, "quick_gelu")  # OpenAI CLIP ViT-L/14's text tower


def clip_g_config():
    return _clip_text_config(1280, 32, 20, "gelu")  # OpenCLIP ViT-bigG/14's text tower


def t5_xxl_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip


def build_clip_from_state_dict(config, sd: dict[str, Tensor], *, dtype=None, device=None) -> nn.Module:
    """A ``CLIPTextModelWithProjection`` from a bare state dict, built on ``meta`` and filled in place.

    A missing ``text_projection`` (the official ``clip_l.safetensors``) becomes the identity, so projected and
    unprojected pooled vectors agree, as kohya's and stable-diffusion.cpp's loaders do.
    """
    from transformers import CLIPTextModelWithProjection

    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.eye(config.hidden_size, config.projection_dim)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    _assign(model, sd, dtype, device)
    emb = model.text_model.embeddings  # the one non-persistent buffer, rebuilt off meta
    emb.position_ids = torch.arange(config.max_position_embeddings, device=device).expand(1, -1)
    return model.eval()


def build_t5_from_state_dict(config, sd: dict[str, Tensor], *, dtype=None, device=None) -> nn.Module:
    """A ``T5EncoderModel`` from a bare state dict (``encoder.*``, ``shared.weight``), built on ``meta``."""
    from transformers import T5EncoderModel

    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    with torch.device("meta"):
        model = T5EncoderModel(config)
    _assign(model, sd, dtype, device)
    model.encoder.embed_tokens = model.shared
    return model.eval()


def _assign(model: nn.Module, sd: dict[str, Tensor], dtype, device) -> None:
    sd = {
        k: v.to(device=device or "cpu", dtype=dtype if v.is_floating_point() and dtype else v.dtype)
        for k, v in sd.items()
    }
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd) - {"encoder.embed_tokens.weight"})
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"text encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(sd, strict=False, assign=True)


# The characters a glyph token spells (case-folded: the shapes world draws upper-case words).
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_OTHER_GLYPH, _FIRST_POSITION = 36, 40  # glyph token dimensions: any other character; position 0
_QUOTED = re.compile(r'["\u201c\u201d]([^"\u201c\u201d]*)["\u201c\u201d]')


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to be written: every double-quoted span, joined by spaces (``""`` when none)."""
    return " ".join(m.strip() for m in _QUOTED.findall(prompt) if m.strip())


def sincos_positions(length: int, width: int, max_period: float = 100.0) -> Tensor:
    """``(length, width)`` 1-D sincos codes of positions 0..length-1 with unit RMS: cosines in the first half, sines
    in the second, periods from 2 pi up to ``max_period`` (a caption is a few dozen tokens, not thousands)."""
    if width % 2:
        raise ValueError(f"a sincos position code needs an even width, got {width}")
    freqs = max_period ** (-torch.arange(width // 2, dtype=torch.float64) / (width // 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    return (torch.cat([angles.cos(), angles.sin()], 1) * 2**0.5).float()  # each (cos, sin) pair has mean square 1/2


def left_context(tokens: Tensor, mask: Tensor) -> Tensor:
    """``(B, L, D)``: at each position the mean of the (unmasked) tokens strictly before it, rescaled to unit RMS;
    zeros at the first position. ``mask`` is ``(B, L)``, true where a token is real."""
    kept = tokens * mask[..., None].to(tokens.dtype)
    before = kept.cumsum(1) - kept  # exclusive prefix sums
    mean = before / (mask.to(tokens.dtype).cumsum(1) - mask.to(tokens.dtype)).clamp(min=1)[..., None]
    return unit_rms(mean)


def word_embeddings(clip: nn.Module, ids: Tensor) -> Tensor:
    """``(B, L, width)``: a from-scratch CLIP's input embeddings (word plus position, its hidden state 0) of token
    ids, each scaled to unit RMS; what ``ClipTextConditioner(words=True)`` passes and a caption encoder reads."""
    return unit_rms(clip.model.text_model.embeddings(input_ids=ids).float())


def unit_rms(x: Tensor) -> Tensor:
    """Each vector along the last dimension scaled to unit RMS (zero vectors stay zero)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-12)


def glyph_tokens(prompts: Sequence[str], count: int, width: int) -> Tensor:
    """``(B, count, width)`` character tokens of each prompt's quoted text: token ``k`` is one-hot in its
    character (``GLYPHS``, case-folded; dimension 36 marks any other character, e.g. a space) plus one-hot in
    its position ``k`` (dimension 40 + k); tokens past the text's end, and every token of a prompt without
    quoted text, are zeros. Longer texts are cut to ``count`` characters."""
    if width < _FIRST_POSITION + count:
        raise ValueError(f"glyph tokens need a context width of at least {_FIRST_POSITION + count} for {count} "
                         f"characters; the text encoder is {width} wide")  # fmt: skip
    out = torch.zeros(len(prompts), count, width)
    for b, prompt in enumerate(prompts):
        for k, ch in enumerate(quoted_text(prompt).upper()[:count]):
            i = GLYPHS.find(ch)
            out[b, k, i if i >= 0 else _OTHER_GLYPH] = 1.0
            out[b, k, _FIRST_POSITION + k] = 1.0
    return out


class ClipTextConditioner(nn.Module):
    """One CLIP text tower as an SD3-style text encoder, for MMDiTs trained with a small CLIP (``sd3-shapes``).

    ``context`` is the ``layer``-th hidden state (the penultimate by default, SD3's choice for its CLIPs), padding
    positions zeroed; ``pooled`` is the projected end-token state. An empty prompt encodes to zeros for both,
    which is exactly what the SD3 task's text dropping trains as the unconditional input, so classifier-free
    guidance at sampling time sees the input it was trained with. ``widths`` and ``tokens`` tell the task how the
    context is laid out (a single encoder: ``(width, 0)``).

    ``chars > 0`` appends that many character tokens (``glyph_tokens``) of the prompt's quoted text after the CLIP
    tokens, where SD3 puts T5's: a word-level tokenizer sees ``"CAT"`` as one opaque word, so an image model
    would have to learn every word's glyphs from scratch; spelled out, it learns 36 glyphs and where each goes.
    (Character-aware text encoders are what fixes spelling in large models too: Liu et al. 2023, "Character-aware
    models improve visual text rendering".) The SD3 task drops them with its ``drop_t5`` probability.

    ``words=True`` also appends the CLIP's input embeddings of the prompt's tokens (word plus position, hidden state
    0), each scaled to unit RMS, before the character tokens. A small CLIP trained contrastively on captions learns
    a bag of words: in the shapes CLIP, "left" and "right" have cosine 0.666 at the input but 0.993 from the first
    layer on, and the tokens after them 0.999, so the penultimate states barely say which way a relation points
    (nor does the pooled vector). The input embeddings still do, and the MMDiT's joint attention contextualises
    them itself, the way SD3's T5 tokens complement its CLIPs. They sit in T5's slot and share its dropout.

    ``word_positions > 0`` adds a 1-D sincos code of each word token's index, scaled to that RMS, to the word tokens.
    The MMDiT has no positions on its context, and the CLIP's learned position embeddings, trained by a bag-of-words
    objective, are unordered vectors: with them the shapes MMDiT put "A left of B"'s objects on the right axis but
    either way round. A sincos code makes "this word comes before that one" a linear feature of a key-query pair.

    ``word_prefix > 0`` adds to each word token the mean of the word tokens before it (its left context, a causal
    bag of words), rescaled to that RMS. Where a relation goes is a conjunction of two facts: which way the relation
    word points and which object the sentence names first ("A left of B" and "B right of A" draw the same scene).
    Neither alone says where a colour goes, so a denoiser that must find the conjunction by attention gets no
    first-order gradient towards it (the shapes MMDiT picked the side at random). With its left context in it, every
    word after "left of" says so: the second-named object's tokens carry the relation, the first-named object's
    do not, and "the object after 'left of' goes right" is a linear feature. A causal text encoder such as CLIP is
    meant to give its states this context, but the small shapes CLIP, trained as a bag of words, washes it out.
    (Measured: no gain in 1000 steps on the shapes MMDiT; the caption encoder below is what worked.)

    ``caption`` (a trained ``t2i.models.caption.CaptionEncoder``, needs ``words=True``) replaces the word tokens
    by its states: a bidirectional encoder of the same input embeddings trained to predict where each word's
    object goes, so the relation's direction reaches the denoiser as a per-token feature (see that module).
    """

    def __init__(self, clip: nn.Module, layer: int = -2, chars: int = 0, words: bool = False,
                 word_positions: float = 0.0, word_prefix: float = 0.0,
                 caption: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.clip, self.layer, self.chars, self.words = clip, layer, int(chars), bool(words)
        self.word_positions, self.word_prefix = float(word_positions), float(word_prefix)
        for name, value in (("word_positions", self.word_positions), ("word_prefix", self.word_prefix)):
            if value < 0 or (value and not self.words):
                raise ValueError(f"{name} must be >= 0 and needs words=True, got {value} with words={words}")
        self.caption = caption.eval().requires_grad_(False) if caption is not None else None
        text_cfg = clip.model.config.text_config
        if caption is not None:
            if not self.words:
                raise ValueError("a caption encoder reads the word tokens: it needs words=True")
            check_fits_clip(caption, clip)
        if not -text_cfg.num_hidden_layers - 1 <= layer <= text_cfg.num_hidden_layers:
            raise ValueError(f"layer {layer} is outside the text tower's {text_cfg.num_hidden_layers} layers")
        if self.chars < 0:
            raise ValueError(f"chars must be >= 0 (0: no character tokens), got {chars}")
        self.widths = (text_cfg.hidden_size, 0)
        self.tokens = clip.tokenizer.context_length
        if self.chars:
            glyph_tokens([], self.chars, text_cfg.hidden_size)  # checks the width now, not at the first prompt

    @torch.no_grad()
    def forward(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.clip.tokenize(prompts)
        text = self.clip.model.text_model
        out = text(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        context = out.hidden_states[self.layer].float() * mask[..., None]
        pooled = self.clip.model.text_projection(out.pooler_output).float()
        if self.words:
            embedded = unit_rms(out.hidden_states[0].float())  # what word_embeddings(clip, ids) gives
            if self.caption is not None:  # it was trained on exactly these inputs (word_embeddings)
                embedded = self.caption(embedded, mask).float()
            if self.word_prefix:
                embedded = embedded + self.word_prefix * left_context(embedded, mask)
            if self.word_positions:
                code = sincos_positions(embedded.shape[1], embedded.shape[2]).to(embedded.device)
                embedded = embedded + self.word_positions * code
            context = torch.cat([context, embedded * mask[..., None]], 1)
        if self.chars:
            glyphs = glyph_tokens(prompts, self.chars, context.shape[-1]).to(context.device)
            context = torch.cat([context, glyphs], 1)
        keep = torch.tensor([bool(p.strip()) for p in prompts], device=context.device)
        return context * keep[:, None, None], pooled * keep[:, None]
