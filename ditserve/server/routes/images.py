"""POST /v1/images/generations and /v1/images/edits, and GET /files/images/{name} for `url` answers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from ditserve.config import MAX_INPUT_IMAGES
from ditserve.engine import messages as msg
from ditserve.engine.scheduler import Result
from ditserve.server.errors import ERROR_RESPONSES, ApiError, require_json, unsupported_media_type
from ditserve.server.schemas import (
    ImageEditForm,
    ImageGenerationRequest,
    ImageOptions,
    ImagesResponse,
    InvalidRequest,
    form_values,
    to_sampling_params,
    validated,
)
from ditserve.server.state import Server
from ditserve.server.uploads import check_image_bytes, check_image_upload

_FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")
_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

router = APIRouter()


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_json)],
)
async def images_generations(request: Request, body: ImageGenerationRequest, server: Server):
    return await _generate_images(request, server, "images/generations", body)


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": ImageEditForm.model_json_schema()}},
        }
    },
)
async def images_edits(request: Request, server: Server):
    """Multipart: `image` or `image[]` (one or more files), `mask`, and ImageOptions' fields as text; or JSON:
    ImageOptions' fields with `images`, a list of {"b64_json": ...} or {"url": "data:image/...;base64,..."}. Every
    field is checked, the images decoded and the request priced before the model's abilities are: a client learns
    what is wrong with its request whatever the model."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    settings = server.settings
    if media == "application/json":
        body, images = await _json_edit(request, settings.max_input_pixels)
        masked = False
    elif media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        body, images, masked = await _form_edit(request, settings.max_input_pixels)
    else:
        raise unsupported_media_type(media, "multipart/form-data (the image files and fields) or JSON")
    info = server.ready_info()
    server.check_model(info, body.model)
    params = to_sampling_params(body, info.spatial_multiple, info.max_sequence_length_limit, settings.max_prompt_chars)
    estimate = server.admit(info, params, _size_param(body))
    if "image-edit" not in info.tasks:
        raise InvalidRequest(
            "model",
            f"model {server.served_name(info)!r} cannot edit images (it does: {', '.join(info.tasks)})",
            "unsupported_task",
        )
    if masked:
        raise InvalidRequest("mask", "masked (inpainting) edits are not supported: send the image alone")
    item = msg.WorkItem(
        server.scheduler.new_request_id(), msg.params_to_dict(params), body.output_format, "image-edit", images
    )
    # Only requests with the same input images may run as one batch.
    key = (*_batch_key(info, params, body.output_format), hashlib.sha256(b"".join(images)).hexdigest())
    result = await server.submit(request, "images/edits", item, key, estimate)
    return _images_response(server, body, params, result)


async def _form_edit(request: Request, max_pixels: int) -> tuple[ImageOptions, list[bytes], bool]:
    try:
        form = await request.form(max_files=MAX_INPUT_IMAGES + 1, max_fields=64)
    except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
        raise InvalidRequest(None, f"could not read the multipart body: {e}") from None
    try:
        uploads, mask, fields = [], None, {}
        for name, value in form.multi_items():
            is_file = not isinstance(value, str)
            if name in ("image", "image[]", "mask"):
                if not is_file:
                    raise InvalidRequest(name, "must be a file (an image), not a text field")
                if name == "mask":
                    mask = value
                else:
                    uploads.append(value)
            elif is_file:
                raise InvalidRequest(name, "must be a text field, not a file")
            else:
                fields[name] = value
        body = validated(ImageOptions, form_values(ImageOptions, fields))
        if not uploads:
            raise InvalidRequest("image", "at least one image is required (field 'image' or 'image[]')")
        if len(uploads) > MAX_INPUT_IMAGES:
            raise InvalidRequest("image", f"at most {MAX_INPUT_IMAGES} images, got {len(uploads)}")
        images = [await check_image_upload(upload, "image", max_pixels) for upload in uploads]
        if mask is not None:
            await check_image_upload(mask, "mask", max_pixels)
    finally:
        await form.close()
    return body, images, mask is not None


