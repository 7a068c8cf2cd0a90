"""The request and response shapes of the images API: OpenAI's ``/v1/images/generations``, plus t2i's extras.

OpenAI fields: ``prompt``, ``model``, ``n``, ``size`` (``"64x64"`` or ``"auto"``), ``response_format``
(``b64_json`` or ``url``), ``user``; ``quality``/``style`` are accepted and ignored, as other OpenAI-compatible
servers do. t2i extras: ``seed`` (image k gets ``seed + k``, as in ``t2i generate``), ``steps``, ``guidance``,
``sampler``, ``negative_prompt``, ``request_id`` (a client-chosen id for ``GET /v1/progress/{id}``), ``controls``
(ControlNet control images as base64, each with its kind, scale and step window).

Unknown fields are an error (a typo such as ``stpes`` must not silently fall back to the defaults). Every error,
wherever it is raised, is answered in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; every bound is checked before the request is queued."""

    max_prompt_chars: int = 1000
    max_n: int = 8
    max_steps: int = 100
    max_body_bytes: int = 16 * 1024
    max_upload_bytes: int = 8 * 1024 * 1024  # an images/edits form, or a JSON request with control images
    max_guidance: float = 30.0


class ControlRequest(BaseModel):
    """One ControlNet control of a generation request (``controls``): an image and how it steers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    image: str = Field(min_length=1, description="the control image: base64 PNG or JPEG (no data: prefix needed)")
    kind: Literal["canny", "blur", "depth", "none"] = Field(
        "canny", description="canny: edges are detected; blur: blurred; depth: a depth map; none: used as given"
    )
    scale: float = Field(1.0, ge=-10, le=10, description="strength of the control (1 as trained, 0 off)")
    start: float = Field(0.0, ge=0, le=1, description="fraction of the steps where the control starts acting")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the steps where it stops (start < end)")


class GenerationRequest(BaseModel):
    # strict: JSON types are what the schema says; `n: true`, `n: "2"`, `steps: 1.0` and `seed: 1e3` are 422s, not
    # silently coerced (integers are still accepted where a number is asked for, as JSON has one number type)
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="the text prompt", json_schema_extra={"pattern": r"\S"})
    model: str | None = Field(None, description="a served model id (GET /v1/models); default: the first served")
    n: int = Field(1, ge=1, description="images to generate")
    size: str = Field(
        "auto",
        description='"WxH" (square: W == H) or "auto" for the model\'s trained size',
        json_schema_extra={"pattern": r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"},
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    quality: str | None = Field(None, description="accepted for OpenAI compatibility; ignored")
    style: str | None = Field(None, description="accepted for OpenAI compatibility; ignored")
    # t2i extras
    seed: int | None = Field(None, ge=0, lt=2**31, description="seed of image 0; image k uses seed + k")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, description="classifier-free guidance scale (1 disables it)")
    sampler: str | None = None
    negative_prompt: str = ""
    controls: list[ControlRequest] | None = Field(
        None, max_length=4, description="ControlNet controls (models that have a ControlNet); several sum"
    )
    request_id: str | None = Field(
        None,
        description="client-chosen id for GET /v1/progress/{request_id}",
        json_schema_extra={"pattern": r"^[A-Za-z0-9_-]{1,64}$"},
    )

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        if v != "auto" and not re.fullmatch(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}", v):
            raise ValueError('size must be "WxH" in pixels (e.g. "64x64") or "auto"')
        return v

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v):
            raise ValueError("request_id must be 1-64 characters of A-Z, a-z, 0-9, _ and -")
        return v

    def side(self) -> int | None:
        """The square side asked for (None: the model's default); raises ValueError for a non-square size."""
        if self.size == "auto":
            return None
        w, h = map(int, self.size.split("x"))
        if w != h:
            raise ValueError(f"size {self.size}: t2i models make square images; ask for e.g. {w}x{w}")
        return w


class APIError(Exception):
    """An error answered as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with pydantic's ``#/$defs/...`` references replaced by the definitions: the schema is embedded in
    the OpenAPI document, where a reference relative to its own root would point nowhere."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def request_schema(limits: Limits, samplers: list[str]) -> dict[str, Any]:
    """The request's JSON schema with this server's limits in it, so the published API says what it accepts."""
    schema = _inline_refs(GenerationRequest.model_json_schema())
    props = schema["properties"]
    props["prompt"]["maxLength"] = limits.max_prompt_chars
    props["negative_prompt"]["maxLength"] = limits.max_prompt_chars
    props["n"]["maximum"] = limits.max_n
    for name, bound in (("steps", limits.max_steps), ("guidance", limits.max_guidance)):
        for alt in props[name].get("anyOf", [props[name]]):
            if alt.get("type") in ("integer", "number"):
                alt["maximum"] = bound
    for alt in props["sampler"].get("anyOf", [props["sampler"]]):
        if alt.get("type") == "string":
            alt["enum"] = sorted(samplers)
    return schema


def edit_schema(limits: Limits, samplers: list[str]) -> dict[str, Any]:
    """The multipart form of ``POST /v1/images/edits``: the generation fields, the two files, strength, mask_blur."""
    schema = request_schema(limits, samplers)
    props = dict(schema["properties"])
    props["image"] = {"type": "string", "format": "binary", "description": "the image to edit (PNG or JPEG)"}
    props["mask"] = {
        "type": "string",
        "format": "binary",
        "description": "where to repaint: transparent pixels (RGBA, OpenAI's rule) or white ones",
    }
    props["strength"] = {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "description": "how much to repaint (1: from pure noise; default 0.8)",
    }
    props["mask_blur"] = {"type": "number", "minimum": 0, "description": "soften the mask edge (pixels)"}
    return {**schema, "properties": props, "required": ["image", "prompt"]}  # fmt: skip


def check_limits(req: GenerationRequest, limits: Limits) -> None:
    """The bounds that depend on the server's configuration (400 with the field named)."""
    if len(req.prompt) > limits.max_prompt_chars:
        raise APIError(400, f"prompt is {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}",
                       param="prompt", code="prompt_too_long")  # fmt: skip
    if len(req.negative_prompt) > limits.max_prompt_chars:
        raise APIError(400, f"negative_prompt is longer than {limits.max_prompt_chars} characters",
                       param="negative_prompt", code="prompt_too_long")  # fmt: skip
    if req.n > limits.max_n:
        raise APIError(400, f"n is {req.n}; this server makes at most {limits.max_n} images per request", param="n")
    if req.steps is not None and req.steps > limits.max_steps:
        raise APIError(400, f"steps is {req.steps}; the limit is {limits.max_steps}", param="steps")
    if req.guidance is not None and req.guidance > limits.max_guidance:
        raise APIError(400, f"guidance is {req.guidance}; the limit is {limits.max_guidance}", param="guidance")


def parse_request(obj: Any) -> GenerationRequest:
    """Validate a decoded JSON body; pydantic's errors become one readable 422 message naming the fields."""
    if not isinstance(obj, dict):
        raise APIError(400, 'the request body must be a JSON object, e.g. {"prompt": "a red circle"}')
    try:
        return GenerationRequest.model_validate(obj)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """422 naming every bad field: ``n: Input should be greater than or equal to 1; size: ...``."""
    parts, first = [], None
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        first = first or loc
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see the API docs at /docs)"
        parts.append(f"{loc}: {msg}")
    return APIError(422, "; ".join(parts), param=first, code="invalid_value")
