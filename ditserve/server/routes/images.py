"""POST /v1/images/generations and /v1/images/edits, and GET /files/images/{name} for `url` answers."""

from __future__ import annotations

import base64
import re
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse

from ditserve.engine import messages as msg
from ditserve.engine.scheduler import Result
from ditserve.server.errors import ERROR_RESPONSES, ApiError
from ditserve.server.schemas import (
    ImageGenerationRequest,
    ImageOptions,
    ImagesResponse,
    InvalidRequest,
    to_sampling_params,
    validated,
)
from ditserve.server.state import Server
from ditserve.server.uploads import check_image_upload

_FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")
_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

router = APIRouter()


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERROR_RESPONSES)
async def images_generations(request: Request, body: ImageGenerationRequest, server: Server):
    return await _generate_images(request, server, "images/generations", body)


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=ERROR_RESPONSES)
async def images_edits(
    request: Request,
    server: Server,
    prompt: Annotated[str, Form()],
    image: Annotated[list[UploadFile] | None, File()] = None,
    image_list: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
    mask: Annotated[UploadFile | None, File()] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[str, Form()] = "b64_json",
    output_format: Annotated[str, Form()] = "png",
    negative_prompt: Annotated[str | None, Form()] = None,
    num_inference_steps: Annotated[int | None, Form()] = None,
    guidance_scale: Annotated[float | None, Form()] = None,
    true_cfg_scale: Annotated[float | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    width: Annotated[int | None, Form()] = None,
    height: Annotated[int | None, Form()] = None,
):
    fields = {
        "prompt": prompt,
        "model": model,
        "n": n,
        "size": size,
        "response_format": response_format,
        "output_format": output_format,
        "negative_prompt": negative_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "true_cfg_scale": true_cfg_scale,
        "seed": seed,
        "width": width,
        "height": height,
    }
    body = validated(ImageOptions, fields)
    images = [*(image or []), *(image_list or [])]
    if not images:
        raise InvalidRequest("image", "at least one image is required (field 'image' or 'image[]')")
    settings = server.settings
    for upload in images:
        await check_image_upload(upload, "image", settings.max_input_pixels)
    if mask is not None:
        await check_image_upload(mask, "mask", settings.max_input_pixels)
    info = server.ready_info()
    server.check_model(info, body.model)
    to_sampling_params(body, info.spatial_multiple, info.max_sequence_length_limit, settings.max_prompt_chars)
    # No pipeline edits images yet; one that does lists "image-edit" in its tasks and gets a route here.
    raise InvalidRequest(
        "model",
        f"model {server.served_name(info)!r} cannot edit images (it does: {', '.join(info.tasks)})",
        "unsupported_task",
    )


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
    params = params.replace(
        height=params.height or info.defaults["height"], width=params.width or info.defaults["width"]
    )
    item = msg.WorkItem(server.scheduler.new_request_id(), msg.params_to_dict(params), body.output_format)
    result = await server.submit(request, endpoint, item, _batch_key(info, params, body.output_format))
    return _images_response(request, server, body, params, result)


def _batch_key(info: msg.ModelInfo, params, output_format: str) -> tuple:
    """The batch key, with the model's defaults filled in so that default and explicit values match."""
    resolved = params.with_defaults(msg.params_from_dict(info.defaults))  # as Pipeline.resolve fills them
    return (*resolved.computation_key(), output_format)


def _images_response(request: Request, server: Server, body: ImageOptions, params, result: Result) -> dict:
    data = []
    for blob in result.images:
        if body.response_format == "url":
            name = server.keep_url_image(blob, body.output_format)
            data.append({"url": str(request.url_for("get_file", name=name))})
        else:
            data.append({"b64_json": base64.b64encode(blob).decode()})
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=body.output_format,
        size=f"{params.width}x{params.height}",
        seed=result.seed,
        inference_time_s=round(result.inference_time_s, 4),
        queue_time_s=round(result.queue_time_s, 4),
        peak_memory_mb=result.peak_memory_mb,
        batch_size=result.batch_size,
    ).model_dump(exclude_none=False)
