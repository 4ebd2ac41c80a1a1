"""Request and response bodies of the HTTP API, in OpenAI's shapes, and their translation to `SamplingParams`.

Pydantic checks types and simple bounds, strictly: an integer field takes a JSON integer, never a string or a
boolean, and a number field a JSON number. Multipart forms carry text, so `form_values` turns a form's ASCII
integers and numbers into numbers first (and nothing else: "٣", "3_0" or "true" stay text and are refused).
`to_sampling_params` checks the rest against the served model (size a multiple of its spatial multiple, steps in
range, ...) by calling `SamplingParams.validate`, whose `ConfigError` names the field. Every failure becomes
`InvalidRequest`, which the app turns into a 400 naming the parameter.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ditserve.config import MAX_FPS, MAX_FRAMES, MAX_IMAGES, MAX_SIDE, MAX_STEPS, ConfigError, SamplingParams

# ASCII only: Python's \d and \s also match other scripts' digits and spaces ("٣٢x٣٢" would be 32x32).
_SIZE = re.compile(r"^ *([0-9]+) *[xX] *([0-9]+) *$")
_FORM_INT = re.compile(r"^-?[0-9]{1,20}$")
_FORM_FLOAT = re.compile(r"^-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?$")
MAX_LORA_NICKNAME = 64  # as the LoRA manager's limit
MAX_ADAPTERS = 16  # LoRAs one set_lora may name
MAX_SECONDS = 600  # the longest clip a video request may ask for (frames are bounded again by --max-frames)
# OpenAI's parameter names → ours, so an error names what the client sent.
_FIELD_NAMES = {"num_images": "n"}


_CACHE_HELP = (
    'DiT caching for this request, e.g. {"method": "dbcache", "threshold": 0.08} or {"method": "mask", "mask": '
    '"fast"}; {"method": "none"} turns off the server\'s default (docs/caching.md)'
)


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
    # Strict types: "2" is not 2 and true is not 1 (an integer field takes only a JSON integer).
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageOptions(_Strict):
    """Fields shared by generations and edits."""

    prompt: str = Field(min_length=1, description="what to draw")
    model: str | None = Field(default=None, max_length=512)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(
        default=None, max_length=32, description='"WxH" in ASCII digits, e.g. "1024x1024", or "auto"'
    )
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
    cache: dict | None = Field(default=None, description=_CACHE_HELP)
    attention: str | None = Field(
        default=None,
        max_length=64,
        description="attention backend of this request (sdpa, cudnn, ...; sparse for video models: sliding-tile[:T,H,W], "
        "sla[:ratio], vsa[:sparsity]); default: the server's",
    )


class ImageGenerationRequest(ImageOptions):
    pass


class ImageEditForm(ImageOptions):
    """The multipart form of POST /v1/images/edits, for the OpenAPI schema (the route reads the form itself)."""

    image: list[bytes] | None = Field(default=None, description="the image(s) to edit (or send them as image[])")
    mask: bytes | None = None


class VideoRequest(_Strict):
    """POST /v1/videos (and /v1/videos/sync), as JSON or as multipart with `input_reference` a file."""

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, max_length=512)
    seconds: str | int | None = Field(default=None, description='clip length in whole seconds, e.g. 4 or "4"')
    num_frames: int | None = Field(
        default=None,
        ge=1,
        le=MAX_FRAMES,
        description="frames of the clip instead of seconds: the VAE's step · k + 1, e.g. 81",
    )
    fps: int | None = Field(default=None, ge=1, le=MAX_FPS, description="frame rate (default: the model's)")
    size: str | None = Field(default=None, max_length=32, description='"WxH"')
    # OpenAI's reference object is {"image_url": ...} or {"file_id": ...}: a plain object here, so that the OpenAPI
    # schema needs no definitions of its own; the route reads it.
    input_reference: str | dict[str, str] | None = Field(
        default=None,
        description="the first frame (image to video): in JSON a data URL or base64 of a PNG, JPEG or WebP, or "
        '{"image_url": data URL}; in multipart a file',
    )
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=-1e4, le=1e4, allow_inf_nan=False)
    guidance_scale_2: float | None = Field(
        default=None,
        ge=-1e4,
        le=1e4,
        allow_inf_nan=False,
        description="the second expert's CFG scale (models with two)",
    )
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    cache: dict | None = Field(default=None, description=_CACHE_HELP)
    attention: str | None = Field(
        default=None,
        max_length=64,
        description="attention backend of this request (sdpa, cudnn, ...; sparse for video models: sliding-tile[:T,H,W], "
        "sla[:ratio], vsa[:sparsity]); default: the server's",
    )


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
    # DiT caching as run: method, block computations in all and skipped (None: no caching)
    cache: dict | None = None
    # Peak allocated device memory in MiB per stage and per rank (figures None on a CPU server); see docs/memory.md
    memory: dict | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def parse_size(size: str | None, param: str = "size") -> tuple[int | None, int | None]:
    """(width, height) from "WxH" in ASCII digits; (None, None) for None or "auto" (the model's default)."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise InvalidRequest(
            param, f'must look like "WIDTHxHEIGHT" in ASCII digits, e.g. "1024x1024" (or "auto"); got {size!r}'
        )
    width, height = int(m.group(1)), int(m.group(2))
    for name, value in (("width", width), ("height", height)):
        if not 1 <= value <= MAX_SIDE:
            raise InvalidRequest(param, f"{size.strip()} has a {name} of {value}; each side must be 1 to {MAX_SIDE}")
    return width, height


