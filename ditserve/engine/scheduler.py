"""The server side of the request lifecycle: a bounded FIFO queue, batching, timeouts, cancellation, and the
connection to the worker process that runs the model.

It lives in the HTTP process's event loop and never touches a tensor. Admission is decided here: a full queue
raises `QueueFull` (the server answers 429), a worker that is loading, dead or shutting down raises `Unavailable`
(503). When the worker is idle, the request at the head of the queue goes out together with the later waiting
requests that have the same batch key (same shape and settings), up to `max_batch_size`. The worker is sent one
batch at a time, so requests wait here, where they can still be batched, cancelled or timed out.

A worker that dies is noticed within `MONITOR_S`: every queued and running request fails at once, and the state
turns to "dead" (the server's /health answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ditserve.engine import messages as msg

MONITOR_S = 0.2  # how often the worker's liveness is checked


@dataclass
class SchedulerConfig:
    max_queue: int = 256  # requests waiting (not counting the running batch); more → QueueFull
    max_batch_size: int = 8  # images (summed over compatible requests) run together in one batched forward
    request_timeout: float = 600.0  # seconds from admission to answer, queue time included
    load_timeout: float = 3600.0  # seconds the worker may take to load the model


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The worker cannot take requests now (loading, failed to load, died, or the server is stopping)."""


