"""The server side of the request lifecycle: a bounded FIFO queue, batching, timeouts, cancellation, and the
connection to the worker process that runs the model.

It lives in the HTTP process's event loop and never touches a tensor. Admission is decided here: a full queue
raises `QueueFull` (the server answers 429), a worker that is loading, dead or shutting down raises `Unavailable`
(503). When the worker is idle, the request at the head of the queue goes out together with the later waiting
requests that have the same batch key (same shape and settings), up to `max_batch_size`. The worker is sent one
batch at a time, so requests wait here, where they can still be batched, cancelled or timed out.

The scheduler is also the worker's supervisor. Deadlines hold: a request past its deadline is cancelled, which the
worker reads between denoising steps; a step that does not end (one huge step, a hung kernel) is no reason to keep
the only worker: once every request of the running batch is cancelled and the worker has not finished within
`cancel_grace` seconds, the worker is killed and a fresh one started. A worker that dies is noticed within
`MONITOR_S` and replaced the same way. The requests it was running fail with `worker_died` (503 and Retry-After);
queued requests wait in the queue through the restart and then run. LoRA changes made since the start are replayed
on the fresh worker. More than `max_restarts` restarts within `restart_window` seconds turn the state to "dead":
every request then fails at once, and the server must be restarted.

States: starting → loading → ready ⇄ restarting; → stopping → stopped; or failed (the model did not load) or dead
(the restart budget is spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ditserve.engine import messages as msg
from ditserve.engine.cost import CostModel, request_shape
from ditserve.engine.worker import REPLAY_LORA_KEY, worker_main

MONITOR_S = 0.2  # how often the worker's liveness and the running batch's deadlines are checked
STALL_FLOOR_S = 30.0  # a batch without progress for this long (or twice its estimate, if longer) is "stalled"
RELOAD_GUESS_S = 30  # Retry-After while the model loads, before one load has been timed
ACCEPTING = ("ready", "restarting")  # states in which requests are queued


@dataclass
class SchedulerConfig:
    max_queue: int = 256  # requests waiting (not counting the running batch); more → QueueFull
    max_batch_size: int = 8  # images (summed over compatible requests) run together in one batched forward
    request_timeout: float = 600.0  # seconds from admission to answer, queue time included
    load_timeout: float = 3600.0  # seconds the worker may take to load the model
    cancel_grace: float = 3.0  # seconds a cancelled batch may run on before its worker is killed and replaced
    max_restarts: int = 5  # worker restarts allowed within restart_window; one more and the state is "dead"
    restart_window: float = 3600.0


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The worker cannot take requests now (loading, failed to load, dead, or the server is stopping)."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds until it may work again, when that is known


class RequestFailed(Exception):
    """The request was admitted but did not complete. `kind`: error, out_of_memory, timeout, cancelled, worker_died."""

    def __init__(self, kind: str, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.param = param  # for kind "invalid": the request field at fault
        self.retry_after = retry_after  # for worker_died: about when a fresh worker takes requests


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
    estimate_s: float | None = None  # the server's estimate of its run time (for telling a stalled batch)
    cancelled_at: float | None = None  # when it was cancelled while running (past its deadline, client gone)


class _WorkerProcess:
    """One worker process and the socket to it. Each worker gets a socket of its own, so nothing sent to or by a
    replaced worker can reach its successor."""

    def __init__(self, ctx, directory: str, generation: int, engine_args: dict):
        import zmq

        self.generation = generation
        self.address = f"ipc://{directory}/worker-{generation}.sock"
        self.sock = ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        # Not a daemon: the engine may start processes of its own (one per extra GPU rank), which daemons cannot.
        # A worker whose server is gone exits by itself (it watches its parent); the worker makes itself a process
        # group, so that killing the group ends its rank processes with it.
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=worker_main, args=(json.dumps(engine_args), self.address), name="ditserve-worker"
        )
        self.process.start()
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL to the worker's process group (its rank processes too), or to the worker alone before it made
        the group."""
        try:
            if os.getpgid(self.process.pid) == self.process.pid:
                os.killpg(self.process.pid, signal.SIGKILL)
                return
        except (ProcessLookupError, PermissionError, TypeError):
            pass
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def close(self) -> None:
        self.sock.close(0)


def _images(pending: _Pending) -> int:
    prompt = pending.item.params.get("prompt")
    prompts = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
    return prompts * int(pending.item.params.get("num_images") or 1)


