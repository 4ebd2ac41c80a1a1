"""/v1/videos: video jobs (OpenAI's asynchronous videos API) and /v1/videos/sync (the MP4 as the answer).

A job is checked like any request (every field, the input image decoded, the request priced) before it exists, and
queued at once (a full queue is 429, a worker that cannot take it 503); then POST answers the queued job and the job
runs in the background: `in_progress` when the worker takes it, its progress moving with each denoising step,
`completed` once the MP4 is in the job store (or `failed`, with the error a synchronous request would have had).
DELETE cancels an unfinished job (the worker stops it at its next step) and deletes a finished job's file.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from ditserve.config import SamplingParams
from ditserve.engine import messages as msg
from ditserve.server.errors import ERROR_RESPONSES, SCHEDULER_FAILURES, ApiError, unsupported_media_type
from ditserve.server.jobs import ContentTooLarge, Job
from ditserve.server.schemas import (
    InvalidRequest,
    VideoRequest,
    form_values,
    validated,
    video_sampling_params,
)
from ditserve.server.state import Server, ServerState
from ditserve.server.uploads import check_image_bytes, check_image_upload, image_bytes_from_text

if TYPE_CHECKING:
    from ditserve.engine.scheduler import _Pending

DEFAULT_FPS = 16  # frames per second of a clip, for a model whose defaults name none
VIDEO_TASKS = ("text-to-video", "image-to-video")
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": VideoRequest.model_json_schema()},
        },
    }
}

router = APIRouter()


@dataclass
class _VideoWork:
    """A checked video request, ready to queue."""

    item: msg.WorkItem
    key: tuple
    params: SamplingParams  # the model's defaults filled in for the size and the clip's length
    estimate_s: float | None
    model: str
    seconds: str


@router.post("/v1/videos", responses=ERROR_RESPONSES, openapi_extra=_REQUEST_BODY)
async def create_video(request: Request, server: Server):
    work = await _checked_request(request, server, server.settings.video_timeout)
    params = work.params
    job = server.jobs.create(work.model, params.prompt, f"{params.width}x{params.height}", work.seconds)  # type: ignore[arg-type]
    job.request_id = work.item.request_id
    try:
        pending = server.scheduler.enqueue(work.item, work.key, job.advance, work.estimate_s)
    except SCHEDULER_FAILURES as e:
        server.jobs.discard(job)  # never queued: no job was made
        raise server.failure("videos", e) from None
    job.task = _start(server, job, pending)
    return job.public()


@router.post("/v1/videos/sync", responses=ERROR_RESPONSES, openapi_extra=_REQUEST_BODY)
async def create_video_sync(request: Request, server: Server):
    """The same request, answered with the MP4 itself once it is made (within --request-timeout)."""
    work = await _checked_request(request, server, None)
    result = await server.submit(request, "videos/sync", work.item, work.key, work.estimate_s)
    return Response(
        result.images[0],
        media_type="video/mp4",
        headers={"X-Seed": str(result.seed), "X-Inference-Time": f"{result.inference_time_s:.4f}"},
    )


@router.get("/v1/videos", responses=ERROR_RESPONSES)
async def list_videos(server: Server, limit: int = 20, after: str | None = None, order: str = "desc"):
    if order not in ("asc", "desc"):
        raise InvalidRequest("order", f"must be asc or desc, got {order!r}")
    limit = max(1, min(100, limit))
    page = server.jobs.list(limit + 1, after, order)
    data = [j.public() for j in page[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(page) > limit,
    }


@router.get("/v1/videos/{video_id}", responses=ERROR_RESPONSES)
async def get_video(video_id: str, server: Server):
    return _find_job(server, video_id).public()


@router.get("/v1/videos/{video_id}/content", responses=ERROR_RESPONSES)
async def get_video_content(video_id: str, server: Server, variant: str = "video"):
    job = _find_job(server, video_id)
    if variant != "video":
        raise InvalidRequest("variant", f"only the video itself is served (variant=video), not {variant!r}")
    if job.status != "completed":
        raise ApiError(
            400,
            f"video {video_id} is {job.status}, not completed",
            "invalid_request_error",
            "video_id",
            "not_ready",
        )
    return FileResponse(server.jobs.content_path(job), media_type=job.content_type, filename=f"{job.id}.mp4")


@router.delete("/v1/videos/{video_id}", responses=ERROR_RESPONSES)
async def delete_video(video_id: str, server: Server):
    """Cancel a queued or running job (the worker stops it at its next denoising step), or delete a finished one's
    file; either way the job is gone."""
    job = _find_job(server, video_id)
    server.jobs.delete(job)
    if job.request_id is not None:
        server.scheduler.cancel(job.request_id)  # dropped from the queue, or stopped by the worker at its next step
    return {"id": job.id, "object": "video.deleted", "deleted": True}


# ---- a request, checked ---------------------------------------------------------------------------------------------
async def _checked_request(request: Request, server: ServerState, timeout: float | None) -> _VideoWork:
    """Every field checked, the image decoded and the request priced (against `timeout`, default the request
    timeout), then what the model can do: a 4xx naming the field for anything wrong."""
    body, image = await _video_request(request, server)
    info = server.ready_info()
    server.check_model(info, body.model)
    settings = server.settings
    fps = body.fps or info.defaults.get("fps") or DEFAULT_FPS
    params = video_sampling_params(
        body,
        info.spatial_multiple,
        info.max_sequence_length_limit,
        settings.max_prompt_chars,
        fps,
        info.frame_step,
    )
    frames_param = "num_frames" if body.num_frames is not None else "seconds"
    estimate = server.admit(info, params, "size", frames_param, timeout)
    name = server.served_name(info)
    if not set(VIDEO_TASKS) & set(info.tasks):
        raise InvalidRequest(
            "model", f"model {name!r} does not generate video (it does: {', '.join(info.tasks)})", "unsupported_task"
        )
    task = "image-to-video" if image is not None else "text-to-video"
    if task not in info.tasks:
        if image is not None:
            why = f"model {name!r} makes videos from text only; leave out input_reference"
        else:
            why = f"model {name!r} makes videos from an image: send input_reference (the first frame)"
        raise InvalidRequest("input_reference", why, "unsupported_task")
    defaults = msg.params_from_dict(info.defaults)
    params = params.replace(
        height=params.height or defaults.height,
        width=params.width or defaults.width,
        num_frames=params.num_frames or defaults.num_frames,
        fps=params.fps or defaults.fps or DEFAULT_FPS,
    )
    resolved = params.with_defaults(defaults)  # as Pipeline.resolve fills them, so default and explicit values batch
    key = (*resolved.computation_key(), "mp4", task, resolved.fps)
    item = msg.WorkItem(
        server.scheduler.new_request_id(),
        msg.params_to_dict(params),
        "mp4",
        task,
        input_images=[image] if image is not None else [],
    )
    seconds = str(body.seconds) if body.seconds is not None else f"{round((params.num_frames - 1) / params.fps, 3):g}"  # type: ignore[operator]
    return _VideoWork(item, key, params, estimate, name, seconds)


async def _video_request(request: Request, server: ServerState) -> tuple[VideoRequest, bytes | None]:
    """The request and its input image's bytes (checked to decode), from JSON or multipart."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    max_pixels = server.settings.max_input_pixels
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise InvalidRequest(None, f"could not read the multipart body: {e}") from None
        try:
            fields: dict = {}
            references = []
            for name, value in form.multi_items():
                # input_reference[image_url]: how a client library sends OpenAI's reference object in a form
                if name in ("input_reference", "input_reference[image_url]"):
                    references.append(value)
                elif not isinstance(value, str):
                    raise InvalidRequest(name, "must be a text field, not a file")
                else:
                    fields[name] = value
            body = validated(VideoRequest, form_values(VideoRequest, fields))
            if len(references) > 1:
                raise InvalidRequest("input_reference", "give one image (the first frame)")
            image = None
            if references:
                ref = references[0]
                if isinstance(ref, str):
                    image = image_bytes_from_text(ref, "input_reference")
                    await asyncio.to_thread(check_image_bytes, image, "input_reference", max_pixels)
                else:
                    image = await check_image_upload(ref, "input_reference", max_pixels)
        finally:
            await form.close()
        return body, image
    if media and media != "application/json" and not media.endswith("+json"):
        raise unsupported_media_type(media, "JSON (Content-Type: application/json), or multipart/form-data")
    try:
        data = await request.json()
    except Exception:  # noqa: BLE001
        raise InvalidRequest(
            None, "the body must be JSON (or multipart/form-data with input_reference)", "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            None, f"the body must be a JSON object of the request's fields, not {type(data).__name__}", "invalid_body"
        )
    body = validated(VideoRequest, data)
    reference = body.input_reference
    if reference is None:
        return body, None
    if isinstance(reference, dict):
        if "file_id" in reference:
            raise InvalidRequest("input_reference", "file ids are not served here: send the image as image_url")
        if set(reference) != {"image_url"}:
            raise InvalidRequest("input_reference", 'must be {"image_url": "data:image/...;base64,..."} as an object')
        reference = reference["image_url"]
    image = image_bytes_from_text(reference, "input_reference")
    await asyncio.to_thread(check_image_bytes, image, "input_reference", max_pixels)
    return body, image


# ---- running a job ---------------------------------------------------------------------------------------------------
def _start(server: ServerState, job: Job, pending: _Pending) -> asyncio.Task:
    accepted = time.monotonic()

    async def content() -> bytes:
        try:
            result = await server.scheduler.result(pending, server.settings.video_timeout)
        except SCHEDULER_FAILURES as e:
            raise server.failure("videos", e) from None
        server.succeeded("videos", accepted, result)
        return result.images[0]

    def describe(e: Exception) -> dict:
        if isinstance(e, ApiError):
            return {"code": e.code, "message": e.message, "param": e.param, "type": e.type}
        if isinstance(e, ContentTooLarge):
            return {"code": "too_large", "message": str(e), "param": None, "type": "server_error"}
        traceback.print_exception(e, file=sys.stderr)  # a bug: logged, and the job says no more than that
        return {"code": "internal_error", "message": "internal server error", "param": None, "type": "server_error"}

    return asyncio.create_task(server.jobs.run(job, content, describe), name=f"ditserve-{job.id}")


def _find_job(server: ServerState, video_id: str) -> Job:
    job = server.jobs.get(video_id)
    if job is None:
        raise ApiError(404, f"no video job {video_id!r}", "invalid_request_error", "video_id", "not_found")
    return job