class RequestFailed(Exception):
    """The request was admitted but did not complete. `kind`: error, out_of_memory, timeout, cancelled, worker_died."""

    def __init__(self, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.param = param  # for kind "invalid": the request field at fault


@dataclass
class Result:
    images: list[bytes]  # encoded in the request's output format
    seed: int
    timings: dict
    peak_memory_mb: float | None
    queue_time_s: float
    inference_time_s: float
    batch_size: int


@dataclass
class _Pending:
    item: msg.WorkItem
    key: tuple
    future: asyncio.Future
    accepted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    batch_size: int = 1
    progress: float = 0.0
    on_progress: Callable[[float], None] | None = None
    control: dict | None = None  # a LoRA operation {"method", "kwargs"} instead of an image request


def _images(pending: _Pending) -> int:
    prompt = pending.item.params.get("prompt")
    prompts = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
    return prompts * int(pending.item.params.get("num_images") or 1)


class Scheduler:
    def __init__(self, engine_args: dict, config: SchedulerConfig | None = None):
        self.engine_args = engine_args
        self.config = config or SchedulerConfig()
        self.state = "starting"  # starting → loading → ready → stopping → stopped; or failed / dead
        self.error: str | None = None  # why the state is failed or dead
        self.info: msg.ModelInfo | None = None
        self.queue: deque[_Pending] = deque()
        self.running: dict[str, _Pending] = {}  # request id → pending, for the batch the worker runs now
        self._batch_id: str | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._recent_batch_s: deque[float] = deque(maxlen=16)
        self.completed = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the worker and return at once; the model loads in the background (state "loading")."""
        import zmq
        import zmq.asyncio

        from ditserve.engine.worker import worker_main

        # A Unix socket in a private directory: nothing off this machine, and no other user, can reach the worker.
        self._dir = tempfile.mkdtemp(prefix="ditserve-")
        os.chmod(self._dir, 0o700)
        address = f"ipc://{self._dir}/worker.sock"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PAIR)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        # Not a daemon: the engine may start processes of its own (one per extra GPU rank), which daemons cannot.
        # A worker whose server is gone exits by itself (it watches its parent).
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=worker_main, args=(json.dumps(self.engine_args), address), name="ditserve-worker"
        )
        self.process.start()
        self.state = "loading"
        self._loading_since = time.monotonic()
        self._idle.set()
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="ditserve-receive"),
            asyncio.create_task(self._monitor_loop(), name="ditserve-monitor"),
            asyncio.create_task(self._dispatch_loop(), name="ditserve-dispatch"),
        ]

    async def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.load_timeout)
        while self.state in ("starting", "loading"):
            if time.monotonic() > deadline:
                raise Unavailable("the model did not load in time")
            await asyncio.sleep(0.05)
        if self.state != "ready":
            raise Unavailable(self.describe_unavailable())

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Take no new requests, answer every accepted one (queued and running), then stop the worker."""
        if self.state in ("ready", "loading", "starting"):
            self.state = "stopping"
        deadline = time.monotonic() + (drain_timeout if drain_timeout is not None else self.config.request_timeout)
        while (self.queue or self.running) and self.process.is_alive() and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.05)
        self._fail_all("worker_died" if not self.process.is_alive() else "cancelled", "the server is shutting down")
        if self.process.is_alive():
            self._send_nowait(msg.encode({"type": "shutdown"}))
        await asyncio.to_thread(self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._sock.close(0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self.state == "stopping":
            self.state = "stopped"

    def describe_unavailable(self) -> str:
        if self.state in ("starting", "loading"):
            return "the model is still loading; retry shortly"
        if self.state == "failed":
            return f"the model failed to load: {self.error}"
        if self.state == "dead":
            return f"the worker process died ({self.error}); restart the server"
        return "the server is shutting down"

    @property
    def worker_pid(self) -> int | None:
        return self.process.pid if getattr(self, "process", None) else None

    # ---- requests -----------------------------------------------------------------------------------------------
    async def submit(
        self, item: msg.WorkItem, key: tuple, on_progress: Callable[[float], None] | None = None
    ) -> Result:
        """Queue one request and wait for its result. Cancelling the awaiting task cancels the request."""
        if self.state != "ready":
            raise Unavailable(self.describe_unavailable())
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull(self.retry_after())
        pending = _Pending(item, key, asyncio.get_running_loop().create_future(), on_progress=on_progress)
        self.queue.append(pending)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), self.config.request_timeout)
        except TimeoutError:
            self.cancel(item.request_id)
            raise RequestFailed(
                "timeout", f"the request took longer than the server's limit of {self.config.request_timeout:g} s"
            ) from None
        except asyncio.CancelledError:
            self.cancel(item.request_id)
            raise

    async def control(self, method: str, kwargs: dict) -> dict:
        """Queue a LoRA operation behind the requests already accepted, and wait for the worker's answer."""
        if self.state != "ready":
            raise Unavailable(self.describe_unavailable())
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull(self.retry_after())
        request_id = self.new_request_id()
        item = msg.WorkItem(request_id=request_id, params={}, task="lora")
        future = asyncio.get_running_loop().create_future()
        # A key of its own: an operation never joins a batch.
        pending = _Pending(item, ("control", request_id), future, control={"method": method, "kwargs": kwargs})
        self.queue.append(pending)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.config.request_timeout)
        except TimeoutError:
            raise RequestFailed(
                "timeout", f"the operation took longer than the server's limit of {self.config.request_timeout:g} s"
            ) from None

    def cancel(self, request_id: str) -> bool:
        """Drop a queued request, or ask the worker to stop a running one. True if there was one to cancel."""
        for pending in self.queue:
            if pending.item.request_id == request_id:
                self.queue.remove(pending)
                if not pending.future.done():
                    pending.future.set_exception(RequestFailed("cancelled", "the request was cancelled"))
                    pending.future.exception()  # mark retrieved: nobody may be awaiting it any more
                return True
        if request_id in self.running:
            self._send_nowait(msg.encode({"type": "cancel", "request_ids": [request_id]}))
            return True
        return False

    def _send_nowait(self, frames: list[bytes]) -> bool:
        """Send without ever blocking: a PAIR socket whose worker is gone would otherwise wait forever."""
        import zmq

        try:
            sent = self._sock.send_multipart(frames, flags=zmq.NOBLOCK)  # a Future, already settled with NOBLOCK
        except zmq.ZMQError:
            return False
        if not sent.done():
            sent.cancel()
            return False
        return sent.exception() is None

    def retry_after(self) -> int:
        per_batch = sum(self._recent_batch_s) / len(self._recent_batch_s) if self._recent_batch_s else 1.0
        batches = 1 + len(self.queue) // max(1, self.config.max_batch_size)
        return max(1, min(600, round(per_batch * batches)))

    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    # ---- background loops -----------------------------------------------------------------------------------
    def _next_batch(self) -> list[_Pending]:
        """The head of the queue plus later requests with its key, while the batch holds at most max_batch_size
        images (a request of n images counts n; the head always goes, even if it alone is larger)."""
        head = self.queue.popleft()
        batch = [head]
        limit = self.config.max_batch_size if self.info and self.info.supports_batching else 1
        total = _images(head)
        for pending in list(self.queue):
            if total >= limit:
                break
            if pending.key == head.key and pending.item.task == head.item.task and total + _images(pending) <= limit:
                self.queue.remove(pending)
                batch.append(pending)
                total += _images(pending)
        return batch

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.state not in ("ready", "stopping") or not self.queue or not self._idle.is_set():
                continue
            batch = self._next_batch()
            now = time.monotonic()
            self._batch_id = uuid.uuid4().hex
            self._batch_started = now
            for pending in batch:
                pending.started_at = now
                pending.batch_size = len(batch)
                self.running[pending.item.request_id] = pending
            self._idle.clear()
            if batch[0].control is not None:
                frames = msg.encode(
                    {
                        "type": "lora",
                        "batch_id": self._batch_id,
                        "request_id": batch[0].item.request_id,
                        **batch[0].control,
                    }
                )
            else:
                frames = msg.run_message(self._batch_id, [p.item for p in batch])
            if not self._send_nowait(frames):
                self._fail_all("worker_died", "the worker process is not reachable")

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                message, blobs = msg.decode(frames)
                self._handle(message, blobs)
            except Exception as e:  # noqa: BLE001 - a bug, not user input: this loop must live, or every request hangs
                print(f"ditserve: ignoring a worker message that failed to process: {e!r}", flush=True)

    def _handle(self, message: dict, blobs: list[bytes]) -> None:
        kind = message["type"]
        if kind == "ready":
            self.info = msg.info_from(message)
            if self.state == "loading":
                self.state = "ready"
            self._wakeup.set()
        elif kind == "load_failed":
            self.state, self.error = "failed", message.get("message", "unknown error")
        elif kind == "progress":
            for rid in message["request_ids"]:
                pending = self.running.get(rid)
                if pending is not None:
                    pending.progress = message["step"] / max(1, message["steps"])
                    if pending.on_progress is not None:
                        pending.on_progress(pending.progress)
        elif kind == "result":
            pending = self.running.pop(message["request_id"], None)
            if pending is not None and not pending.future.done():
                self.completed += 1
                now = time.monotonic()
                pending.future.set_result(
                    Result(
                        images=blobs[: message["num_images"]],
                        seed=message["seed"],
                        timings=message.get("timings", {}),
                        peak_memory_mb=message.get("peak_memory_mb"),
                        queue_time_s=(pending.started_at or now) - pending.accepted_at,
                        inference_time_s=now - (pending.started_at or now),
                        batch_size=pending.batch_size,
                    )
                )
        elif kind == "lora_result":
            pending = self.running.pop(message["request_id"], None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(message["result"])
        elif kind == "error":
            pending = self.running.pop(message["request_id"], None)
            if pending is not None and not pending.future.done():
                failure = RequestFailed(message.get("kind", "error"), message["message"], message.get("param"))
                pending.future.set_exception(failure)
                pending.future.exception()
        elif kind == "batch_done" and message["batch_id"] == self._batch_id:
            self._recent_batch_s.append(time.monotonic() - self._batch_started)
            # Anything the worker did not answer (it always should) fails rather than hangs.
            for pending in self.running.values():
                if not pending.future.done():
                    pending.future.set_exception(RequestFailed("error", "the worker returned no result"))
                    pending.future.exception()
            self.running.clear()
            self._batch_id = None
            self._idle.set()
            self._wakeup.set()

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_S)
            if self.state == "loading" and time.monotonic() - self._loading_since > self.config.load_timeout:
                self.state, self.error = "failed", f"loading took longer than {self.config.load_timeout:g} s"
                self.process.kill()
            if not self.process.is_alive() and self.state not in ("stopped", "failed"):
                code = self.process.exitcode
                if self.state != "stopping" or self.queue or self.running:
                    self.state = "dead"
                    self.error = f"exit code {code}"
                self._fail_all("worker_died", f"the worker process died (exit code {code}); the request was lost")
                return

    def _fail_all(self, kind: str, message: str) -> None:
        pending_all = list(self.queue) + list(self.running.values())
        self.queue.clear()
        self.running.clear()
        for pending in pending_all:
            if not pending.future.done():
                pending.future.set_exception(RequestFailed(kind, message))
                pending.future.exception()
