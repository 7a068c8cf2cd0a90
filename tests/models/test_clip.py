"""CLIP: the locally built tokenizer, pooling at the end token, equivalence with transformers' CLIPModel,
preprocessing, the contrastive loss, save/load, and loading a local Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch
from model_folders import shapes_clip

from t2i.models.clip import CLIP_PRESETS, ClipConfig, ClipEncoder, HFTokenizer, WordTokenizer

CAPTIONS = ["a red circle above a blue square", "exactly three green triangles", 'the word "QUIZ"', "one cross"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer.build([*CAPTIONS, "a yellow diamond below a purple square"], context_length=12)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> ClipEncoder:
    torch.manual_seed(0)
    return ClipEncoder.from_config(CLIP_PRESETS["tiny"], tokenizer).eval()


def test_tokenizer_layout(tokenizer):
    ids, mask = tokenizer(["a red circle", "zebra"])
    assert ids.shape == mask.shape == (2, 12)
    assert ids[0, 0] == tokenizer.start_id and ids[0, 4] == tokenizer.end_id and (ids[0, 5:] == tokenizer.pad_id).all()
    assert mask[0].tolist() == [True] * 5 + [False] * 7  # start, 3 words, end
    # an unseen word is spelled out with the character fallback, never <unk>
    assert tokenizer.unk_id not in ids[1].tolist() and int(mask[1].sum()) == 2 + len("zebra")
    # truncation keeps the end token in the last slot
    ids, mask = tokenizer(["a " * 40])
    assert ids[0, -1] == tokenizer.end_id and mask[0].all()
    assert tokenizer.end_id != 2  # transformers treats eos id 2 as a legacy config and pools at the arg-max id


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    again = WordTokenizer.load(tmp_path / "tok.json")
    assert again.vocab == tokenizer.vocab and again.context_length == 12
    torch.testing.assert_close(again(CAPTIONS)[0], tokenizer(CAPTIONS)[0])


def test_text_tower_pools_at_the_end_token(encoder):
    ids, mask = encoder.tokenize(CAPTIONS)
    out = encoder.model.text_model(input_ids=ids, attention_mask=mask.long())
    end_pos = (ids == encoder.tokenizer.end_id).int().argmax(1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(len(ids)), end_pos])
    assert (end_pos == mask.sum(1) - 1).all()  # the end token is the last valid position


def test_towers_match_transformers(encoder):
    from transformers import CLIPConfig, CLIPModel

    ids, mask = encoder.tokenize(CAPTIONS)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    hf = CLIPModel(CLIPConfig(**encoder.model.config.to_dict())).eval()  # the same weights in transformers' CLIP
    hf.load_state_dict(encoder.model.state_dict(), strict=True)
    ref = hf(input_ids=ids, attention_mask=mask.long(), pixel_values=encoder.preprocess(images), return_loss=True)
    text, tokens = encoder.encode_text(ids, mask)
    torch.testing.assert_close(text, ref.text_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder.embed_image(images), ref.image_embeds, rtol=1e-5, atol=1e-6)
    assert tokens.shape == (4, 12, encoder.text_width)
    # the per-sample contrastive loss averages to transformers' CLIP loss
    torch.testing.assert_close(encoder.contrastive_loss(images, ids, mask).mean(), ref.loss, rtol=1e-5, atol=1e-6)


def test_preprocessing_resizes_crops_and_normalises(encoder):
    x = torch.full((1, 3, 48, 64), 0.0)  # mid grey in [-1, 1], non-square
    out = encoder.preprocess(x)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)  # (0.5 - 0.5) / 0.5
    # the crop is centred: a bright band at the left edge of a wide image is cut away
    x = torch.full((1, 3, 32, 64), -1.0)
    x[..., :8] = 1.0
    assert encoder.preprocess(x).max() < -0.9
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder.preprocess(torch.zeros(3, 32, 32))


def test_save_load_round_trip(encoder, tmp_path):
    encoder.save(tmp_path / "clip")
    loaded = ClipEncoder.load(tmp_path / "clip")
    assert isinstance(loaded.tokenizer, WordTokenizer) and loaded.tokenizer.vocab == encoder.tokenizer.vocab
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.embed_text(CAPTIONS)[0], encoder.embed_text(CAPTIONS)[0])
    torch.testing.assert_close(loaded.embed_image(images), encoder.embed_image(images))


def _hf_folder(path):
    """A tiny Hugging Face CLIP folder with a real CLIPTokenizer (character-level BPE vocabulary, no merges)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=54,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=52,
            eos_token_id=53,
            pad_token_id=53,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    torch.manual_seed(1)
    CLIPModel(cfg).save_pretrained(path)
    return path


