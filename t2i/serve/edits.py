"""``POST /v1/images/edits``: OpenAI's image-edit request (multipart form) as a generation request plus the images.

The form carries ``image`` (the picture to edit), an optional ``mask`` and ``prompt``, and the same fields as a
JSON generation request (``model``, ``n``, ``size``, ``response_format``, and t2i's ``seed``, ``steps``,
``guidance``, ``sampler``, ``negative_prompt``, ``request_id``), plus ``strength`` and ``mask_blur``. Form values
are text; numbers are converted here and then validated by the same strict model as JSON requests, so both routes
reject the same mistakes with the same messages.

Masks follow OpenAI's rule when they have an alpha channel (fully transparent pixels are repainted) and t2i's
otherwise (white is repainted). Without a mask the request is img2img of the whole image at ``strength``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image, UnidentifiedImageError

from .schemas import APIError, GenerationRequest, parse_request

_INTS = {"n", "seed", "steps"}
_FLOATS = {"guidance", "strength", "mask_blur"}
_FILES = {"image", "mask"}
MAX_SIDE = 4096  # pixels of an uploaded image, either side


@dataclass(frozen=True, eq=False)
class EditInputs:
    """The images of one edit request. Hashed by identity: an edit joins the batch key so it never shares a
    sampling call with another request's images."""

    image: Image.Image
    mask: Image.Image | None
    strength: float | None
    mask_blur: float | None

    def settings_extra(self) -> dict[str, float]:
        return {k: v for k, v in (("strength", self.strength), ("mask_blur", self.mask_blur)) if v is not None}


def _number(name: str, text: str) -> int | float:
    try:
        return int(text) if name in _INTS else float(text)
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise APIError(422, f"{name}: {text[:40]!r} is not {kind}", param=name, code="invalid_value") from None


@dataclass(frozen=True, eq=False)
class ControlInputs:
    """The ControlNet controls of one request, images decoded; hashed by identity like ``EditInputs``."""

    controls: tuple


def decode_controls(requests) -> ControlInputs | None:
    """The ``controls`` of a JSON request as pipeline ``Control``s (400 naming the field for a bad image)."""
    import base64
    import binascii

    from t2i.pipelines.control import Control

    if not requests:
        return None
    controls = []
    for k, c in enumerate(requests):
        name = f"controls.{k}.image"
        if not c.start < c.end:
            raise APIError(400, f"controls.{k}: start ({c.start}) must be below end ({c.end})", param=f"controls.{k}")
        data = c.image.split(",", 1)[1] if c.image.startswith("data:") else c.image
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{name} is not base64 (send the PNG's bytes base64-encoded)", param=name) from None
        controls.append(Control(_open_image(raw, name), c.kind, c.scale, c.start, c.end))
    return ControlInputs(tuple(controls))


def _open_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_SIDE:
                raise APIError(400, f"{name} is {im.size[0]}x{im.size[1]}; at most {MAX_SIDE} px a side", param=name)
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise APIError(400, f"{name} is not a readable image ({type(err).__name__})", param=name) from None


async def _image(upload, name: str, max_bytes: int) -> Image.Image:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, f"{name} is over the {max_bytes}-byte limit", param=name, code="body_too_large")
    return _open_image(data, name)


def _repaint_mask(mask: Image.Image) -> Image.Image:
    """White (255) where the image is repainted: transparent pixels of an RGBA mask (OpenAI), else white ones."""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L")


async def parse_edit(request: Request, max_bytes: int) -> tuple[GenerationRequest, EditInputs]:
    """The edit request of a multipart form; 413 past ``max_bytes``, 415 for another body type, 400/422 naming
    the field for a bad one."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {max_bytes}", code="body_too_large")
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter cannot hold files
        raise APIError(415, f"an edit is sent as multipart/form-data (image, mask, prompt), got {media or 'none'!r}",
                       code="unsupported_media_type")  # fmt: skip
    try:
        form = await request.form(max_files=len(_FILES), max_fields=32)
    except Exception as err:  # python-multipart's parse errors, too many parts
        raise APIError(400, f"the form could not be read ({type(err).__name__})", code="invalid_form") from None
    fields: dict[str, Any] = {}
    files: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in fields or key in files:
            raise APIError(422, f"{key}: given more than once", param=key, code="invalid_value")
        is_file = hasattr(value, "read")
        if key in _FILES:
            if not is_file:
                raise APIError(422, f"{key}: send it as a file part", param=key, code="invalid_value")
            files[key] = value
        elif is_file:
            raise APIError(422, f"{key}: a file where a value is expected", param=key, code="invalid_value")
        else:
            fields[key] = _number(key, value) if key in _INTS | _FLOATS else value
    if "image" not in files:
        raise APIError(422, "image: the picture to edit is required (a PNG or JPEG file part)", param="image",
                       code="invalid_value")  # fmt: skip
    image = (await _image(files["image"], "image", max_bytes)).convert("RGB")
    mask = _repaint_mask(await _image(files["mask"], "mask", max_bytes)) if "mask" in files else None
    if mask is not None and mask.size != image.size:
        raise APIError(400, f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}",
                       param="mask")  # fmt: skip
    strength, mask_blur = fields.pop("strength", None), fields.pop("mask_blur", None)
    return parse_request(fields), EditInputs(image, mask, strength, mask_blur)
