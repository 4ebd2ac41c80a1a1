"""The HTTP API: OpenAI-compatible routes over the scheduler. HTTP only: no model code runs in this process.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (naming the
field), 401 without the API key, 404 for an unknown id, 413 for a body over the limit, 429 when the queue is full
(with Retry-After), 500 when the model failed on a request, 503 while the model loads or after the worker died,
504 past the request timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import io
import re
import shutil
import tempfile
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.engine import messages as msg
from ditserve.engine.scheduler import QueueFull, RequestFailed, Scheduler, SchedulerConfig, Unavailable
from ditserve.server.jobs import JobStore
from ditserve.server.metrics import ServerMetrics
from ditserve.server.schemas import (
    ErrorResponse,
    ImageGenerationRequest,
    ImageOptions,
    ImagesResponse,
    InvalidRequest,
    MergeLoraRequest,
    SetLoraRequest,
    UnmergeLoraRequest,
    VideoRequest,
    parse_size,
    to_sampling_params,
)

_FILE_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")
_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_FAILURE_STATUS = {"timeout": 504, "worker_died": 503, "cancelled": 499, "out_of_memory": 500, "error": 500}
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings:
    engine_args: dict = field(default_factory=dict)  # EngineArgs fields as plain data (what `generate` takes)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    api_key: str | None = None  # Bearer token required on /v1/*; None = open
    output_dir: Path | None = None  # where `url` images and video content are kept; None = a temporary folder
    max_body_bytes: int = 16 * 2**20
    max_prompt_chars: int = 8192
    max_input_pixels: int = 4096 * 4096  # uploaded images larger than this are refused before decoding
    served_model_name: str | None = None  # the model id clients see and send; None = the model folder's name
    url_ttl_s: float = 3600.0  # url images are deleted after this long, so the folder cannot grow without bound
    lora_dir: Path | None = None  # the only folder POST /v1/set_lora may load from; None = loading LoRAs is off


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers: dict[str, str] = {}


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: refuse bodies over the limit (by Content-Length, and by counting a streamed body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a streamed body: FastAPI passes an HTTPException through as is
                    raise StarletteHTTPException(413, self._message())
            return message

        return await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes"

    async def _refuse(self, scope, receive, send):
        response = error_response(413, self._message(), "invalid_request_error", None, "body_too_large")
        await response(scope, receive, send)


class _BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>` when a key is set."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope.get("headers", [])).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(settings: ServerSettings) -> FastAPI:
    scheduler = Scheduler(settings.engine_args, settings.scheduler)
    metrics = ServerMetrics()
    temp_output = settings.output_dir is None
    output_dir = Path(settings.output_dir or tempfile.mkdtemp(prefix="ditserve-out-")).resolve()
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = JobStore(output_dir / "videos")
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.stop()  # every accepted request is answered first
            if temp_output:
                shutil.rmtree(output_dir, ignore_errors=True)

    app = FastAPI(title="ditserve", version=_version(), lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.jobs = scheduler, metrics, jobs

    # ---- errors, all in OpenAI's shape -----------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers or None)

    def count_invalid(request: Request) -> None:
        route = request.scope.get("route")
        path = getattr(route, "path", "")
        if path.startswith("/v1/") and request.method == "POST":  # known routes only: bounded label values
            metrics.requests.labels(path.removeprefix("/v1/"), "invalid").inc()

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, e: InvalidRequest):
        count_invalid(request)
        return error_response(
            e.status, f"{e.param}: {e.message}" if e.param else e.message, "invalid_request_error", e.param, e.code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        count_invalid(request)
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return error_response(
                400, f"the body is not valid JSON: {detail}", "invalid_request_error", None, "invalid_json"
            )
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header", "form")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None, code)

    # ---- shared request path ------------------------------------------------------------------------------------
    def ready_info() -> msg.ModelInfo:
        if scheduler.state != "ready" or scheduler.info is None:
            raise ApiError(503, scheduler.describe_unavailable(), "server_error", None, "unavailable")
        return scheduler.info

    def served_name(info: msg.ModelInfo) -> str:
        """The model's id in the API: --served-model-name, else the folder's name (a full path would leak)."""
        return settings.served_model_name or Path(info.name.rstrip("/")).name or info.name

    def check_model(info: msg.ModelInfo, model: str | None) -> None:
        if model is not None and model not in (info.name, served_name(info), "default"):
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {served_name(info)!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    async def run_request(request: Request, endpoint: str, item: msg.WorkItem, key: tuple):
        accepted = time.monotonic()
        try:
            result = await _unless_disconnected(request, scheduler.submit(item, key))
        except QueueFull as e:
            metrics.requests.labels(endpoint, "queue_full").inc()
            err = ApiError(429, f"{e}", "rate_limit_error", None, "queue_full")
            err.headers = {"Retry-After": str(e.retry_after)}
            raise err from None
        except Unavailable as e:
            metrics.requests.labels(endpoint, "unavailable").inc()
            raise ApiError(503, str(e), "server_error", None, "unavailable") from None
        except RequestFailed as e:
            metrics.requests.labels(endpoint, e.kind).inc()
            raise ApiError(_FAILURE_STATUS.get(e.kind, 500), str(e), "server_error", None, e.kind) from None
        except _ClientGone:
            metrics.requests.labels(endpoint, "client_disconnected").inc()
            raise ApiError(499, "the client disconnected", "invalid_request_error", None, "cancelled") from None
        metrics.observe_result(
            endpoint, time.monotonic() - accepted, result.queue_time_s, result.timings, result.peak_memory_mb
        )
        metrics.batch_size.observe(result.batch_size)
        return result

    written: deque[tuple[float, Path]] = deque()  # url images, oldest first

    def keep_url_image(blob: bytes, ext: str) -> str:
        now = time.monotonic()
        while written and now - written[0][0] > settings.url_ttl_s:
            with contextlib.suppress(OSError):
                written.popleft()[1].unlink()
        name = f"{uuid.uuid4().hex}.{ext}"  # 122 random bits: a url cannot be guessed
        (image_dir / name).write_bytes(blob)
        written.append((now, image_dir / name))
        return name

    def image_response(request: Request, body: ImageOptions, params, result) -> dict:
        data = []
        for blob in result.images:
            if body.response_format == "url":
                name = keep_url_image(blob, body.output_format)
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

    def resolved_key(info: msg.ModelInfo, params, output_format: str) -> tuple:
        """The batch key, with the model's defaults filled in so that default and explicit values match."""
        resolved = params.with_defaults(msg.params_from_dict(info.defaults))  # as Pipeline.resolve fills them
        return (*resolved.computation_key(), output_format)

    async def generate_images(request: Request, endpoint: str, body: ImageOptions) -> dict:
        info = ready_info()
        check_model(info, body.model)
        params = to_sampling_params(
            body, info.spatial_multiple, info.max_sequence_length_limit, settings.max_prompt_chars
        )
        params = params.replace(
            height=params.height or info.defaults["height"], width=params.width or info.defaults["width"]
        )
        item = msg.WorkItem(scheduler.new_request_id(), msg.params_to_dict(params), body.output_format)
        result = await run_request(request, endpoint, item, resolved_key(info, params, body.output_format))
        return image_response(request, body, params, result)

    # ---- routes ---------------------------------------------------------------------------------------------
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=errors)
    async def images_generations(request: Request, body: ImageGenerationRequest):
        return await generate_images(request, "images/generations", body)

    @app.post("/v1/images/edits", response_model=ImagesResponse, responses=errors)
    async def images_edits(
        request: Request,
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
        body = _validated(ImageOptions, fields)
        images = [*(image or []), *(image_list or [])]
        if not images:
            raise InvalidRequest("image", "at least one image is required (field 'image' or 'image[]')")
        for upload in images:
            await _decode_upload(upload, "image", settings.max_input_pixels)
        if mask is not None:
            await _decode_upload(mask, "mask", settings.max_input_pixels)
        info = ready_info()
        check_model(info, body.model)
        to_sampling_params(body, info.spatial_multiple, info.max_sequence_length_limit, settings.max_prompt_chars)
        # No pipeline edits images yet; one that does lists "image-edit" in its tasks and gets a route here.
        raise InvalidRequest(
            "model",
            f"model {served_name(info)!r} cannot edit images (it does: {', '.join(info.tasks)})",
            "unsupported_task",
        )

    async def video_request(request: Request) -> VideoRequest:
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
                await _decode_upload(reference, "input_reference", settings.max_input_pixels)
            fields.pop("input_reference", None)
            return _validated(VideoRequest, fields)
        try:
            data = await request.json()
        except Exception:  # noqa: BLE001
            raise InvalidRequest(None, "the body must be JSON (or multipart/form-data with input_reference)") from None
        return _validated(VideoRequest, data)

    @app.post(
        "/v1/videos",
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": VideoRequest.model_json_schema()}},
            }
        },
    )
    async def create_video(request: Request):
        body = await video_request(request)
        parse_size(body.size)
        info = ready_info()
        check_model(info, body.model)
        # No pipeline makes video yet; one that does lists "text-to-video" in its tasks, and its jobs run through
        # `jobs.run` with the scheduler's submit.
        raise InvalidRequest(
            "model",
            f"model {served_name(info)!r} does not generate video (it does: {', '.join(info.tasks)})",
            "unsupported_task",
        )

    @app.get("/v1/videos", responses=errors)
    async def list_videos(limit: int = 20, after: str | None = None):
        limit = max(1, min(100, limit))
        page = jobs.list(limit + 1, after)
        return {
            "object": "list",
            "data": [j.public() for j in page[:limit]],
            "has_more": len(page) > limit,
        }

    def find_job(video_id: str):
        job = jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video job {video_id!r}", "invalid_request_error", "video_id", "not_found")
        return job

    @app.get("/v1/videos/{video_id}", responses=errors)
    async def get_video(video_id: str):
        return find_job(video_id).public()

    @app.get("/v1/videos/{video_id}/content", responses=errors)
    async def get_video_content(video_id: str):
        job = find_job(video_id)
        if job.status != "completed":
            raise ApiError(
                400,
                f"video {video_id} is {job.status}, not completed",
                "invalid_request_error",
                "video_id",
                "not_ready",
            )
        return FileResponse(jobs.content_path(job), media_type=job.content_type)

    @app.delete("/v1/videos/{video_id}", responses=errors)
    async def delete_video(video_id: str):
        job = find_job(video_id)
        jobs.cancel(job)
        return {**job.public(), "deleted": True}

    @app.get("/files/images/{name}", name="get_file", responses=errors)
    async def get_file(name: str):
        # Only names this server made (32 hex digits and our extension): nothing else can be read.
        if not _FILE_NAME.match(name) or not (image_dir / name).is_file():
            raise ApiError(404, "no such file", "invalid_request_error", "name", "not_found")
        return FileResponse(image_dir / name, media_type=_MEDIA_TYPES[name.rsplit(".", 1)[1]])

    # ---- LoRA: queued behind accepted requests, so each request runs with one whole LoRA state ------------------
    def lora_file(path: str | None) -> str | None:
        """A path from the request, resolved inside --lora-dir; anything else is refused (nothing outside the
        configured folders is ever read on a client's word)."""
        if path is None:
            return None
        if settings.lora_dir is None:
            raise ApiError(
                400, "this server loads no LoRA files: start it with --lora-dir", "invalid_request_error", "lora_path"
            )
        root = Path(settings.lora_dir).resolve()
        resolved = None if "\x00" in path else (root / path).resolve()
        if resolved is None or not resolved.is_relative_to(root):
            raise ApiError(
                400, f"lora_path {path!r} is outside the server's LoRA folder", "invalid_request_error", "lora_path"
            )
        return str(resolved)

    async def lora_operation(request: Request, method: str, kwargs: dict) -> dict:
        try:
            return await _unless_disconnected(request, scheduler.control(method, kwargs))
        except QueueFull as e:
            err = ApiError(429, f"{e}", "rate_limit_error", None, "queue_full")
            err.headers = {"Retry-After": str(e.retry_after)}
            raise err from None
        except Unavailable as e:
            raise ApiError(503, str(e), "server_error", None, "unavailable") from None
        except RequestFailed as e:
            if e.kind == "invalid":
                raise ApiError(400, str(e), "invalid_request_error", e.param, "invalid_value") from None
            raise ApiError(_FAILURE_STATUS.get(e.kind, 500), str(e), "server_error", None, e.kind) from None
        except _ClientGone:
            raise ApiError(499, "the client disconnected", "invalid_request_error", None, "cancelled") from None

    @app.post("/v1/set_lora", responses=errors)
    async def set_lora(request: Request, body: SetLoraRequest):
        kwargs = body.model_dump()
        paths = kwargs["lora_path"]
        kwargs["lora_path"] = [lora_file(p) for p in paths] if isinstance(paths, list) else lora_file(paths)
        return await lora_operation(request, "set_lora", kwargs)

    @app.post("/v1/merge_lora_weights", responses=errors)
    async def merge_lora_weights(request: Request, body: MergeLoraRequest):
        return await lora_operation(request, "merge_lora_weights", body.model_dump())

    @app.post("/v1/unmerge_lora_weights", responses=errors)
    async def unmerge_lora_weights(request: Request, body: UnmergeLoraRequest):
        return await lora_operation(request, "unmerge_lora_weights", body.model_dump())

    @app.get("/v1/list_loras", responses=errors)
    async def list_loras(request: Request):
        return await lora_operation(request, "list_loras", {})

    @app.get("/v1/models", responses=errors)
    async def list_models():
        info = ready_info()
        return {
            "object": "list",
            "data": [{"id": served_name(info), "object": "model", "created": int(started), "owned_by": "ditserve"}],
        }

    @app.get("/health")
    async def health():
        up = scheduler.state == "ready"
        metrics.worker_up.set(1 if up else 0)
        body = {"status": "ok" if up else scheduler.state}
        if not up:
            body["message"] = scheduler.describe_unavailable()
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics_route():
        metrics.queue_length.set(len(scheduler.queue))
        metrics.running.set(len(scheduler.running))
        metrics.worker_up.set(1 if scheduler.state == "ready" else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/server_info")
    async def server_info():
        info = scheduler.info
        cfg = settings.scheduler
        return {
            "version": _version(),
            "state": scheduler.state,
            "model": None if info is None else dataclasses.asdict(info),
            "worker_pid": scheduler.worker_pid,
            "queue_length": len(scheduler.queue),
            "running": len(scheduler.running),
            "completed": scheduler.completed,
            "max_queue": cfg.max_queue,
            "max_batch_size": cfg.max_batch_size,
            "request_timeout": cfg.request_timeout,
            "auth": settings.api_key is not None,
            "max_body_bytes": settings.max_body_bytes,
            "uptime_s": round(time.time() - started, 1),
        }

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(_BearerAuth, api_key=settings.api_key)
    return app


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, coro):
    """Await coro, cancelling it (and so the request in the scheduler) if the client goes away meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise _ClientGone
    finally:
        if not task.done():
            task.cancel()


def _validated(model: type, fields: dict):
    from pydantic import ValidationError

    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        raise InvalidRequest(param, first.get("msg", "invalid value")) from None


async def _decode_upload(upload: UploadFile, param: str, max_pixels: int) -> None:
    """Check that an uploaded file is an image we can decode, without decoding a decompression bomb."""
    from PIL import Image, UnidentifiedImageError

    data = await upload.read()
    if not data:
        raise InvalidRequest(param, "the uploaded file is empty")

    def check() -> None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise InvalidRequest(param, f"is {img.width}x{img.height}; the limit is {max_pixels} pixels")
                img.load()
        except InvalidRequest:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise InvalidRequest(param, f"could not be decoded as an image (png, jpeg or webp): {e}") from None

    await asyncio.to_thread(check)


def _version() -> str:
    from ditserve import __version__

    return __version__