def field_name(loc: tuple | list) -> str | None:
    """The request field an error location points at: its first name. Pydantic's locations go on into list
    indexes and union members ("strength.float", "lora_path.1"), which are not fields a client sent."""
    for item in loc:
        if isinstance(item, str) and item not in ("body", "query", "path", "header", "form", "cookie"):
            return item
    return None


def validated(model: type[Body], fields: dict) -> Body:
    """`model` from `fields` (None values left out, as unset), any pydantic error raised as InvalidRequest."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidRequest(field_name(first.get("loc", ())), first.get("msg", "invalid value")) from None


def _scalar(annotation) -> type | None:
    """int or float when a field holds that (optionally or None), else None."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = {a for a in typing.get_args(annotation) if a is not type(None)}
        return next(iter(kinds)) if len(kinds) == 1 and kinds <= {int, float} else None
    return annotation if annotation in (int, float) else None


def form_values(model: type[BaseModel], fields: dict) -> dict:
    """A multipart form's text values as `model` takes them: ASCII integers for its integer fields, ASCII decimal
    numbers for its number fields; anything else stays text, for the strict model to refuse naming the field."""
    out = {}
    for name, value in fields.items():
        info = model.model_fields.get(name)
        kind = _scalar(info.annotation) if info is not None else None
        if isinstance(value, str) and kind is int and _FORM_INT.match(value):
            value = int(value)
        elif isinstance(value, str) and kind is float and _FORM_FLOAT.match(value):
            value = float(value)
        out[name] = value
    return out


def _check_prompts(body, max_prompt_chars: int) -> None:
    if len(body.prompt) > max_prompt_chars:
        raise InvalidRequest("prompt", f"is {len(body.prompt)} characters; the limit is {max_prompt_chars}")
    if body.negative_prompt is not None and len(body.negative_prompt) > max_prompt_chars:
        raise InvalidRequest("negative_prompt", f"is longer than the limit of {max_prompt_chars} characters")


def _validated_params(params: SamplingParams, spatial_multiple: int, max_sequence_length_limit: int, names: dict):
    """params.validate, its ConfigError raised as InvalidRequest naming the field the client sent (`names` maps
    SamplingParams' names to the request's)."""
    try:
        params.validate(spatial_multiple, max_sequence_length_limit)
    except ConfigError as e:
        raise InvalidRequest(names.get(e.field, _FIELD_NAMES.get(e.field, e.field)), e.message) from None
    return params


def to_sampling_params(
    body: ImageOptions, spatial_multiple: int, max_sequence_length_limit: int, max_prompt_chars: int
) -> SamplingParams:
    _check_prompts(body, max_prompt_chars)
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
        cache=body.cache,
        attention=body.attention,
    )
    # The client sent size, not width or height: name size.
    names = {side: "size" for side in ("width", "height") if body.size is not None and getattr(body, side) is None}
    return _validated_params(params, spatial_multiple, max_sequence_length_limit, names)


