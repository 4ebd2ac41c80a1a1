"""What the routes share: the settings, the scheduler and its worker, metrics, the job store, the url images, and
the one path by which a request reaches the scheduler and comes back (or fails, as one of errors.py's answers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from ditserve.config import SamplingParams
from ditserve.engine import messages as msg
from ditserve.engine.scheduler import Result, Scheduler, SchedulerConfig
from ditserve.server.admission import OverLimit, RequestLimits, admit, resolve_limits
from ditserve.server.errors import SCHEDULER_FAILURES, ApiError, ClientGone, failure_error
from ditserve.server.jobs import JobStore, StoreLimits
from ditserve.server.metrics import ServerMetrics

DISCONNECT_POLL_S = 0.25
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# An absolute path in a message from the worker (an exception's text): only its last part is shown.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:/[\w.+@~-]+)+/([\w.+@~-]+)")


@dataclass
class ServerSettings:
    engine_args: dict = field(default_factory=dict)  # EngineArgs fields as plain data (what `generate` takes)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    api_key: str | None = None  # Bearer token required on /v1/*; None = open
    admin_key: str | None = None  # X-Admin-Key of the operator routes (profiling); None = those routes are off
    output_dir: Path | None = None  # where `url` images and video content are kept; None = a temporary folder
    max_body_bytes: int = 16 * 2**20
    max_prompt_chars: int = 8192
    max_input_pixels: int = 4096 * 4096  # uploaded images larger than this are refused before decoding
    served_model_name: str | None = None  # the model id clients see and send; None = the model folder's name
    url_ttl_s: float = 3600.0  # url images are deleted after this long, so the folder cannot grow without bound
    lora_dir: Path | None = None  # the only folder POST /v1/set_lora may load from; None = loading LoRAs is off
    # Host header values answered (without the port; "*" = any): a name the server does not know is refused, so a
    # page elsewhere cannot reach a loopback server by rebinding its own name to 127.0.0.1.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    public_url: str | None = None  # base of `url` answers (e.g. https://images.example.com); None = relative urls
    docs: bool = True  # serve /docs, /redoc and /openapi.json (behind the API key when there is one)
    limits: RequestLimits = field(default_factory=RequestLimits)  # admission by cost (server/admission.py)
    video_store: StoreLimits = field(default_factory=StoreLimits)  # how many finished videos are kept, how long
    video_timeout: float = 3600.0  # seconds a video job may take from admission (its client is not waiting on it)


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(
            settings.engine_args,
            settings.scheduler,
            on_restart=lambda reason: self.metrics.restarts.labels(reason).inc(),
        )
        self.temp_output = settings.output_dir is None
        self.output_dir = Path(settings.output_dir or tempfile.mkdtemp(prefix="ditserve-out-")).resolve()
        self.image_dir = self.output_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.profile_dir = self.output_dir / "profiles"  # traces of POST /start_profile windows
        self.jobs = JobStore(
            self.output_dir / "videos",
            settings.video_store,
            on_finish=lambda status: self.metrics.video_jobs.labels(status).inc(),
        )
        self.started = time.time()
        self._written: deque[tuple[float, Path]] = deque()  # url images, oldest first

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()  # every accepted request is answered first
        self.jobs.close()  # the jobs live in this process: their files go with them
        if self.temp_output:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    # ---- what a client may see -----------------------------------------------------------------------------------
    def _private_prefixes(self) -> list[tuple[str, str]]:
        """(prefix, what a client sees instead), longest first: the folders of this machine a message may name."""
        prefixes = []
        if self.settings.lora_dir is not None:
            prefixes.append((str(Path(self.settings.lora_dir).resolve()) + os.sep, ""))
        model = self.settings.engine_args.get("model")
        if model and os.path.isdir(model):
            prefixes.append((str(Path(model).resolve()), Path(model).resolve().name))
        startup = self.settings.engine_args.get("_startup_lora") or {}
        for path in startup.get("lora_path") or []:
            prefixes.append((str(Path(path).expanduser().resolve().parent) + os.sep, ""))
        prefixes.append((str(self.output_dir) + os.sep, ""))
        return sorted(prefixes, key=lambda p: -len(p[0]))

    def redact(self, text: str) -> str:
        """A message from the worker as a client may read it: paths inside --lora-dir relative to it, the model
        folder by its name, any other absolute path by its last part."""
        for prefix, replacement in self._private_prefixes():
            text = text.replace(prefix, replacement)
        return _ABSOLUTE_PATH.sub(r"\1", text)

    def public_path(self, path: str) -> str:
        """A LoRA file as list_loras shows it: relative to --lora-dir when inside it, else only its name."""
        resolved = Path(path).expanduser().resolve()
        if self.settings.lora_dir is not None:
            root = Path(self.settings.lora_dir).resolve()
            if resolved.is_relative_to(root):
                return str(resolved.relative_to(root))
        return resolved.name

    def file_url(self, name: str) -> str:
        """Where a client downloads a url image: under --public-url, else relative to this server (never built
        from the request's Host header, which the client chooses)."""
        base = (self.settings.public_url or "").rstrip("/")
        return f"{base}/files/images/{name}"

    # ---- the served model ---------------------------------------------------------------------------------------
    def ready_info(self) -> msg.ModelInfo:
        scheduler = self.scheduler
        if not scheduler.accepting:  # while a worker is replaced requests queue, checked against the last one's info
            self.metrics.refusals.labels("unavailable").inc()
            e = scheduler.unavailable()
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
            raise ApiError(503, self.redact(str(e)), "server_error", None, "unavailable", headers)
        return scheduler.info  # type: ignore[return-value]

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

    def limits(self, info: msg.ModelInfo, timeout: float | None = None) -> RequestLimits:
        """The request limits in force: the flags given, the device's defaults for the others (the estimate's
        limit defaults to `timeout`, by default the request timeout)."""
        timeout = self.settings.scheduler.request_timeout if timeout is None else timeout
        return resolve_limits(self.settings.limits, info.device, timeout)

    def admit(
        self,
        info: msg.ModelInfo,
        params: SamplingParams,
        size_param: str = "size",
        frames_param: str = "num_frames",
        timeout: float | None = None,
    ) -> float | None:
        """Refuse a request over a limit (400 naming the field, counted by reason); its estimated seconds."""
        limits = self.limits(info, timeout)
        try:
            return admit(params, info.defaults, limits, self.scheduler.cost, size_param, frames_param)
        except OverLimit as e:
            self.metrics.refusals.labels(e.reason).inc()
            raise

    # ---- requests through the scheduler -------------------------------------------------------------------------
    async def submit(
        self, request: Request, endpoint: str, item: msg.WorkItem, key: tuple, estimate_s: float | None = None
    ) -> Result:
        """Run one request; its outcome is counted under `endpoint`, a failure raised as its ApiError."""
        accepted = time.monotonic()
        try:
            result = await unless_disconnected(request, self.scheduler.submit(item, key, estimate_s=estimate_s))
        except SCHEDULER_FAILURES as e:
            raise self.failure(endpoint, e) from None
        self.succeeded(endpoint, accepted, result)
        return result

    def failure(self, endpoint: str, e: Exception) -> ApiError:
        """A request that did not complete (one of SCHEDULER_FAILURES), counted under `endpoint`, as its ApiError."""
        outcome, error = failure_error(e)
        self.metrics.requests.labels(endpoint, outcome).inc()
        if outcome in ("queue_full", "unavailable"):
            self.metrics.refusals.labels(outcome).inc()
        error.message = self.redact(error.message)
        return error

    def succeeded(self, endpoint: str, accepted: float, result: Result) -> None:
        """Count a completed request (accepted: time.monotonic() at its admission)."""
        self.metrics.observe_result(
            endpoint, time.monotonic() - accepted, result.queue_time_s, result.timings, result.peak_memory_mb
        )
        self.metrics.batch_size.observe(result.batch_size)

    async def control(self, request: Request, method: str, kwargs: dict) -> dict:
        """Run one operation (LoRA, profiling), queued behind the requests accepted before it; a failure raised as
        its ApiError."""
        try:
            return await unless_disconnected(request, self.scheduler.control(method, kwargs))
        except SCHEDULER_FAILURES as e:
            error = failure_error(e)[1]
            error.message = self.redact(error.message)
            raise error from None

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
