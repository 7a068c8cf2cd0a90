"""The world and its scenes: a well-separated palette, resolution-independent layouts that keep their gaps and
relations, the renderer's colours and anti-aliasing, and the size check."""

from __future__ import annotations

import numpy as np
import pytest

from t2i.shapes.captions import split_prompts
from t2i.shapes.scenes import ground_truth, render
from t2i.shapes.specs import relation_holds
from t2i.shapes.world import BACKGROUND, COLORS, GAP, SHAPES, Obj, Scene, Text


def test_palette_is_well_separated():
    rgb = np.asarray(list(COLORS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 90
    assert np.linalg.norm(rgb - np.asarray(BACKGROUND), axis=-1).min() > 110
    assert len(SHAPES) >= 5 and len(COLORS) >= 6


def test_scene_is_resolution_independent():
    p = split_prompts("eval")[0]
    assert ground_truth(p, 32).scene == ground_truth(p, 64).scene


def test_scenes_respect_gaps_sizes_and_relations():
    for p in split_prompts("eval"):
        objs = ground_truth(p, 32).scene.objects
        for i, a in enumerate(objs):
            assert a.size * 32 >= 6.0  # the smallest object is still >= 6 px at 32 px
            x0, y0, x1, y1 = a.box()
            assert min(x0, y0) >= 0 and max(x1, y1) <= 1
            for b in objs[i + 1 :]:
                d = (a.size + b.size) / 2 + GAP - 1e-6
                assert abs(a.cx - b.cx) >= d or abs(a.cy - b.cy) >= d
        if p.spec.category == "position":
            rel = p.spec.include[1].relation
            assert relation_holds(objs[1], objs[0], rel) and not relation_holds(objs[0], objs[1], rel)
        if p.spec.category == "counting":
            assert len(objs) == p.spec.include[0].count


def test_render_draws_the_right_colour_in_the_right_place():
    img = render(Scene((Obj("square", "red", 0.25, 0.5, 0.3),)), 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[32, 16]) == COLORS["red"]
    assert tuple(img[32, 48]) == BACKGROUND
    # anti-aliased: a box edge at a fractional position yields intermediate values
    img = render(Scene((Obj("circle", "blue", 0.5, 0.5, 0.61),)), 32)
    assert len(np.unique(img[..., 0])) > 2
    text = render(Scene(text=Text("CAT", 0.5, 0.5, 0.3)), 64)
    assert (text.mean(-1) < 60).sum() > 30


@pytest.mark.parametrize("bad", [16, 31, 32.0, "64"])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match=">= 32"):
        render(Scene(), bad)


def test_counterfactual_scenes_keep_the_objects_and_break_the_caption():
    """Each counterfactual scene is the true scene's objects rearranged so that the detector's verdict on its
    rendering fails, while the true rendering passes; the kinds offered follow the caption."""
    from t2i.shapes.captions import train_prompt
    from t2i.shapes.detect import detect
    from t2i.shapes.scenes import counterfactual_scenes
    from t2i.shapes.scoring import check

    seen: dict[str, set[int]] = {}
    for i in range(120):
        prompt = train_prompt(5, i)
        sample = ground_truth(prompt, 64)
        options = counterfactual_scenes(prompt.spec, sample.scene)
        cat = prompt.spec.category
        seen.setdefault(cat, set()).add(len(options))
        if cat in ("single_object", "colors", "text"):
            assert options == []  # nothing to rearrange (one object) or a word
            continue
        assert options, prompt.caption
        assert check(prompt.spec, detect(sample.image))
        for scene in options:
            # the same shapes and colours (one fewer at most), a verdict that fails on the rendered pixels
            assert len(sample.scene.objects) - len(scene.objects) in (0, 1)
            assert not check(prompt.spec, detect(render(scene, 64))), (prompt.caption, scene)
        if cat == "position":
            relation = next(c.relation for c in prompt.spec.include if c.relation)
            axis = "cx" if relation in ("left of", "right of") else "cy"
            mirrored = options[0].objects
            for a, b in zip(sample.scene.objects, mirrored, strict=True):
                assert getattr(b, axis) == pytest.approx(1 - getattr(a, axis))
    assert {"two_objects", "counting", "position", "color_attribution"} <= set(seen)
    assert max(seen["position"]) >= 3  # mirrored, a swap, and an object left out