async def _json_edit(request: Request, max_pixels: int) -> tuple[ImageOptions, list[bytes]]:
    try:
        data = await request.json()
    except ValueError as e:
        raise InvalidRequest(None, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(None, "the body must be a JSON object")
    entries = data.pop("images", None)
    body = validated(ImageOptions, data)
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest("images", 'at least one image is required: [{"b64_json": ...} or {"url": "data:..."}]')
    if len(entries) > MAX_INPUT_IMAGES:
        raise InvalidRequest("images", f"at most {MAX_INPUT_IMAGES} images, got {len(entries)}")
    images = []
    for entry in entries:
        encoded = None
        if isinstance(entry, dict) and isinstance(entry.get("b64_json"), str):
            encoded = entry["b64_json"]
        elif isinstance(entry, dict) and isinstance(url := entry.get("url", entry.get("image_url")), str):
            if not url.startswith("data:image/") or ";base64," not in url:
                raise InvalidRequest("images", "a url must be a base64 data URL (data:image/png;base64,...); remote "
                                     "URLs are not fetched")  # fmt: skip
            encoded = url.split(",", 1)[1]
        if encoded is None:
            raise InvalidRequest("images", 'each image is {"b64_json": ...} or {"url": "data:image/...;base64,..."}')
        try:
            blob = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise InvalidRequest("images", "an image is not valid base64") from None
        await asyncio.to_thread(check_image_bytes, blob, "images", max_pixels)
        images.append(blob)
    return body, images


@router.get("/files/images/{name}", name="get_file", responses=ERROR_RESPONSES)
async def get_file(name: str, server: Server):
    # Only names this server made (32 hex digits and our extension): nothing else can be read.
    if not _FILE_NAME.match(name) or not (server.image_dir / name).is_file():
        raise ApiError(404, "no such file", "invalid_request_error", "name", "not_found")
    return FileResponse(server.image_dir / name, media_type=_MEDIA_TYPES[name.rsplit(".", 1)[1]])


async def _generate_images(request: Request, server: Server, endpoint: str, body: ImageOptions) -> dict:
    info = server.ready_info()
    server.check_model(info, body.model)
    settings = server.settings
    params = to_sampling_params(body, info.spatial_multiple, info.max_sequence_length_limit, settings.max_prompt_chars)
    estimate = server.admit(info, params, _size_param(body))
    params = params.replace(
        height=params.height or info.defaults["height"], width=params.width or info.defaults["width"]
    )
    item = msg.WorkItem(server.scheduler.new_request_id(), msg.params_to_dict(params), body.output_format)
    result = await server.submit(request, endpoint, item, _batch_key(info, params, body.output_format), estimate)
    return _images_response(server, body, params, result)


def _size_param(body: ImageOptions) -> str:
    """The field that set the size, to name it when the size is over a limit."""
    if body.size is None and (body.width is not None or body.height is not None):
        return "width" if body.width is not None else "height"
    return "size"


def _batch_key(info: msg.ModelInfo, params, output_format: str) -> tuple:
    """The batch key, with the model's defaults filled in so that default and explicit values match."""
    resolved = params.with_defaults(msg.params_from_dict(info.defaults))  # as Pipeline.resolve fills them
    return (*resolved.computation_key(), output_format)


def _images_response(server: Server, body: ImageOptions, params, result: Result) -> dict:
    size = f"{params.width}x{params.height}"
    if (params.width is None or params.height is None) and result.images:  # an edit's size comes from its input
        from PIL import Image

        with Image.open(io.BytesIO(result.images[0])) as first:
            size = f"{first.width}x{first.height}"
    data = []
    for blob in result.images:
        if body.response_format == "url":
            name = server.keep_url_image(blob, body.output_format)
            data.append({"url": server.file_url(name)})
        else:
            data.append({"b64_json": base64.b64encode(blob).decode()})
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=body.output_format,
        size=size,
        seed=result.seed,
        inference_time_s=round(result.inference_time_s, 4),
        queue_time_s=round(result.queue_time_s, 4),
        peak_memory_mb=result.peak_memory_mb,
        batch_size=result.batch_size,
        cache=result.timings.get("cache") if isinstance(result.timings, dict) else None,
        memory=result.timings.get("memory") if isinstance(result.timings, dict) else None,
    ).model_dump(exclude_none=False)
