"""/v1/videos: creating a video job, and listing, reading, downloading and deleting jobs in the job store."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ditserve.server.errors import ERROR_RESPONSES, ApiError, unsupported_media_type
from ditserve.server.schemas import InvalidRequest, VideoRequest, form_values, validated, video_sampling_params
from ditserve.server.state import Server, ServerState
from ditserve.server.uploads import check_image_upload

DEFAULT_FPS = 16  # frames per second of a clip, for a model whose defaults name none

router = APIRouter()


@router.post(
    "/v1/videos",
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": VideoRequest.model_json_schema()}},
        }
    },
)
async def create_video(request: Request, server: Server):
    body = await _video_request(request, server)
    info = server.ready_info()
    server.check_model(info, body.model)
    fps = info.defaults.get("fps") or DEFAULT_FPS
    settings = server.settings
    params = video_sampling_params(
        body, info.spatial_multiple, info.max_sequence_length_limit, settings.max_prompt_chars, fps
    )
    server.admit(info, params, "size", "seconds")
    # No pipeline makes video yet; one that does lists "text-to-video" in its tasks, and its jobs run through
    # `jobs.run` with the scheduler's submit.
    raise InvalidRequest(
        "model",
        f"model {server.served_name(info)!r} does not generate video (it does: {', '.join(info.tasks)})",
        "unsupported_task",
    )


@router.get("/v1/videos", responses=ERROR_RESPONSES)
async def list_videos(server: Server, limit: int = 20, after: str | None = None):
    limit = max(1, min(100, limit))
    page = server.jobs.list(limit + 1, after)
    return {
        "object": "list",
        "data": [j.public() for j in page[:limit]],
        "has_more": len(page) > limit,
    }


@router.get("/v1/videos/{video_id}", responses=ERROR_RESPONSES)
async def get_video(video_id: str, server: Server):
    return _find_job(server, video_id).public()


@router.get("/v1/videos/{video_id}/content", responses=ERROR_RESPONSES)
async def get_video_content(video_id: str, server: Server):
    job = _find_job(server, video_id)
    if job.status != "completed":
        raise ApiError(
            400,
            f"video {video_id} is {job.status}, not completed",
            "invalid_request_error",
            "video_id",
            "not_ready",
        )
    return FileResponse(server.jobs.content_path(job), media_type=job.content_type)


@router.delete("/v1/videos/{video_id}", responses=ERROR_RESPONSES)
async def delete_video(video_id: str, server: Server):
    job = _find_job(server, video_id)
    server.jobs.cancel(job)
    return {**job.public(), "deleted": True}


async def _video_request(request: Request, server: ServerState) -> VideoRequest:
    """POST /v1/videos takes JSON, or multipart with an input_reference image."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise InvalidRequest(None, f"could not read the multipart body: {e}") from None
        try:
            fields = {}
            for name, value in form.multi_items():
                if name == "input_reference":
                    if isinstance(value, str):
                        raise InvalidRequest(name, "must be a file (an image), not a text field")
                    await check_image_upload(value, name, server.settings.max_input_pixels)
                elif not isinstance(value, str):
                    raise InvalidRequest(name, "must be a text field, not a file")
                else:
                    fields[name] = value
        finally:
            await form.close()
        return validated(VideoRequest, form_values(VideoRequest, fields))
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
    return validated(VideoRequest, data)


def _find_job(server: ServerState, video_id: str):
    job = server.jobs.get(video_id)
    if job is None:
        raise ApiError(404, f"no video job {video_id!r}", "invalid_request_error", "video_id", "not_found")
    return job
