"""The SD3 text stack on tiny random CLIP/T5 models and local tokenizers: penultimate states, pooled vectors
(the CLIP-L projection caveat), context assembly against diffusers' ``encode_prompt``, T5-free mode, and
building encoders from bare (official single-file) state dicts on ``meta``."""

from __future__ import annotations

import pytest
import torch

from t2i.models.text import SD3TextEncoder, build_clip_from_state_dict, build_t5_from_state_dict

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from sd3_helpers import clip_tokenizer, t5_tokenizer, tiny_clip, tiny_t5


@pytest.fixture(scope="module")
def stack():
    return SD3TextEncoder(
        tiny_clip("quick_gelu", seed=1), tiny_clip("gelu", seed=2), tiny_t5(seed=3),
        tokenizer_l=clip_tokenizer(), tokenizer_g=clip_tokenizer(pad="!"), tokenizer_t5=t5_tokenizer(),
        t5_length=24,
    )  # fmt: skip


def test_tokenize_padding_rules(stack):
    ids = stack.tokenize(["a red cube", ""])
    assert ids["l"].shape == ids["g"].shape == (2, 77)
    assert ids["l"][1, 0] == 512 and (ids["l"][1, 1:] == 513).all()  # CLIP-L: BOS, EOS, EOS padding
    assert ids["g"][1, 1] == 513 and (ids["g"][1, 2:] == 0).all()  # CLIP-G pads with 0 ("!")
    assert ids["t5"].shape == (2, 24) and (ids["t5"][1] == torch.tensor([1] + [0] * 23)).all()  # "</s>" then pad


def test_clip_penultimate_and_pooled_match_transformers(stack):
    ids = stack.tokenize(["a red cube", "two blue balls"])["l"]
    clip = stack.clip_l
    with torch.no_grad():
        ref = clip(input_ids=ids, output_hidden_states=True)
        hidden, pooled = stack._clip(clip, ids, project=True)
        torch.testing.assert_close(hidden, ref.hidden_states[-2], atol=1e-6, rtol=0)  # measured: exact
        torch.testing.assert_close(pooled, ref.text_embeds, atol=1e-6, rtol=0)
        _, raw = stack._clip(clip, ids, project=False)
        eos = (ids == 513).int().argmax(1)  # the first EOS
        torch.testing.assert_close(raw, ref.last_hidden_state[torch.arange(2), eos], atol=1e-6, rtol=0)
    assert not stack.clip_l_projection_is_identity()  # random projection: the two conventions differ here


def test_context_matches_diffusers_encode_prompt(stack):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=stack.clip_l, tokenizer=stack.tokenizer_l,
        text_encoder_2=stack.clip_g, tokenizer_2=stack.tokenizer_g,
        text_encoder_3=stack.t5, tokenizer_3=stack.tokenizer_t5,
    )  # fmt: skip
    prompts = ["a red cube", "two blue balls on grass"]
    stack.clip_l_projection = True  # diffusers projects CLIP-L's pooled vector
    try:
        ctx, pooled = stack(prompts)
    finally:
        stack.clip_l_projection = False
    with torch.no_grad():
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=24, device="cpu"
        )
    assert ctx.shape == (2, 77 + 24, 96) and pooled.shape == (2, 64)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)


def test_t5_free_and_reference_length_modes(stack):
    no_t5 = SD3TextEncoder(stack.clip_l, stack.clip_g, None, tokenizer_l=stack.tokenizer_l,
                           tokenizer_g=stack.tokenizer_g, t5_length=11, context_dim=96)  # fmt: skip
    ctx, pooled = no_t5(["a cube"])
    full, full_pooled = stack(["a cube"])
    assert ctx.shape == (1, 77 + 11, 96)
    assert (ctx[:, 77:] == 0).all()
    torch.testing.assert_close(ctx[:, :77], full[:, :77])  # CLIP tokens first, identical
    torch.testing.assert_close(pooled, full_pooled)
    assert (ctx[:, :77, 64:] == 0).all()  # CLIP-L ‖ CLIP-G (64 wide) zero-padded to the T5 width
    # reference mode: no truncation, padded to at least t5_length
    ref_mode = SD3TextEncoder(stack.clip_l, stack.clip_g, stack.t5, tokenizer_l=stack.tokenizer_l,
                              tokenizer_g=stack.tokenizer_g, tokenizer_t5=stack.tokenizer_t5, t5_length=4,
                              t5_truncate=False)  # fmt: skip
    long = "the quick brown fox jumps"
    assert ref_mode.tokenize([long])["t5"].shape[1] > 4
    assert stack.tokenize([long * 3])["t5"].shape[1] == 24  # diffusers mode truncates