class Scheduler:
    def __init__(
        self,
        engine_args: dict,
        config: SchedulerConfig | None = None,
        on_restart: Callable[[str], None] | None = None,
    ):
        self.engine_args = engine_args
        self.config = config or SchedulerConfig()
        self.on_restart = on_restart  # called with the reason ("deadline" or "died") of each restart
        self.state = "starting"  # see the module docstring
        self.error: str | None = None  # why the state is failed or dead, or why the worker is restarting
        self.info: msg.ModelInfo | None = None
        self.cost: CostModel | None = None  # what requests cost on the worker's device (from its ready message)
        self.worker: _WorkerProcess | None = None
        self.restarts: list[tuple[float, str]] = []  # (monotonic time, reason) of the restarts within the window
        self.total_restarts = 0
        self.load_seconds: float | None = None  # how long the last load took, for Retry-After
        self._lora_log: list[dict] = []  # LoRA changes that succeeded, in order: replayed on a fresh worker
        self._last_progress = 0.0
        self._batch: list[_Pending] = []  # the running batch, until its first result corrects the cost model
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
        import zmq.asyncio

        # Unix sockets in a private directory: nothing off this machine, and no other user, can reach the worker.
        self._dir = tempfile.mkdtemp(prefix="ditserve-")
        os.chmod(self._dir, 0o700)
        self._ctx = zmq.asyncio.Context()
        self.state = "loading"
        self._spawn()
        self._idle.set()
        self._tasks = [
            asyncio.create_task(self._monitor_loop(), name="ditserve-monitor"),
            asyncio.create_task(self._dispatch_loop(), name="ditserve-dispatch"),
        ]

    def _spawn(self) -> None:
        args = dict(self.engine_args)
        if self._lora_log:
            args[REPLAY_LORA_KEY] = list(self._lora_log)
        generation = self.worker.generation + 1 if self.worker is not None else 0
        self.worker = _WorkerProcess(self._ctx, self._dir, generation, args)
        self._loading_since = time.monotonic()
        self._receiver = asyncio.create_task(self._receive_loop(self.worker), name="ditserve-receive")

    @property
    def process(self):
        """The current worker's process."""
        return self.worker.process if self.worker is not None else None

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
        if self.state in ("ready", "loading", "starting", "restarting"):
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
            self.worker.kill()
            await asyncio.to_thread(self.process.join, 5)
        for task in [*self._tasks, self._receiver]:
            task.cancel()
        for task in [*self._tasks, self._receiver]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.worker.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self.state == "stopping":
            self.state = "stopped"

    def describe_unavailable(self) -> str:
        if self.state in ("starting", "loading"):
            return "the model is still loading; retry shortly"
        if self.state == "restarting":
            return f"the worker is being replaced ({self.error}); queued requests run once it has loaded"
        if self.state == "failed":
            return f"the model failed to load: {self.error}"
        if self.state == "dead":
            return f"the worker is gone ({self.error}); restart the server"
        return "the server is shutting down"

    def unavailable(self) -> Unavailable:
        retry = self.reload_retry_after() if self.state in ("starting", "loading", "restarting") else None
        return Unavailable(self.describe_unavailable(), retry)

    def reload_retry_after(self) -> int:
        """Seconds a fresh worker takes to load, as last measured."""
        return max(1, round(self.load_seconds)) if self.load_seconds is not None else RELOAD_GUESS_S

    @property
    def accepting(self) -> bool:
        """Requests are queued (while a worker is replaced too: they run once it has loaded)."""
        return self.state in ACCEPTING and self.info is not None

    def health(self) -> tuple[str, str | None]:
        """(status, what it means) for /health: ok, busy, stalled, restarting, loading, failed, dead, stopping."""
        if self.state == "ready":
            stalled = self._stalled()
            if stalled is not None:
                return "stalled", stalled
            return ("busy", None) if self.running or self.queue else ("ok", None)
        return self.state, self.describe_unavailable()

    def _stalled(self) -> str | None:
        if not self.running:
            return None
        now = time.monotonic()
        running = list(self.running.values())
        if all(p.cancelled_at is not None for p in running):
            since = now - max(p.cancelled_at for p in running)  # type: ignore[type-var]
            return (
                f"the running batch was cancelled {since:.0f} s ago and its worker has not stopped; it is replaced "
                f"after {self.config.cancel_grace:g} s"
            )
        estimate = max((p.estimate_s or 0.0) for p in running)
        quiet = now - self._last_progress
        if quiet > max(STALL_FLOOR_S, 2 * estimate):
            return f"the running batch has made no progress for {quiet:.0f} s"
        return None

    @property
    def worker_pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    # ---- requests -----------------------------------------------------------------------------------------------
    async def submit(
        self,
        item: msg.WorkItem,
        key: tuple,
        on_progress: Callable[[float], None] | None = None,
        estimate_s: float | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Queue one request and wait for its result. Cancelling the awaiting task cancels the request."""
        return await self.result(self.enqueue(item, key, on_progress, estimate_s), timeout)

    def enqueue(
        self,
        item: msg.WorkItem,
        key: tuple,
        on_progress: Callable[[float], None] | None = None,
        estimate_s: float | None = None,
    ) -> _Pending:
        """Queue one request at once (QueueFull or Unavailable if it cannot be); `result` waits for it.
        `on_progress(fraction)` is called when the worker takes it (0.0) and after each of its denoising steps."""
        if not self.accepting:
            raise self.unavailable()
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        pending = _Pending(item, key, loop.create_future(), on_progress=on_progress, estimate_s=estimate_s)
        self.queue.append(pending)
        self._wakeup.set()
        return pending

    async def result(self, pending: _Pending, timeout: float | None = None) -> Result:
        """Wait for a queued request's result, at most `timeout` seconds from its admission (default: the request
        timeout). Cancelling the awaiting task cancels the request."""
        limit = self.config.request_timeout if timeout is None else timeout
        left = max(0.0, limit - (time.monotonic() - pending.accepted_at))
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), left)
        except TimeoutError:
            self.cancel(pending.item.request_id)
            raise RequestFailed("timeout", f"the request took longer than the server's limit of {limit:g} s") from None
        except asyncio.CancelledError:
            self.cancel(pending.item.request_id)
            raise

    async def control(self, method: str, kwargs: dict) -> dict:
        """Queue a LoRA operation behind the requests already accepted, and wait for the worker's answer."""
        if not self.accepting:
            raise self.unavailable()
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
        pending = self.running.get(request_id)
        if pending is not None:
            # The worker stops between steps; if it does not within cancel_grace, the monitor replaces it.
            if pending.cancelled_at is None:
                pending.cancelled_at = time.monotonic()
            self._send_nowait(msg.encode({"type": "cancel", "request_ids": [request_id]}))
            return True
        return False

    def _send_nowait(self, frames: list[bytes]) -> bool:
        """Send without ever blocking: a PAIR socket whose worker is gone would otherwise wait forever."""
        import zmq

        if self.worker is None:
            return False
        try:
            sent = self.worker.sock.send_multipart(frames, flags=zmq.NOBLOCK)  # a Future, already settled with NOBLOCK
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
            self._batch_started = self._last_progress = now
            self._batch = batch if batch[0].control is None else []
            for pending in batch:
                pending.started_at = now
                pending.batch_size = len(batch)
                self.running[pending.item.request_id] = pending
                if pending.on_progress is not None:
                    pending.on_progress(0.0)
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
                # The monitor sees the dead worker within MONITOR_S: the batch fails with it, the queue waits.
                print("ditserve: could not send a batch to the worker", flush=True)

    async def _receive_loop(self, worker: _WorkerProcess) -> None:
        while True:
            frames = await worker.sock.recv_multipart()
            try:
                message, blobs = msg.decode(frames)
                self._handle(message, blobs)
            except Exception as e:  # noqa: BLE001 - a bug, not user input: this loop must live, or every request hangs
                print(f"ditserve: ignoring a worker message that failed to process: {e!r}", flush=True)

    def _handle(self, message: dict, blobs: list[bytes]) -> None:
        kind = message["type"]
        if kind == "ready":
            self.info = msg.info_from(message)
            self.cost = CostModel.from_dict(self.info.cost) if self.info.cost else None
            self.load_seconds = time.monotonic() - self._loading_since
            for note in message.get("notes", []):
                print(f"ditserve: {note}", flush=True)
            if self.state in ("loading", "restarting"):
                self.state, self.error = "ready", None
            self._wakeup.set()
        elif kind == "load_failed":
            self.state, self.error = "failed", message.get("message", "unknown error")
            self._fail_all("worker_died", f"the worker could not load the model: {self.error}")
        elif kind == "progress":
            self._last_progress = time.monotonic()
            for rid in message["request_ids"]:
                pending = self.running.get(rid)
                if pending is not None:
                    pending.progress = message["step"] / max(1, message["steps"])
                    if pending.on_progress is not None:
                        pending.on_progress(pending.progress)
        elif kind == "result":
            self._observe(message.get("timings"))
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
            changes_lora = (
                pending is not None
                and pending.control is not None
                and pending.control["method"]
                in (
                    "set_lora",
                    "merge_lora_weights",
                    "unmerge_lora_weights",
                )
            )
            if changes_lora:  # the state a fresh worker must reach again (a profile ends with its worker)
                self._lora_log.append(pending.control)  # type: ignore[union-attr]
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

    def _observe(self, timings) -> None:
        """The running batch's first result corrects the cost model's speeds (the batch shares its timings)."""
        batch, self._batch = self._batch, []
        if not batch or self.cost is None or self.info is None or not isinstance(timings, dict):
            return
        shape = request_shape(batch[0].item.params, self.info.defaults)
        shape.images = sum(request_shape(p.item.params, self.info.defaults).images for p in batch)
        self.cost.observe(shape, timings)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_S)
            if self.state in ("stopped", "failed", "dead"):
                continue
            worker = self.worker
            if (
                self.state in ("loading", "restarting")
                and time.monotonic() - self._loading_since > self.config.load_timeout
            ):
                self.state, self.error = "failed", f"loading took longer than {self.config.load_timeout:g} s"
                worker.kill()
                self._fail_all("worker_died", f"the worker could not load the model: {self.error}")
                continue
            if not worker.process.is_alive():
                code = worker.process.exitcode
                if self.state == "stopping":
                    if self.queue or self.running:
                        self.state, self.error = "dead", f"exit code {code}"
                    self._fail_all("worker_died", f"the worker process died (exit code {code}); the request was lost")
                    continue
                await self._replace_worker("died", f"the worker process died (exit code {code})")
            elif self.state != "stopping" and self._cancelled_too_long():
                await self._replace_worker(
                    "deadline", f"a cancelled batch ran on for more than {self.config.cancel_grace:g} s"
                )

    def _cancelled_too_long(self) -> bool:
        running = list(self.running.values())
        if not running or any(p.cancelled_at is None for p in running):
            return False
        return time.monotonic() - max(p.cancelled_at for p in running) > self.config.cancel_grace  # type: ignore[type-var]

    async def _replace_worker(self, reason: str, why: str) -> None:
        """Kill the worker (if it still lives) and start a fresh one; the queue waits for it. Without restart
        budget left, the state turns "dead" and every request fails."""
        old = self.worker
        # First, so that nothing is dispatched to the old worker while it is being ended.
        self.state, self.error = "restarting", why
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._receiver
        old.kill()
        await asyncio.to_thread(old.process.join, 10)
        old.close()
        print(f"ditserve: {why}; worker {old.pid} ended", flush=True)
        now = time.monotonic()
        self.restarts = [(t, r) for t, r in self.restarts if now - t < self.config.restart_window]
        exhausted = len(self.restarts) >= self.config.max_restarts
        retry = None if exhausted else self.reload_retry_after()
        lost = "the worker process died while running this request" if reason == "died" else "the request was cancelled"
        lost += "; the worker cannot be restarted" if exhausted else "; a fresh worker is starting"
        for pending in self.running.values():
            if not pending.future.done():
                pending.future.set_exception(RequestFailed("worker_died", lost, retry_after=retry))
                pending.future.exception()
        self.running.clear()
        self._batch_id = None
        self._idle.set()
        if exhausted:
            self.state = "dead"
            self.error = (
                f"{why}, and the restart budget ({self.config.max_restarts} within "
                f"{self.config.restart_window:g} s) is spent"
            )
            self._fail_all("worker_died", f"the worker is gone ({self.error})")
            return
        self.restarts.append((now, reason))
        self.total_restarts += 1
        if self.on_restart is not None:
            self.on_restart(reason)
        self._spawn()

    def _fail_all(self, kind: str, message: str) -> None:
        pending_all = list(self.queue) + list(self.running.values())
        self.queue.clear()
        self.running.clear()
        for pending in pending_all:
            if not pending.future.done():
                pending.future.set_exception(RequestFailed(kind, message))
                pending.future.exception()
