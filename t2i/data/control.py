"""Control images for ControlNet: the three kinds the SD3.5 ControlNets were released for, plus "none".

- canny: Canny edges (Canny 1986) by OpenCV, the optional ``control`` extra (``pip install 't2i[control]'``), found
  in each colour channel and united (a yellow object on a light ground has almost no edge in grey). An
  image that is already a black-and-white edge map (only the values 0 and 255) is kept as it is: edges of edges
  would double every line.
- blur: a Gaussian blur (PIL), by default with a sigma of 1/40 of the shorter side.
- depth: a depth map the user supplies (no depth network can be downloaded here), as a greyscale image; it is
  stretched to the full 0-255 range, near or far white as the map has it.
- none: the image as given (already preprocessed elsewhere).

Then ``to_model_range`` maps the [0, 1] image to what the VAE encodes for a ControlNet. Blur and depth images enter
as ``2x - 1``. For canny the sd3.5 reference feeds ``x * 255 * 0.5 + 0.5`` (values 0.5 .. 128, sd3_infer.py), and
the released canny ControlNet was trained that way, so a ControlNet whose ``input_range`` is "reference" gets
exactly that; "signed" ControlNets (diffusers' pipeline, ControlNets trained by t2i) get ``2x - 1`` for every
kind, the range their VAE was made for.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

CONTROL_KINDS = ("canny", "blur", "depth", "none")


class ControlImageError(ValueError):
    """A control image or option that cannot be used; the message says what to give instead."""


def _require_cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "canny control images need OpenCV: pip install 't2i[control]' (opencv-python-headless), or make the "
            "edge map elsewhere and pass it as kind 'none'"
        ) from None
    return cv2


def _as_pil(image, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 1:
                raise ControlImageError(f"{what}: a float array must hold values in [0, 1]")
            arr = (arr * 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    raise ControlImageError(f"{what} must be a PIL image or a numpy array, got {type(image).__name__}")


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White Canny edges on black (OpenCV, hysteresis thresholds ``low``/``high``, each RGB channel), as RGB."""
    if not 0 <= low <= high:
        raise ControlImageError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    grey = np.asarray(image.convert("L"))
    if set(np.unique(grey).tolist()) <= {0, 255}:
        return image.convert("RGB")  # already an edge map
    cv2 = _require_cv2()
    rgb = np.asarray(image.convert("RGB"))
    # per colour channel, then united: on grey alone a yellow object on a light background has almost no edge
    edges = np.maximum.reduce([cv2.Canny(np.ascontiguousarray(rgb[..., c]), low, high) for c in range(3)])
    return Image.fromarray(edges).convert("RGB")


def blur_image(image: Image.Image, sigma: float | None = None) -> Image.Image:
    """A Gaussian blur with ``sigma`` pixels (default: 1/40 of the shorter side)."""
    sigma = min(image.size) / 40 if sigma is None else sigma
    if not sigma >= 0:
        raise ControlImageError(f"blur sigma must be >= 0 pixels, got {sigma}")
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=sigma))


def depth_image(image: Image.Image) -> Image.Image:
    """A user depth map as greyscale RGB stretched to 0-255 (16-bit and float maps are read as they are)."""
    arr = np.asarray(image if image.mode in ("I", "I;16", "F") else image.convert("L"), dtype=np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ControlImageError("the depth map is one flat value; give a map with near and far parts")
    grey = ((arr - lo) / (hi - lo) * 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def prepare_control_image(image, kind: str, height: int, width: int, *, blur_sigma: float | None = None,
                          canny_thresholds: tuple[int, int] = (100, 200)) -> Tensor:  # fmt: skip
    """A control image of ``kind`` at ``height x width``: ``(1, 3, H, W)`` in [0, 1].

    ``image`` is a PIL image, a numpy array, or a ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1], which is taken
    as already preprocessed whatever the kind.
    """
    if kind not in CONTROL_KINDS:
        from t2i.errors import unknown_choice

        raise unknown_choice("control kind", kind, CONTROL_KINDS)
    if isinstance(image, Tensor):
        x = image.float()
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ControlImageError(f"a control image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (height, width):
            raise ControlImageError(f"the control image is {tuple(x.shape[-2:])}, the image {(height, width)}")
        if x.min() < 0 or x.max() > 1:
            raise ControlImageError("a control image tensor must hold values in [0, 1]")
        return x
    pil = _as_pil(image, "the control image")
    if kind == "depth":  # normalise before resizing, so 16-bit maps keep their precision
        pil = depth_image(pil)
    pil = pil.convert("RGB").resize((width, height), Image.LANCZOS)
    if kind == "canny":
        pil = canny_edges(pil, *canny_thresholds)
    elif kind == "blur":
        pil = blur_image(pil, blur_sigma)
    arr = np.asarray(pil, dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def to_model_range(x: Tensor, control_type: str, input_range: str) -> Tensor:
    """A [0, 1] control image as the VAE input a ControlNet of ``control_type`` / ``input_range`` was trained on."""
    if input_range == "reference" and control_type == "canny":
        return x * 255 * 0.5 + 0.5  # the sd3.5 reference's canny range (see the module docstring)
    return x * 2 - 1


__all__ = ["CONTROL_KINDS", "ControlImageError", "blur_image", "canny_edges", "depth_image",
           "prepare_control_image", "to_model_range"]  # fmt: skip
