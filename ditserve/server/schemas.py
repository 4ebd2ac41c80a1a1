"""Request and response bodies of the HTTP API, in OpenAI's shapes, and their translation to `SamplingParams`.

Pydantic checks types and simple bounds; `to_sampling_params` checks the rest against the served model (size a
multiple of its spatial multiple, steps in range, ...) by calling `SamplingParams.validate`, whose `ConfigError`
names the field. Every failure becomes `InvalidRequest`, which the app turns into a 400 naming the parameter.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ditserve.config import MAX_IMAGES, MAX_SIDE, MAX_STEPS, ConfigError, SamplingParams

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
# OpenAI's parameter names → ours, so an error names what the client sent.
_FIELD_NAMES = {"num_images": "n"}


class InvalidRequest(Exception):
    """A client error: `param` is the offending field, `message` says what is allowed."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code
        self.status = status


class _Strict(BaseModel):
    # Unknown fields are an error that names them, as OpenAI's API does: a typo must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class ImageOptions(_Strict):
    """Fields shared by generations and edits."""

    prompt: str = Field(min_length=1, description="what to draw")
    model: str | None = Field(default=None, max_length=512)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(default=None, max_length=32, description='"WxH", e.g. "1024x1024", or "auto"')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100, description="jpeg/webp quality")
    user: str | None = Field(default=None, max_length=512)
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=-1e4, le=1e4, allow_inf_nan=False)
    true_cfg_scale: float | None = Field(default=None, ge=0, le=1e4, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    width: int | None = Field(default=None, ge=1, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=1, le=MAX_SIDE)


class ImageGenerationRequest(ImageOptions):
    pass


class VideoRequest(_Strict):
    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, max_length=512)
    seconds: str | int | None = Field(default=None, description="clip length in seconds")
    size: str | None = Field(default=None, max_length=32, description='"WxH"')
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=-1e4, le=1e4, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


Body = TypeVar("Body", bound=BaseModel)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    seed: int
    inference_time_s: float
    queue_time_s: float
    peak_memory_mb: float | None
    batch_size: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def parse_size(size: str | None, param: str = "size") -> tuple[int | None, int | None]:
    """(width, height) from "WxH"; (None, None) for None or "auto" (the model's default)."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise InvalidRequest(param, f'must look like "WIDTHxHEIGHT", e.g. "1024x1024" (or "auto"); got {size!r}')
    return int(m.group(1)), int(m.group(2))


def validated(model: type[Body], fields: dict) -> Body:
    """`model` from `fields` (None values left out, as unset), any pydantic error raised as InvalidRequest."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        raise InvalidRequest(param, first.get("msg", "invalid value")) from None


def to_sampling_params(
    body: ImageOptions, spatial_multiple: int, max_sequence_length_limit: int, max_prompt_chars: int
) -> SamplingParams:
    if len(body.prompt) > max_prompt_chars:
        raise InvalidRequest("prompt", f"is {len(body.prompt)} characters; the limit is {max_prompt_chars}")
    if body.negative_prompt is not None and len(body.negative_prompt) > max_prompt_chars:
        raise InvalidRequest("negative_prompt", f"is longer than the limit of {max_prompt_chars} characters")
    width, height = parse_size(body.size)
    for name, explicit, from_size in (("width", body.width, width), ("height", body.height, height)):
        if explicit is not None and from_size is not None and explicit != from_size:
            raise InvalidRequest(name, f"is {explicit} but size says {from_size}; give one or make them agree")
    params = SamplingParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        height=body.height if body.height is not None else height,
        width=body.width if body.width is not None else width,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        true_cfg_scale=body.true_cfg_scale,
        seed=body.seed,
        num_images=body.n,
    )
    try:
        params.validate(spatial_multiple, max_sequence_length_limit)
    except ConfigError as e:
        field = _FIELD_NAMES.get(e.field, e.field)
        if field in ("width", "height") and body.size is not None and getattr(body, field) is None:
            field = "size"  # the client sent size, so name size
        raise InvalidRequest(field, e.message) from None
    return params


# ---- LoRA -------------------------------------------------------------------------------------------------------
LoraTarget = str | list[str]


class SetLoraRequest(BaseModel):
    """POST /v1/set_lora: activate adapters (loading new ones from the server's --lora-dir); [] turns LoRA off."""

    model_config = ConfigDict(extra="forbid")
    lora_nickname: str | list[str]
    lora_path: str | list[str | None] | None = None  # relative to --lora-dir
    strength: float | list[float] = 1.0
    target: LoraTarget = "all"


class MergeLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strength: float = 1.0
    target: LoraTarget = "all"


class UnmergeLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: LoraTarget = "all"
