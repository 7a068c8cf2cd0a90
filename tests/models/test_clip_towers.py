"""ClipTowers against transformers' CLIPModel: same seed same weights, state dicts in both directions, the same
outputs (hidden states, pooled and projected vectors, padding, both activations, the legacy pooling rule), the
shipped CLIP files, and a cold start that never imports transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i.models.clip_towers import ClipTextConfig, ClipTowers, ClipTowersConfig, ClipVisionConfig

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CLIPS = ("sd3-shapes", "unclip-shapes")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(act: str = "quick_gelu", eos: int = 3) -> ClipTowersConfig:
    text = ClipTextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=12, hidden_act=act, pad_token_id=0,
                          bos_token_id=1, eos_token_id=eos)  # fmt: skip
    vision = ClipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, hidden_act=act)  # fmt: skip
    return ClipTowersConfig(text, vision, projection_dim=16)


def hf_twin(model: ClipTowers) -> torch.nn.Module:
    """transformers' CLIPModel of the same config holding the same weights."""
    hf = transformers.CLIPModel(transformers.CLIPConfig(**model.config.to_dict()))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def token_batch(eos: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Four captions of different lengths: start, words (ids 4-39), end, padding (0)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate((3, 10, 1, 6)):
        ids[i, 0], ids[i, n + 1] = 1, eos
        ids[i, 1 : n + 1] = torch.randint(4, 40, (n,), generator=g)
    return ids, (torch.arange(12)[None] <= (ids == eos).int().argmax(1)[:, None]).long()


def projected(out) -> torch.Tensor:
    """``get_text_features`` / ``get_image_features``: a tensor in transformers 4, an output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_a_seed_gives_transformers_weights_and_rng_state():
    torch.manual_seed(3)
    ours, after_ours = ClipTowers(tiny_config()), torch.rand(4)
    torch.manual_seed(3)
    cfg = transformers.CLIPConfig(**tiny_config().to_dict())
    theirs, after_theirs = transformers.CLIPModel(cfg), torch.rand(4)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # same names, same order
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical: transformers' init rule, in its order
    assert torch.equal(after_ours, after_theirs)  # and the global RNG is left where transformers leaves it


def test_state_dicts_load_strictly_both_ways():
    torch.manual_seed(0)
    ours = ClipTowers(tiny_config())
    theirs = transformers.CLIPModel(transformers.CLIPConfig(**tiny_config().to_dict()))  # other random weights
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(1)
    back = ClipTowers(tiny_config())
    back.load_state_dict(theirs.state_dict(), strict=True)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    assert not any("position_ids" in k for k in ours.state_dict())  # transformers' buffer is not persistent


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("masked", [True, False])
def test_text_tower_matches_transformers(act, masked):
    torch.manual_seed(0)
    ours = ClipTowers(tiny_config(act)).eval()
    theirs = hf_twin(ours)
    ids, mask = token_batch()
    mask = mask if masked else None
    with torch.no_grad():
        a = ours.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = theirs.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # measured fp32 differences: 0.0 for every tensor (both run SDPA on the same inputs)
        assert len(a.hidden_states) == len(b.hidden_states) == 3  # embeddings + 2 blocks, the last before final LN
        assert max_diff(a.hidden_states, b.hidden_states) <= 1e-6
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.text_features(ids, mask), projected(theirs.get_text_features(ids, mask)),
                                   rtol=0, atol=1e-6)  # fmt: skip
    end = (ids == 3).int().argmax(1)
    torch.testing.assert_close(a.pooler_output, a.last_hidden_state[torch.arange(4), end])  # at the first end token


def test_math_attention_kernel_agrees():
    """t2i's explicit attention (what bf16 CPU inference with a mask runs) against transformers' SDPA, in fp32."""
    from t2i.nn.attention import attention_kernel

    torch.manual_seed(0)
    ours = ClipTowers(tiny_config()).eval()
    theirs = hf_twin(ours)
    ids, mask = token_batch()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        b = theirs.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b_img = theirs.vision_model(pixel_values=pixels, output_hidden_states=True)
        with attention_kernel("math"):
            a = ours.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            a_img = ours.vision_model(pixels, output_hidden_states=True)
    # measured: 7.2e-7 (text hidden states and pooled), 4.8e-7 (image hidden states)
    assert max_diff((*a.hidden_states, a.pooler_output), (*b.hidden_states, b.pooler_output)) <= 2e-6
    assert max_diff(a_img.hidden_states, b_img.hidden_states) <= 2e-6


def test_padding_never_reaches_real_tokens():
    torch.manual_seed(0)
    ours = ClipTowers(tiny_config()).eval()
    ids, mask = token_batch()
    other = ids.masked_fill(~mask.bool(), 7)  # different padding ids
    with torch.no_grad():
        a = ours.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours.text_model(input_ids=other, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-6)


def test_legacy_eos_id_2_pools_at_the_largest_id():
    torch.manual_seed(0)
    ours = ClipTowers(tiny_config(eos=2)).eval()
    theirs = hf_twin(ours)
    ids, mask = token_batch(eos=2)
    with torch.no_grad():
        a = ours.text_model(input_ids=ids, attention_mask=mask)
        b = theirs.text_model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-6)
    top = ids.argmax(1)
    torch.testing.assert_close(a.pooler_output, a.last_hidden_state[torch.arange(4), top])  # not at the end token


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(act):
    torch.manual_seed(0)
    ours = ClipTowers(tiny_config(act)).eval()
    theirs = hf_twin(ours)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = ours.vision_model(pixels, output_hidden_states=True)
        b = theirs.vision_model(pixel_values=pixels, output_hidden_states=True)
        # measured fp32 differences: 0.0
        assert len(a.hidden_states) == len(b.hidden_states) == 4
        assert max_diff(a.hidden_states, b.hidden_states) <= 1e-6
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.image_features(pixels), projected(theirs.get_image_features(pixels)),
                                   rtol=0, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="32x32"):
        ours.vision_model(torch.zeros(1, 3, 40, 40))


def test_config_round_trips_through_transformers():
    cfg = tiny_config("gelu")
    hf = transformers.CLIPConfig(**cfg.to_dict())
    assert ClipTowersConfig.from_dict(hf.to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden_act"):
        ClipTowers(ClipTowersConfig(ClipTextConfig(hidden_act="relu6", num_hidden_layers=1, hidden_size=8,
                                                   num_attention_heads=2)))  # fmt: skip


def test_saved_folder_loads_in_transformers_and_back(tmp_path):
    from model_folders import tiny_clip

    from t2i.models.clip import ClipEncoder

    enc = tiny_clip()
    enc.save(tmp_path / "clip")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "clip"), local_files_only=True)
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in enc.model.state_dict().items())
    hf.save_pretrained(tmp_path / "clip")  # a folder written by transformers, as older t2i versions did
    again = ClipEncoder.load(tmp_path / "clip")
    assert isinstance(again.model, ClipTowers)
    torch.testing.assert_close(again.embed_text(["a red circle"])[0], enc.embed_text(["a red circle"])[0])


@pytest.mark.parametrize("name", SHIPPED_CLIPS)
def test_shipped_clip_loads_natively_and_encodes_as_transformers(name):
    from t2i.models.files import load_model_file
    from t2i.models.text import ClipTextConditioner

    clip, _ = load_model_file(REPO / "models" / name / "clip.safetensors")
    assert isinstance(clip.model, ClipTowers)
    hf_clip, _ = load_model_file(REPO / "models" / name / "clip.safetensors")
    hf_clip.model = hf_twin(clip.model)  # the same file through transformers' CLIPModel
    prompts = ["a red circle above a blue square", "two small green crosses", 'the word "HI"', ""]
    with torch.no_grad():
        ours, theirs = ClipTextConditioner(clip, words=True), ClipTextConditioner(hf_clip, words=True)
        for a, b in zip(ours(prompts), theirs(prompts), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # measured: 0.0 (context and pooled)
        for a, b in zip(clip.embed_text(prompts, words=True), hf_clip.embed_text(prompts, words=True), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        torch.testing.assert_close(clip.embed_image(images), hf_clip.embed_image(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SHIPPED_CLIPS)
def test_shipped_model_generates_without_importing_transformers(name):
    code = (
        "import sys\n"
        "from t2i.pipelines.folders import load_generator\n"
        f"gen = load_generator({name!r})\n"
        "image = gen.generate(['a red circle'], [0], gen.settings(steps=2))\n"
        "assert image.shape[0] == 1 and image.isfinite().all()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
