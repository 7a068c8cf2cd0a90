"""The caption encoder (t2i.models.caption): masking, the picture head, the relation score, save/load, and that
its training task learns which side a relation puts each object on."""

from __future__ import annotations

import pytest
import torch

from t2i.models.caption import CaptionEncoder, coarse_picture, relation_accuracy


def test_states_ignore_padding_and_have_unit_rms():
    torch.manual_seed(0)
    enc = CaptionEncoder(width=32, depth=2, heads=4, grid=4).eval()
    tokens, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    states = enc(tokens, mask)
    assert states.shape == (2, 6, 32) and states[0, 4:].abs().max() == 0
    torch.testing.assert_close(states[mask].square().mean(-1), torch.ones(int(mask.sum())), atol=1e-4, rtol=0)
    other = tokens.clone()
    other[0, 4:] = torch.randn(2, 32)  # what sits in the padding changes nothing
    torch.testing.assert_close(enc(other, mask), states)
    torch.testing.assert_close(enc.picture(enc(other, mask), mask), enc.picture(states, mask))
    assert enc.picture(states, mask).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, L, 32\)"):
        enc(torch.randn(2, 6, 16), mask)
    with pytest.raises(ValueError, match="divisible"):
        CaptionEncoder(width=30, heads=4)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = CaptionEncoder(width=32, depth=1, heads=2, grid=4).eval()
    enc.save(tmp_path / "caption.safetensors")
    again = CaptionEncoder.load(tmp_path / "caption.safetensors").eval()
    tokens, mask = torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.bool)
    torch.testing.assert_close(again(tokens, mask), enc(tokens, mask))


def test_shape_maps_are_a_second_head_that_leaves_the_states_and_picture_as_they_were(tmp_path):
    """The shape maps have their own cell queries: an encoder given them (loading a trained one's weights) keeps
    its states and colour picture exactly; ``layout_map`` stacks the picture and the maps."""
    torch.manual_seed(0)
    plain = CaptionEncoder(width=32, depth=1, heads=2, grid=4).eval()
    enc = CaptionEncoder(width=32, depth=1, heads=2, grid=4, shape_channels=5).eval()
    added = set(enc.state_dict()) - set(plain.state_dict())
    assert added == {"shape_cells", "shape_q.weight", "shape_q.bias", "shape_kv.weight", "shape_kv.bias",
                     "shape_head_out.weight", "shape_head_out.bias"}  # fmt: skip
    enc.load_state_dict({**enc.state_dict(), **plain.state_dict()})
    tokens, mask = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    states = enc(tokens, mask)
    torch.testing.assert_close(states, plain(tokens, mask), rtol=0, atol=0)
    colours, shapes = enc.pictures(states, mask)
    assert shapes.shape == (2, 5, 4, 4)
    torch.testing.assert_close(colours, plain.picture(states, mask), rtol=0, atol=0)
    layout = enc.layout_map(states, mask)
    assert enc.layout_channels == 8 and layout.shape == (2, 8, 4, 4)
    torch.testing.assert_close(layout, torch.cat([colours, shapes], 1), rtol=0, atol=0)
    torch.testing.assert_close(plain.layout_map(states, mask), colours, rtol=0, atol=0)  # no shapes: the picture
    enc.save(tmp_path / "caption.safetensors")
    again = CaptionEncoder.load(tmp_path / "caption.safetensors").eval()
    torch.testing.assert_close(again.shape_maps(states, mask), shapes, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no shape maps"):
        plain.pictures(states, mask)
    with pytest.raises(ValueError, match="shape_channels must be >= 0"):
        CaptionEncoder(width=32, heads=2, shape_channels=-1)


def test_keyed_shape_maps_read_the_scenes_colour_at_each_cell():
    """``shape_keyed``: each cell's shape query also reads the colour the scene has there, so the same caption gives
    other shape maps for another colour layout; the colour picture and the states do not depend on it."""
    torch.manual_seed(0)
    enc = CaptionEncoder(width=32, depth=1, heads=2, grid=4, shape_channels=5, shape_keyed=True).eval()
    tokens, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    states = enc(tokens, mask)
    left, right = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    left[..., :2], right[..., 2:] = 1.0, 1.0
    a, b = enc.shape_maps(states, mask, left), enc.shape_maps(states, mask, right)
    assert a.shape == (2, 5, 4, 4) and (a - b).abs().max() > 1e-4
    torch.testing.assert_close(enc.layout_map(states, mask, left)[:, :3], enc.picture(states, mask), rtol=0, atol=0)
    torch.testing.assert_close(enc.layout_map(states, mask, left)[:, 3:], a, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pass picture= of shape \(B, 3, 4, 4\), got None"):
        enc.shape_maps(states, mask)
    with pytest.raises(ValueError, match="shape_keyed needs shape_channels > 0"):
        CaptionEncoder(width=32, heads=2, shape_keyed=True)


def test_coarse_picture_and_relation_accuracy():
    """The target is the cell-mean colour; a picture scores a hit when it is nearer the truth than the truth
    mirrored along the relation's axis, and captions without a relation are skipped."""
    image = torch.zeros(1, 3, 8, 8)
    image[..., :, :4] = 1.0  # white left half
    torch.testing.assert_close(coarse_picture(image, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="3 x 3"):
        coarse_picture(image, 3)
    truth = coarse_picture(image, 2)
    assert relation_accuracy(truth, truth, ["left of"]) == 1.0
    assert relation_accuracy(truth.flip(-1), truth, ["right of"]) == 0.0
    top = coarse_picture(image.transpose(-1, -2), 2)  # white top half
    assert relation_accuracy(torch.cat([top, top.flip(-2)]), torch.cat([top, top]), ["above", "below"]) == 0.5
    assert relation_accuracy(torch.cat([truth, truth.flip(-1)]), torch.cat([truth, truth]), ["left of", None]) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        relation_accuracy(truth, truth, [None])


def test_a_caption_encoder_of_another_width_is_refused_by_every_reader():
    """One check (``check_fits_clip``) guards the SD3 text conditioner, the unCLIP pipeline and the unCLIP tasks."""
    from model_folders import tiny_clip

    from t2i.models.caption import check_fits_clip
    from t2i.models.text import ClipTextConditioner

    clip = tiny_clip()  # a 32-wide text tower
    check_fits_clip(CaptionEncoder(width=32, depth=1, heads=4), clip)
    wrong = CaptionEncoder(width=16, depth=1, heads=4)
    with pytest.raises(ValueError, match="16 wide but the CLIP's text tower is 32: train it on this CLIP"):
        check_fits_clip(wrong, clip)
    with pytest.raises(ValueError, match="16 wide"):
        ClipTextConditioner(clip, -2, 0, True, 0.0, 0.0, wrong)