def test_local_hugging_face_folder(tmp_path):
    folder = _hf_folder(tmp_path / "hf")
    enc = ClipEncoder.load(folder)
    assert isinstance(enc.tokenizer, HFTokenizer) and enc.embed_dim == 24 and enc.context_length == 16
    ids, mask = enc.tokenize(["a cat", "dog"])
    assert ids[0, 0] == 52 and ids[0, mask[0].sum() - 1] == 53  # start ... end, as OpenAI CLIP expects
    out = enc.model.text_model(input_ids=ids, attention_mask=mask.long())
    end_pos = mask.sum(1) - 1
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), end_pos])
    # OpenAI normalisation constants without a preprocessor_config.json
    assert enc.image_mean.flatten()[0].item() == pytest.approx(0.48145466)
    assert enc.embed_image(torch.zeros(2, 3, 40, 40)).shape == (2, 24)


def test_mismatched_tokenizer_is_refused(encoder):
    other = WordTokenizer.build(["x"], context_length=64)
    with pytest.raises(ValueError, match="exceeds the model's"):
        ClipEncoder(encoder.model, other)


def test_scratch_clip_registry_entry_and_contrastive_training():
    torch.manual_seed(0)
    enc = shapes_clip(ClipConfig(**{**CLIP_PRESETS["tiny"].__dict__, "context_length": 24}))
    assert enc.tokenizer.vocab_size > 50  # built from the shapes caption grammar
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    ids, mask = enc.tokenize(CAPTIONS)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    with torch.no_grad():
        start = float(enc.contrastive_loss(images, ids, mask).mean())
    for _ in range(25):
        loss = enc.contrastive_loss(images, ids, mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(enc.contrastive_loss(images, ids, mask).mean()) < 0.5 * start


def test_contrastive_loss_with_hard_negatives():
    """Each image is also contrasted against every valid negative caption; invalid ones drop out exactly."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    enc = shapes_clip(ClipConfig(**{**CLIP_PRESETS["tiny"].__dict__, "context_length": 24})).eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    ids, mask = enc.tokenize(CAPTIONS[:4])
    neg_ids, neg_mask = enc.tokenize(["a red circle below a blue square", "four green triangles", "", "two crosses"])
    with torch.no_grad():
        plain = enc.contrastive_loss(images, ids, mask)
        none_valid = enc.contrastive_loss(images, ids, mask, (neg_ids, neg_mask, torch.zeros(4, dtype=torch.bool)))
        torch.testing.assert_close(none_valid, plain)
        valid = torch.tensor([True, False, True, True])
        got = enc(images, ids, mask, (neg_ids, neg_mask, valid))
        img, (txt, _), (neg, _) = (
            enc.embed_image(images),
            enc.encode_text(ids, mask),
            enc.encode_text(neg_ids, neg_mask),
        )
        scale = enc.model.logit_scale.exp()
        cols = torch.cat([txt, neg[valid]])  # the image->text softmax runs over captions and valid negatives
        i2t = F.cross_entropy(scale * img @ cols.t(), torch.arange(4), reduction="none")
        t2i = F.cross_entropy(scale * txt @ img.t(), torch.arange(4), reduction="none")
        torch.testing.assert_close(got, 0.5 * (i2t + t2i))
        assert (got >= plain - 1e-6).all()  # more negatives never make the task easier


def test_contrastive_loss_with_hard_negative_images():
    """Each caption is also contrasted against every negative image; none given is the plain loss exactly."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    enc = shapes_clip(ClipConfig(**{**CLIP_PRESETS["tiny"].__dict__, "context_length": 24})).eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    negatives = torch.rand(3, 3, 32, 32) * 2 - 1
    ids, mask = enc.tokenize(CAPTIONS[:4])
    with torch.no_grad():
        plain = enc.contrastive_loss(images, ids, mask)
        torch.testing.assert_close(enc.contrastive_loss(images, ids, mask, image_negatives=negatives[:0]), plain)
        got = enc(images, ids, mask, None, negatives)
        img, neg, (txt, _) = enc.embed_image(images), enc.embed_image(negatives), enc.encode_text(ids, mask)
        scale = enc.model.logit_scale.exp()
        i2t = F.cross_entropy(scale * img @ txt.t(), torch.arange(4), reduction="none")
        t2i = F.cross_entropy(scale * txt @ torch.cat([img, neg]).t(), torch.arange(4), reduction="none")
        torch.testing.assert_close(got, 0.5 * (i2t + t2i))
        assert (got >= plain - 1e-6).all()


def test_picture_head_adds_its_weighted_error_and_only_when_built(tmp_path):
    """With ``picture_grid`` the CLIP predicts each image's coarse picture from its unit-norm embedding; the loss
    adds ``picture_weight`` times that prediction's mean squared error, per sample. Without a head it is refused."""
    from t2i.models.caption import coarse_picture

    torch.manual_seed(0)
    base = {k: v for k, v in CLIP_PRESETS["tiny"].__dict__.items() if k != "picture_grid"} | {"context_length": 24}
    enc = shapes_clip(ClipConfig(**base, picture_grid=4)).eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    ids, mask = enc.tokenize(CAPTIONS[:4])
    target = coarse_picture(images, 4)
    with torch.no_grad():
        plain = enc.contrastive_loss(images, ids, mask)
        got = enc(images, ids, mask, None, None, target, 2.5)
        picture = enc.predict_picture(enc.embed_image(images))
        assert picture.shape == (4, 3, 4, 4)
        torch.testing.assert_close(got, plain + 2.5 * (picture - target).square().mean((1, 2, 3)))
    with pytest.raises(ValueError, match="picture_grid > 0"):
        shapes_clip(ClipConfig(**base)).predict_picture(torch.randn(2, 32))
    # a model file (what `t2i export unclip` writes) keeps the head, and loads back with it
    from t2i.models.files import clip_extra, load_model_file, save_model_file

    save_model_file(tmp_path / "clip.safetensors", "clip", enc, dtype=None, **clip_extra(enc))
    back, _ = load_model_file(tmp_path / "clip.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(back.predict_picture(back.embed_image(images)), picture)
    with pytest.raises(ValueError, match="picture_grid must be >= 0"):
        shapes_clip(ClipConfig(**base, picture_grid=-1))


def test_sincos_positions_make_where_a_patch_is_count_from_the_first_step(tmp_path):
    """``vision_positions="sincos"`` starts the vision tower's position table as the 2-D sin-cos table, scaled to
    the patch tokens' size, with the class token's row at zero. Only the initial values change: the parameters are
    the same, so the file saves and loads as before, and shuffling the patches of an image moves its embedding
    far more than under transformers' small random table."""
    from t2i.models.mmdit import sincos_pos_embed_2d

    base = {k: v for k, v in CLIP_PRESETS["tiny"].__dict__.items() if k != "vision_positions"} | {"context_length": 24}
    torch.manual_seed(0)
    learned = shapes_clip(ClipConfig(**base)).eval()
    torch.manual_seed(0)
    sincos = shapes_clip(ClipConfig(**base, vision_positions="sincos")).eval()
    assert learned.state_dict().keys() == sincos.state_dict().keys()
    table = sincos.model.vision_model.embeddings.position_embedding.weight.detach()
    assert (table[0] == 0).all()
    ref = sincos_pos_embed_2d(32, 4, 4)
    torch.testing.assert_close(table[1:] / table[1:].norm(), ref / ref.norm())
    conv = sincos.model.vision_model.embeddings.patch_embedding.weight.detach()
    assert table[1:].square().mean().sqrt() == pytest.approx(float(conv.std() * conv[0].numel() ** 0.5), rel=1e-5)

    torch.manual_seed(1)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    tiles = images.unfold(2, 8, 8).unfold(3, 8, 8).reshape(16, 3, 16, 8, 8)[:, :, torch.randperm(16)]
    shuffled = tiles.reshape(16, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(16, 3, 32, 32)
    with torch.no_grad():
        moved = {
            name: 1 - (enc.embed_image(images) * enc.embed_image(shuffled)).sum(-1).mean().item()
            for name, enc in (("learned", learned), ("sincos", sincos))
        }
    assert moved["sincos"] > 3 * moved["learned"], moved
    for enc, low, high in ((learned, 0.0, 0.2), (sincos, 0.5, 2.0)):  # the table's size against the patch tokens'
        emb = enc.model.vision_model.embeddings
        with torch.no_grad():
            tokens = emb.patch_embedding(enc.preprocess(images)).flatten(2)
            ratio = emb.position_embedding.weight[1:].square().mean().sqrt() / tokens.square().mean().sqrt()
        assert low < ratio < high
    from t2i.models.files import clip_extra, load_model_file, save_model_file

    save_model_file(tmp_path / "clip.safetensors", "clip", sincos, dtype=None, **clip_extra(sincos))
    back, _ = load_model_file(tmp_path / "clip.safetensors")
    assert back.cfg.vision_positions == "sincos"
    torch.testing.assert_close(back.model.vision_model.embeddings.position_embedding.weight, table)
    with pytest.raises(ValueError, match="vision_positions must be"):
        shapes_clip(ClipConfig(**base, vision_positions="rope"))
    with pytest.raises(ValueError, match="vision_positions must be"):  # the public constructor checks it too
        ClipEncoder.from_config(ClipConfig(**base, vision_positions="rope"), learned.tokenizer)
