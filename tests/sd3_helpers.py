"""Shared builders for the SD3 tests: non-trivial random MMDiT weights, the diffusers twin of an MMDiT, and tiny
local CLIP/T5 tokenizers and encoders (nothing is downloaded)."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from t2i.io.sd3 import transformer_official_to_diffusers
from t2i.models.mmdit import MMDiT


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights (spec §7.2 notes): adaLN std 0.02, biases std 0.1, QK-norm weights ~N(1, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                p.copy_(1 + 0.1 * r)
            elif "adaLN" in name and name.endswith("weight"):
                p.copy_(0.02 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return model


def diffusers_twin(model: MMDiT, dtype=torch.float32) -> SD3Transformer2DModel:
    cfg = model.cfg
    ref = SD3Transformer2DModel(
        sample_size=cfg.pos_embed_base_size * cfg.patch_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_ch,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    )
    ref.load_state_dict(transformer_official_to_diffusers(model.state_dict()), strict=True)
    return ref.to(dtype).eval()


def clip_tokenizer(pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges): byte symbols, their end-of-word forms, BOS, EOS."""
    chars = list(bytes_to_unicode().values())  # chars[0] is "!", so "!" has id 0 as in the real vocab
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad, model_max_length=77)


def t5_tokenizer() -> T5TokenizerFast:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces += [(c, -1.0) for c in letters] + [("▁" + c, -1.5) for c in letters]
    pieces += [("▁", -2.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_clip(act: str, hidden: int = 32, seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, projection_dim=hidden, bos_token_id=512, eos_token_id=513,
        pad_token_id=513,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg).eval()


def tiny_t5(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64, d_model=96, d_kv=16, d_ff=37, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        is_encoder_decoder=False,
    )  # fmt: skip
    return T5EncoderModel(cfg).eval()


def write_diffusers_folder(path, model: MMDiT, vae) -> tuple:
    """A diffusers SD3 folder written by diffusers/transformers themselves: ``model``'s twin, ``vae`` as a
    diffusers AutoencoderKL, tiny random CLIP-L/CLIP-G/T5 and their tokenizers. Returns (clip_l, clip_g, t5)."""
    import diffusers

    from t2i.io.sd3 import vae_official_to_diffusers

    diffusers_twin(model).save_pretrained(path / "transformer")
    n = len(vae.cfg.block_out_channels)
    dvae = diffusers.AutoencoderKL(
        block_out_channels=vae.cfg.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=vae.cfg.layers_per_block,
        latent_channels=vae.cfg.latent_channels,
        norm_num_groups=vae.cfg.norm_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    dvae.load_state_dict(vae_official_to_diffusers(vae.state_dict()))
    dvae.save_pretrained(path / "vae")
    clip_l, clip_g, t5 = tiny_clip("quick_gelu", seed=1), tiny_clip("gelu", seed=2), tiny_t5(seed=3)
    for name, m in (("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)):
        m.save_pretrained(path / name)
    toks = {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer("!"), "tokenizer_3": t5_tokenizer()}
    for name, tok in toks.items():
        tok.save_pretrained(path / name)
    return clip_l, clip_g, t5