def video_sampling_params(
    body: VideoRequest,
    spatial_multiple: int,
    max_sequence_length_limit: int,
    max_prompt_chars: int,
    default_fps: int,
    frame_step: int | None = None,
) -> SamplingParams:
    """A video request as SamplingParams. `seconds` becomes seconds × fps frames, rounded down to a multiple of
    `frame_step`, plus one (the k·step + 1 frame counts a video VAE packs: 4k+1 for Wan); `num_frames` must be such
    a count itself. Without either, the model's default frame count."""
    _check_prompts(body, max_prompt_chars)
    width, height = parse_size(body.size)
    fps = body.fps or default_fps
    step = frame_step or 1
    frames = body.num_frames
    if frames is not None and body.seconds is not None:
        raise InvalidRequest("num_frames", "give the clip's length as seconds or as num_frames, not both")
    if frames is not None and (frames - 1) % step:
        below = (frames - 1) // step * step + 1
        raise InvalidRequest(
            "num_frames",
            f"must be {step}·k + 1 (this model's VAE packs {step} frames after the first into each latent frame): "
            f"{below} or {below + step}, not {frames}",
        )
    if body.seconds is not None:
        seconds = body.seconds
        if isinstance(seconds, str):
            if not re.fullmatch(r"[0-9]{1,6}", seconds):
                raise InvalidRequest("seconds", f'must be a whole number of seconds, e.g. 4 or "4"; got {seconds!r}')
            seconds = int(seconds)
        if not 1 <= seconds <= MAX_SECONDS:
            raise InvalidRequest("seconds", f"must be from 1 to {MAX_SECONDS}, got {seconds}")
        frames = seconds * fps // step * step + 1
        if frames > MAX_FRAMES:
            raise InvalidRequest("seconds", f"{seconds} s at {fps} fps is {frames} frames; the most is {MAX_FRAMES}")
    params = SamplingParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        height=height,
        width=width,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        guidance_scale_2=body.guidance_scale_2,
        seed=body.seed,
        num_frames=frames,
        fps=fps if frames is not None or body.fps is not None else None,
        cache=body.cache,
        attention=body.attention,
    )
    frames_name = "num_frames" if body.num_frames is not None else "seconds"
    names = {"width": "size", "height": "size", "num_frames": frames_name, "fps": "fps" if body.fps else "seconds"}
    return _validated_params(params, spatial_multiple, max_sequence_length_limit, names)


# ---- LoRA -------------------------------------------------------------------------------------------------------
Name = Annotated[str, Field(max_length=MAX_LORA_NICKNAME)]
LoraPath = Annotated[str, Field(max_length=1024)]
LoraTarget = Name | Annotated[list[Name], Field(max_length=4)]


class SetLoraRequest(_Strict):
    """POST /v1/set_lora: activate adapters (loading new ones from the server's --lora-dir); [] turns LoRA off."""

    lora_nickname: Name | Annotated[list[Name], Field(max_length=MAX_ADAPTERS)]
    lora_path: LoraPath | Annotated[list[LoraPath | None], Field(max_length=MAX_ADAPTERS)] | None = None
    strength: float | Annotated[list[float], Field(max_length=MAX_ADAPTERS)] = 1.0
    target: LoraTarget = "all"


class MergeLoraRequest(_Strict):
    strength: float = 1.0
    target: LoraTarget = "all"


class UnmergeLoraRequest(_Strict):
    target: LoraTarget = "all"


class StartProfileRequest(_Strict):
    """What POST /start_profile traces in every request until /stop_profile (docs/profiling.md)."""

    stages: list[Literal["encode", "prepare", "denoise", "decode"]] | None = Field(
        None, description="the stages to trace, each a window of its own (default: all, or none when steps are given)"
    )
    steps: str | None = Field(
        None, description="denoising steps to trace as one window, START:STOP (0-based, STOP excluded), e.g. '2:4'"
    )
    record_shapes: bool = Field(False, description="record the operators' input shapes")