def test_build_from_bare_state_dicts_on_meta(stack):
    sd_l = {k: v for k, v in stack.clip_l.state_dict().items() if not k.startswith("text_projection")}
    clip_l = build_clip_from_state_dict(stack.clip_l.config, sd_l, dtype=torch.float32)
    assert torch.equal(clip_l.text_projection.weight, torch.eye(32))  # injected identity (official clip_l)
    t5 = build_t5_from_state_dict(stack.t5.config, stack.t5.state_dict())
    ids = stack.tokenize(["a red cube"])
    with torch.no_grad():
        torch.testing.assert_close(
            clip_l(input_ids=ids["l"], output_hidden_states=True).hidden_states[-2],
            stack.clip_l(input_ids=ids["l"], output_hidden_states=True).hidden_states[-2],
        )
        torch.testing.assert_close(t5(ids["t5"]).last_hidden_state, stack.t5(ids["t5"]).last_hidden_state)
    rebuilt = SD3TextEncoder(clip_l, stack.clip_g, t5, t5_length=24)
    assert rebuilt.clip_l_projection_is_identity()
    with torch.no_grad():
        a = rebuilt.encode_tokens(ids["l"], ids["g"], ids["t5"])
        b = stack.encode_tokens(ids["l"], ids["g"], ids["t5"])
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    bf16 = build_t5_from_state_dict(stack.t5.config, stack.t5.state_dict(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with pytest.raises(ValueError, match="do not fit"):
        build_t5_from_state_dict(stack.t5.config, {"shared.weight": stack.t5.shared.weight})


def test_clip_text_conditioner_layout_padding_and_empty_prompt():
    from model_folders import shapes_clip

    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.text import ClipTextConditioner

    torch.manual_seed(0)
    clip = shapes_clip(CLIP_PRESETS["tiny"]).eval()
    enc = ClipTextConditioner(clip)
    assert enc.widths == (32, 0) and enc.tokens == 24
    ctx, pooled = enc(["a red circle", ""])
    assert ctx.shape == (2, 24, 32) and pooled.shape == (2, 32)
    ids, mask = clip.tokenize(["a red circle"])
    assert ctx[0, mask[0]].abs().sum(-1).gt(0).all() and ctx[0, ~mask[0]].abs().max() == 0  # padding zeroed
    assert ctx[1].abs().max() == 0 and pooled[1].abs().max() == 0  # "" is the trained unconditional input
    out = clip.model.text_model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    torch.testing.assert_close(ctx[0, mask[0]], out.hidden_states[-2][0, mask[0]])
    with pytest.raises(ValueError, match="outside"):
        ClipTextConditioner(clip, layer=9)


def test_glyph_tokens_spell_the_quoted_text():
    from t2i.models.text import GLYPHS, glyph_tokens, quoted_text

    assert quoted_text('the word "CAT"') == "CAT"
    assert quoted_text("a sign that says \u201cZoo\u201d") == "Zoo"
    assert quoted_text("a red circle") == "" and quoted_text('"A" and "BC"') == "A BC"
    tok = glyph_tokens(['the text "Ox7"', "a blue square", '"TOOLONG"'], count=4, width=48)
    assert tok.shape == (3, 4, 48)
    for k, ch in enumerate("OX7"):  # case-folded character one-hot plus position one-hot, nothing else
        assert tok[0, k].nonzero().flatten().tolist() == [GLYPHS.index(ch), 40 + k]
    assert tok[0, 3].abs().max() == 0 and tok[1].abs().max() == 0  # past the text's end; no quoted text
    assert tok[2].sum() == 8  # cut to 4 characters
    assert glyph_tokens(['"A B"'], 3, 48)[0, 1, 36] == 1  # any other character, e.g. the space
    with pytest.raises(ValueError, match="width of at least 44"):
        glyph_tokens(["x"], count=4, width=32)


def test_clip_text_conditioner_with_glyph_tokens():
    import dataclasses

    from model_folders import shapes_clip

    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.text import ClipTextConditioner, glyph_tokens

    torch.manual_seed(0)
    clip = shapes_clip(dataclasses.replace(CLIP_PRESETS["tiny"], text_width=64)).eval()
    plain, enc = ClipTextConditioner(clip), ClipTextConditioner(clip, chars=6)
    assert enc.tokens == plain.tokens == 24  # the CLIP part keeps its layout; glyphs sit after it (T5's slot)
    prompts = ['the word "CAT"', "a red circle", ""]
    ctx, pooled = enc(prompts)
    ref_ctx, ref_pooled = plain(prompts)
    assert ctx.shape == (3, 30, 64)
    torch.testing.assert_close(ctx[:, :24], ref_ctx)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(ctx[:2, 24:], glyph_tokens(prompts[:2], 6, 64))
    assert ctx[2].abs().max() == 0  # the empty prompt stays the all-zero unconditional input
    with pytest.raises(ValueError, match="width"):
        ClipTextConditioner(shapes_clip(CLIP_PRESETS["tiny"]), chars=6)


def test_clip_text_conditioner_with_word_tokens():
    """``words=True`` appends the CLIP's input embeddings (unit RMS, padding zeroed) before the glyph tokens."""
    import dataclasses

    from model_folders import shapes_clip

    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.text import ClipTextConditioner, glyph_tokens

    torch.manual_seed(0)
    clip = shapes_clip(dataclasses.replace(CLIP_PRESETS["tiny"], text_width=64)).eval()
    plain, enc = ClipTextConditioner(clip, chars=6), ClipTextConditioner(clip, chars=6, words=True)
    prompts = ['the word "CAT" left of a circle', "a circle right of the word", ""]
    ctx, pooled = enc(prompts)
    ref_ctx, ref_pooled = plain(prompts)
    assert ctx.shape == (3, 24 + 24 + 6, 64) and enc.tokens == 24
    torch.testing.assert_close(ctx[:, :24], ref_ctx[:, :24])  # the CLIP states and the pooled vector unchanged
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(ctx[:2, 48:], glyph_tokens(prompts[:2], 6, 64))
    ids, mask = clip.tokenize(prompts[:2])
    words = ctx[:2, 24:48]
    rms = words.square().mean(-1).sqrt()
    torch.testing.assert_close(rms[mask], torch.ones(int(mask.sum())))
    assert words[~mask].abs().max() == 0
    emb = clip.model.text_model.embeddings(input_ids=ids)  # word + position embedding, before any layer
    cos = torch.nn.functional.cosine_similarity(words[mask], emb[mask], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    assert ctx[2].abs().max() == 0  # the empty prompt stays the all-zero unconditional input


def test_word_tokens_with_a_sincos_position_code():
    """``word_positions`` adds the index code (unit RMS, times the scale) to the word tokens only; the code tells
    near positions from far ones smoothly, which the CLIP's learned position embeddings do not."""
    import dataclasses

    from model_folders import shapes_clip

    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.text import ClipTextConditioner, sincos_positions

    code = sincos_positions(24, 64)
    torch.testing.assert_close(code.square().mean(-1), torch.ones(24))
    sim = code @ code.T / 64
    assert sim[0, 1] > sim[0, 2] > sim[0, 3] > 0.5 > sim[0, 12]  # nearer tokens look more alike, monotonically
    torch.manual_seed(0)
    clip = shapes_clip(dataclasses.replace(CLIP_PRESETS["tiny"], text_width=64)).eval()
    words, ordered = ClipTextConditioner(clip, words=True), ClipTextConditioner(clip, words=True, word_positions=0.5)
    prompts = ["a red circle left of a blue square", ""]
    ctx, pooled = ordered(prompts)
    ref_ctx, ref_pooled = words(prompts)
    torch.testing.assert_close(ctx[:, :24], ref_ctx[:, :24])
    torch.testing.assert_close(pooled, ref_pooled)
    _, mask = clip.tokenize(prompts[:1])
    n = int(mask.sum())
    torch.testing.assert_close(ctx[0, 24 : 24 + n], ref_ctx[0, 24 : 24 + n] + 0.5 * code[:n])
    assert ctx[0, 24 + n :].abs().max() == 0 and ctx[1].abs().max() == 0  # padding and the empty prompt stay zero
    with pytest.raises(ValueError, match="words=True"):
        ClipTextConditioner(clip, word_positions=0.5)


def test_left_context_is_the_mean_of_the_tokens_before():
    """Each position gets the unit-RMS mean of the real tokens strictly before it: zero at the first, padding never
    counted, so a padded prompt's real tokens see what an unpadded one's see."""
    from t2i.models.text import left_context

    torch.manual_seed(0)
    tokens, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    ctx = left_context(tokens, mask)
    assert ctx[:, 0].abs().max() == 0
    for b, i in ((0, 1), (0, 2), (1, 2), (1, 4)):
        mean = tokens[b, :i].mean(0)
        torch.testing.assert_close(ctx[b, i], mean / mean.square().mean().sqrt())
    padded = torch.cat([tokens[:1, :3], torch.randn(1, 2, 8)], 1)  # other values in the padding change nothing
    torch.testing.assert_close(left_context(padded, mask[:1])[:, :3], ctx[:1, :3])


def test_word_prefix_makes_the_words_after_a_relation_say_which_way_it_points():
    """``word_prefix`` adds each word token's left context to it: the tokens of the object named after "left of"
    differ from those after "right of", the tokens before the relation word do not (the word tokens alone differ at
    the relation word only), and the CLIP's states, the pooled vector and the empty prompt are untouched."""
    import dataclasses

    from model_folders import shapes_clip

    from t2i.models.clip import CLIP_PRESETS
    from t2i.models.text import ClipTextConditioner

    torch.manual_seed(0)
    clip = shapes_clip(dataclasses.replace(CLIP_PRESETS["tiny"], text_width=64)).eval()
    words, prefixed = ClipTextConditioner(clip, words=True), ClipTextConditioner(clip, words=True, word_prefix=0.5)
    prompts = ["a red circle left of a blue square", "a red circle right of a blue square", ""]
    ctx, pooled = prefixed(prompts)
    ref_ctx, ref_pooled = words(prompts)
    torch.testing.assert_close(ctx[:, :24], ref_ctx[:, :24])
    torch.testing.assert_close(pooled, ref_pooled)
    ids, mask = clip.tokenize(prompts[:2])
    at = int((ids[0] != ids[1]).nonzero()[0])  # the relation word
    n = int(mask[0].sum())
    plain, context = ref_ctx[:2, 24 : 24 + n], ctx[:2, 24 : 24 + n]
    assert (plain[0] - plain[1]).abs().amax(-1)[at + 1 :].max() == 0  # without the prefix: same after the relation
    assert (context[0] - context[1]).abs().amax(-1)[:at].max() == 0  # the words before it cannot know it
    assert (context[0] - context[1]).abs().amax(-1)[at + 1 :].min() > 1e-3  # with it: every later word differs
    assert ctx[0, 24 + n :].abs().max() == 0 and ctx[2].abs().max() == 0  # padding and the empty prompt stay zero
    with pytest.raises(ValueError, match="words=True"):
        ClipTextConditioner(clip, word_prefix=0.5)
