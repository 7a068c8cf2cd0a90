"""The detector finds each object's shape, colour and box, and nothing on a blank canvas."""

from __future__ import annotations

import numpy as np

from t2i.shapes.detect import detect
from t2i.shapes.scenes import render
from t2i.shapes.world import BACKGROUND, Obj, Scene


def test_detector_reads_shapes_colours_and_boxes():
    scene = Scene((Obj("triangle", "blue", 0.3, 0.3, 0.3), Obj("cross", "orange", 0.7, 0.7, 0.25)))
    dets = sorted(detect(render(scene, 64)), key=lambda d: d.cx)
    assert [(d.shape, d.color) for d in dets] == [("triangle", "blue"), ("cross", "orange")]
    for d, o in zip(dets, scene.objects, strict=True):
        assert abs(d.cx - o.cx) < 0.03 and abs(d.cy - o.cy) < 0.03 and abs(d.w - o.size) < 0.05
    assert detect(np.full((32, 32, 3), BACKGROUND, np.uint8)) == []
