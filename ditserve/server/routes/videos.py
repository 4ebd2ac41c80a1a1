"""/v1/videos: creating a video job, and listing, reading, downloading and deleting jobs in the job store."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ditserve.server.errors import ERROR_RESPONSES, ApiError
from ditserve.server.schemas import InvalidRequest, VideoRequest, parse_size, validated
from ditserve.server.state import Server, ServerState
from ditserve.server.uploads import check_image_upload

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
    parse_size(body.size)
    info = server.ready_info()
    server.check_model(info, body.model)
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
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise InvalidRequest(None, f"could not read the multipart body: {e}") from None
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        reference = form.get("input_reference")
        if reference is not None and not isinstance(reference, str):
            await check_image_upload(reference, "input_reference", server.settings.max_input_pixels)
        fields.pop("input_reference", None)
        return validated(VideoRequest, fields)
    try:
        data = await request.json()
    except Exception:  # noqa: BLE001
        raise InvalidRequest(None, "the body must be JSON (or multipart/form-data with input_reference)") from None
    return validated(VideoRequest, data)


def _find_job(server: ServerState, video_id: str):
    job = server.jobs.get(video_id)
    if job is None:
        raise ApiError(404, f"no video job {video_id!r}", "invalid_request_error", "video_id", "not_found")
    return job
