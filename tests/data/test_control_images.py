"""Control-image preprocessing: Canny edges by OpenCV, blur, user depth maps, the input ranges, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.control import (
    ControlImageError,
    blur_image,
    canny_edges,
    depth_image,
    prepare_control_image,
    to_model_range,
)


def square_scene(size: int = 64) -> Image.Image:
    arr = np.full((size, size, 3), 40, dtype=np.uint8)
    arr[16:48, 20:44] = (220, 30, 30)  # a red rectangle on grey
    return Image.fromarray(arr)


def test_canny_outlines_the_object_and_keeps_edge_maps():
    pytest.importorskip("cv2")
    edges = np.asarray(canny_edges(square_scene()))[..., 0]
    ys, xs = np.nonzero(edges)
    assert edges.max() == 255 and set(np.unique(edges)) <= {0, 255}
    assert ys.min() in (15, 16) and ys.max() in (47, 48) and xs.min() in (19, 20) and xs.max() in (43, 44)
    assert edges[30, 30] == 0 and edges[5, 5] == 0  # inside and outside stay black
    ready = Image.fromarray(edges)
    assert np.array_equal(np.asarray(canny_edges(ready))[..., 0], edges)  # an edge map is not edged again


def test_blur_depth_and_prepare():
    blurred = np.asarray(blur_image(square_scene(), 3.0)).astype(int)
    sharp = np.asarray(square_scene()).astype(int)
    assert blurred[32, 20, 0] < sharp[32, 20, 0] and blurred[32, 19, 0] > sharp[32, 19, 0]  # the edge spreads
    depth16 = Image.fromarray(np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.int32), mode="I")
    d = np.asarray(depth_image(depth16))
    assert d.min() == 0 and d.max() == 255 and d[0, 0, 0] == 0 and d[-1, -1, 0] == 255
    x = prepare_control_image(square_scene(), "blur", 32, 48)
    assert x.shape == (1, 3, 32, 48) and x.min() >= 0 and x.max() <= 1
    ident = prepare_control_image(square_scene(), "none", 64, 64)
    assert torch.equal(ident[0, :, 0, 0] * 255, torch.tensor([40.0, 40.0, 40.0]))


def test_input_ranges():
    x = torch.tensor([0.0, 1.0])
    assert to_model_range(x, "canny", "reference").tolist() == [0.5, 128.0]  # the sd3.5 reference's canny range
    assert to_model_range(x, "depth", "reference").tolist() == [-1.0, 1.0]
    assert to_model_range(x, "canny", "signed").tolist() == [-1.0, 1.0]


def test_bad_control_images_say_what_to_do():
    with pytest.raises(ControlImageError, match="PIL image or a numpy array"):
        prepare_control_image("edges.png", "canny", 64, 64)
    with pytest.raises(ControlImageError, match="flat value"):
        depth_image(Image.new("L", (8, 8), 3))
    with pytest.raises(ControlImageError, match=r"values in \[0, 1\]"):
        prepare_control_image(torch.full((3, 8, 8), 2.0), "none", 8, 8)
    with pytest.raises(ControlImageError, match=r"is \(8, 8\), the image \(16, 16\)"):
        prepare_control_image(torch.rand(3, 8, 8), "none", 16, 16)
    with pytest.raises(ControlImageError, match="0 <= low <= high"):  # checked for edge maps too
        canny_edges(Image.new("RGB", (8, 8), "black"), 200, 100)
    with pytest.raises(ValueError, match="did you mean 'canny'"):
        prepare_control_image(square_scene(), "cany", 64, 64)
