"""What the routes share: the settings, the scheduler and its worker, metrics, the job store, the url images, and
the one path by which a request reaches the scheduler and comes back (or fails, as one of errors.py's answers)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from ditserve.engine import messages as msg
from ditserve.engine.scheduler import Result, Scheduler, SchedulerConfig
from ditserve.server.errors import SCHEDULER_FAILURES, ApiError, ClientGone, failure_error
from ditserve.server.jobs import JobStore
from ditserve.server.metrics import ServerMetrics

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


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.scheduler = Scheduler(settings.engine_args, settings.scheduler)
        self.metrics = ServerMetrics()
        self.temp_output = settings.output_dir is None
        self.output_dir = Path(settings.output_dir or tempfile.mkdtemp(prefix="ditserve-out-")).resolve()
        self.image_dir = self.output_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobStore(self.output_dir / "videos")
        self.started = time.time()
        self._written: deque[tuple[float, Path]] = deque()  # url images, oldest first

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()  # every accepted request is answered first
        if self.temp_output:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    # ---- the served model ---------------------------------------------------------------------------------------
    def ready_info(self) -> msg.ModelInfo:
        if self.scheduler.state != "ready" or self.scheduler.info is None:
            raise ApiError(503, self.scheduler.describe_unavailable(), "server_error", None, "unavailable")
        return self.scheduler.info

    def served_name(self, info: msg.ModelInfo) -> str:
        """The model's id in the API: --served-model-name, else the folder's name (a full path would leak)."""
        return self.settings.served_model_name or Path(info.name.rstrip("/")).name or info.name

    def check_model(self, info: msg.ModelInfo, model: str | None) -> None:
        if model is not None and model not in (info.name, self.served_name(info), "default"):
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {self.served_name(info)!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    # ---- requests through the scheduler -------------------------------------------------------------------------
    async def submit(self, request: Request, endpoint: str, item: msg.WorkItem, key: tuple) -> Result:
        """Run one request; its outcome is counted under `endpoint`, a failure raised as its ApiError."""
        accepted = time.monotonic()
        try:
            result = await unless_disconnected(request, self.scheduler.submit(item, key))
        except SCHEDULER_FAILURES as e:
            outcome, error = failure_error(e)
            self.metrics.requests.labels(endpoint, outcome).inc()
            raise error from None
        self.metrics.observe_result(
            endpoint, time.monotonic() - accepted, result.queue_time_s, result.timings, result.peak_memory_mb
        )
        self.metrics.batch_size.observe(result.batch_size)
        return result

    async def control(self, request: Request, method: str, kwargs: dict) -> dict:
        """Run one LoRA operation, queued behind the requests accepted before it; a failure raised as its ApiError."""
        try:
            return await unless_disconnected(request, self.scheduler.control(method, kwargs))
        except SCHEDULER_FAILURES as e:
            raise failure_error(e)[1] from None

    # ---- url images ---------------------------------------------------------------------------------------------
    def keep_url_image(self, blob: bytes, ext: str) -> str:
        """Write an image for a `url` answer and return its file name; images older than the TTL are deleted."""
        now = time.monotonic()
        while self._written and now - self._written[0][0] > self.settings.url_ttl_s:
            with contextlib.suppress(OSError):
                self._written.popleft()[1].unlink()
        name = f"{uuid.uuid4().hex}.{ext}"  # 122 random bits: a url cannot be guessed
        (self.image_dir / name).write_bytes(blob)
        self._written.append((now, self.image_dir / name))
        return name


def server_state(request: Request) -> ServerState:
    return request.app.state.server


# A route's parameter of this type receives the app's ServerState.
Server = Annotated[ServerState, Depends(server_state)]


async def unless_disconnected(request: Request, coro):
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
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
