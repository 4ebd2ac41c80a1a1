"""The worker process: loads the engine once, then runs the batches the server sends it, until told to stop.

The server starts one worker, whatever the number of GPUs, and replaces it when it dies or stays stuck in a cancelled
batch (engine/scheduler.py); a fresh worker redoes the LoRA changes its predecessor had made. Its engine is rank 0: with several GPUs that engine
starts the other ranks itself, and they run each batch with it as rank 0 broadcasts it (engine/distributed.py), so
the worker is the only process that talks to the HTTP process. The worker never sees HTTP, and the HTTP process
never runs model work. Everything on the socket is `messages` (JSON plus raw image bytes). Outputs leave encoded: images
in the request's format, clips as MP4.

A batch that raises is retried request by request, so that one bad request fails alone. Out-of-memory frees the
CUDA cache before the retry. After every denoising step the worker reports progress and reads the cancel messages
that arrived meanwhile: once every request of the batch is cancelled, the batch stops there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback

from ditserve.engine import messages as msg

# Test-only hooks, honoured only when DITSERVE_TESTING=1 is in the worker's environment, so that a production
# prompt can never trigger them: "[[fail]]" raises inside the denoising loop, "[[sleep=S]]" sleeps S seconds per
# step (to hold requests in flight).
_FAIL_MARK = "[[fail]]"
_SLEEP_MARK = re.compile(r"\[\[sleep=([0-9.]+)\]\]")
POLL_MS = 500  # how often an idle worker checks that its parent is still alive
LORA_METHODS = ("set_lora", "merge_lora_weights", "unmerge_lora_weights", "list_loras")
PROFILE_METHODS = ("start_profile", "stop_profile")  # the operator's profiling window (utils/profiling.py)
STARTUP_LORA_KEY = "_startup_lora"  # in the worker's JSON arguments: serve's --lora-* flags, as set_lora kwargs
MAX_LORA_STRENGTH_KEY = "_max_lora_strength"  # serve's --max-lora-strength
REPLAY_LORA_KEY = "_replay_lora"  # the LoRA changes a replaced worker had made ({"method", "kwargs"}), to redo


class Cancelled(Exception):
    """Every request of the running batch was cancelled."""


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook."""


def _prompts(params: dict) -> list[str]:
    p = params.get("prompt")
    return [p] if isinstance(p, str) else list(p or [])


class Worker:
    def __init__(self, engine_args: dict, address: str):
        import zmq

        self.parent = os.getppid()
        self.testing = os.environ.get("DITSERVE_TESTING") == "1"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(address)
        self.engine_args = engine_args
        self.engine = None
        self.cancelled: set[str] = set()
        self.stopping = False

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        from ditserve.config import EngineArgs
        from ditserve.engine.cost import measure as measure_cost
        from ditserve.engine.engine import Engine
        from ditserve.engine.scheduler import REPLAY_LORA_KEY
        from ditserve.pipelines.base import Pipeline

        args = dict(self.engine_args)
        startup_lora = args.pop(STARTUP_LORA_KEY, None)
        max_lora_strength = args.pop(MAX_LORA_STRENGTH_KEY, None)
        replay = args.pop(REPLAY_LORA_KEY, None) or []
        self.engine = Engine(EngineArgs(**args))
        if max_lora_strength is not None:
            self.engine.lora.max_strength = max_lora_strength
        if startup_lora:  # serve's --lora-* flags: applied before the first request, or the load fails
            self.engine.set_lora(**startup_lora)
        notes = []
        for op in replay:  # a restarted worker: the LoRA changes its predecessor had made, in order
            try:
                if op["method"] not in LORA_METHODS:
                    raise ValueError(f"unknown LoRA operation {op['method']!r}")
                getattr(self.engine, op["method"])(**op["kwargs"])
            except Exception as e:  # noqa: BLE001 - the worker serves on; the server logs what could not be redone
                notes.append(f"the restarted worker could not redo {op['method']}: {type(e).__name__}: {e}")
        try:
            cost = measure_cost(self.engine).to_dict()
        except Exception as e:  # noqa: BLE001 - the server then prices nothing, and only its hard limits hold
            cost = None
            notes.append(
                f"the cost of requests could not be measured ({type(e).__name__}: {e}); only the hard limits hold"
            )
        pipe = self.engine.pipeline
        video = pipe.spec.output == "video"
        info = msg.ModelInfo(
            name=self.engine.model_name,
            family=pipe.spec.family,
            tasks=list(pipe.tasks),
            spatial_multiple=pipe.spatial_multiple,
            max_sequence_length_limit=pipe.max_sequence_length_limit,
            defaults=msg.params_to_dict(pipe.defaults()),
            supports_batching=type(pipe).run_batch is not Pipeline.run_batch,
            device=str(self.engine.device),
            dtype=str(self.engine.dtype).replace("torch.", ""),
            pid=os.getpid(),
            cost=cost,
            frame_step=int(getattr(pipe, "vae_scale_temporal", 1) or 1) if video else None,
            backend=self.engine.backend,
            memory_plan=self.engine.memory_plan.to_dict() if self.engine.memory_plan is not None else None,
        )
        self.sock.send_multipart(msg.ready_message(info, notes))

    def serve(self) -> None:
        import zmq

        while not self.stopping:
            if not self.sock.poll(POLL_MS, zmq.POLLIN):
                if os.getppid() != self.parent:  # the server died without telling us: nobody is left to answer
                    return
                continue
            message, blobs = msg.decode(self.sock.recv_multipart())
            kind = message["type"]
            if kind == "run":
                self.run_batch(message["batch_id"], msg.items_from(message, blobs))
            elif kind == "lora":
                self.run_lora(message)
            elif kind == "cancel":
                pass  # nothing is running: the server only cancels what it has sent
            elif kind == "shutdown":
                self.stopping = True

    # ---- running ------------------------------------------------------------------------------------------------
    def _drain_control(self) -> None:
        """Read cancel/shutdown messages that arrived while a batch runs (the server sends no work meanwhile)."""
        import zmq

        while self.sock.poll(0, zmq.POLLIN):
            message, _ = msg.decode(self.sock.recv_multipart())
            if message["type"] == "cancel":
                self.cancelled.update(message.get("request_ids", []))
            elif message["type"] == "shutdown":
                self.stopping = True  # finish this batch first: accepted requests are answered

    def _step_hook(self, batch_id: str, items: list[msg.WorkItem]):
        prompts = [text for item in items for text in _prompts(item.params)]
        sleep = 0.0
        fail = False
        if self.testing:
            fail = any(_FAIL_MARK in text for text in prompts)
            sleeps = [float(m.group(1)) for text in prompts for m in [_SLEEP_MARK.search(text)] if m]
            sleep = max(sleeps, default=0.0)
        ids = [item.request_id for item in items]

        def on_step(i: int, n: int) -> None:
            if sleep:
                time.sleep(sleep)
            if fail:
                raise InjectedFault("injected fault (test hook [[fail]])")
            self._drain_control()
            if all(rid in self.cancelled for rid in ids):
                raise Cancelled
            # Every step: a video job's progress moves with each one (a message of ~100 bytes, next to a step).
            self.sock.send_multipart(
                msg.encode({"type": "progress", "batch_id": batch_id, "request_ids": ids, "step": i + 1, "steps": n})
            )

        return on_step

    def _run(self, batch_id: str, items: list[msg.WorkItem]) -> None:
        """Run items as one batch and send a result per item; raises if the batch fails."""
        import numpy as np

        from ditserve.utils.media import encode_image
        from ditserve.utils.video import encode_mp4

        engine = self.engine
        tasks = engine.pipeline.tasks  # type: ignore[union-attr]
        for item in items:
            if item.task not in tasks:
                raise ValueError(f"this model does {', '.join(tasks)}, not {item.task}")
        on_step = self._step_hook(batch_id, items)
        # Through the engine, which resolves and seeds the requests, holds the LoRA lock and, with several ranks,
        # makes every rank run the batch.
        batch = [item.sampling_params() for item in items]
        results = engine.run_batch(batch, on_step)  # type: ignore[union-attr]
        for item, result in zip(items, results):
            if item.request_id in self.cancelled:
                continue
            if item.output_format == "mp4":
                blobs = [encode_mp4(np.asarray(clip), clip.fps) for clip in result.videos]
            else:
                blobs = [encode_image(image, item.output_format) for image in result.images]
            meta = {"seed": result.seed, "timings": result.timings, "peak_memory_mb": result.peak_memory_mb}
            self.sock.send_multipart(msg.result_message(item.request_id, blobs, meta))

    def run_batch(self, batch_id: str, items: list[msg.WorkItem]) -> None:
        try:
            self._run_guarded(batch_id, items)
        finally:
            self.cancelled.difference_update(item.request_id for item in items)
            self.sock.send_multipart(msg.encode({"type": "batch_done", "batch_id": batch_id}))

    def _run_guarded(self, batch_id: str, items: list[msg.WorkItem]) -> None:
        try:
            self._run(batch_id, items)
            return
        except Cancelled:
            for item in items:
                self._send_error(item.request_id, "cancelled", "the request was cancelled")
            return
        except Exception as e:  # noqa: BLE001 - any failure of a request is reported, the worker lives on
            self._free_memory()
            if len(items) == 1:
                self._send_failure(items[0].request_id, e)
                return
        for item in items:  # the batch failed: run each alone so that only the request at fault fails
            if item.request_id in self.cancelled:
                self._send_error(item.request_id, "cancelled", "the request was cancelled")
                continue
            try:
                self._run(batch_id, [item])
            except Cancelled:
                self._send_error(item.request_id, "cancelled", "the request was cancelled")
            except Exception as e:  # noqa: BLE001
                self._free_memory()
                self._send_failure(item.request_id, e)

    def _send_failure(self, request_id: str, e: Exception) -> None:
        """A request's failure: one the model refuses (a ConfigError, e.g. more input images than it takes) as
        invalid, naming the field; any other as `_describe` says."""
        from ditserve.config import ConfigError

        if isinstance(e, ConfigError):
            message = {"type": "error", "request_id": request_id, "kind": "invalid", "param": e.field}
            self.sock.send_multipart(msg.encode({**message, "message": str(e)}))
        else:
            self._send_error(request_id, *self._describe(e))

    @staticmethod
    def _describe(e: Exception) -> tuple[str, str, str | None]:
        """(kind, message, the request field at fault) of a failed request."""
        import torch

        from ditserve.errors import FieldError
        from ditserve.utils.memory import DeviceOutOfMemory

        if isinstance(e, DeviceOutOfMemory):
            return "out_of_memory", str(e), None
        if isinstance(e, torch.OutOfMemoryError):
            return "out_of_memory", "the device ran out of memory; try a smaller size, fewer images or steps", None
        if isinstance(e, FieldError):  # the model refused a setting the server could not check without it
            return "invalid", e.message, e.field
        if os.environ.get("DITSERVE_DEBUG") == "1":
            traceback.print_exc()
        return "error", f"{type(e).__name__}: {e}", None

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run_lora(self, message: dict) -> None:
        """A LoRA operation, queued by the server between batches like a request: it applies after every request
        accepted before it and before every request accepted after it."""
        from ditserve.config import ConfigError
        from ditserve.lora import LoRAError

        request_id = message["request_id"]
        try:
            if message["method"] not in LORA_METHODS + PROFILE_METHODS:
                raise ValueError(f"unknown operation {message['method']!r}")
            result = getattr(self.engine, message["method"])(**message["kwargs"])
            self.sock.send_multipart(msg.encode({"type": "lora_result", "request_id": request_id, "result": result}))
        except (LoRAError, ConfigError) as e:
            self.sock.send_multipart(
                msg.encode(
                    {"type": "error", "request_id": request_id, "kind": "invalid", "param": e.field, "message": str(e)}
                )
            )
        except Exception as e:  # noqa: BLE001 - the operation fails alone; the worker serves on
            self._send_error(request_id, "error", f"{type(e).__name__}: {e}")
        finally:
            self.sock.send_multipart(msg.encode({"type": "batch_done", "batch_id": message["batch_id"]}))

    def _send_error(self, request_id: str, kind: str, message: str, param: str | None = None) -> None:
        error = {"type": "error", "request_id": request_id, "kind": kind, "message": message}
        if param is not None:
            error["param"] = param
        self.sock.send_multipart(msg.encode(error))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def worker_main(engine_args_json: str, address: str) -> None:
    """Entry point of a spawned worker process. Arguments are JSON text, so nothing pickled is trusted."""
    from ditserve.cli_common import quiet_libraries

    # The server stops a worker with a message, after its in-flight batch; a Ctrl-C or SIGTERM sent to the whole
    # process group must not kill the batch underneath it. (SIGKILL still works, and a worker whose parent is gone
    # exits on its own.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A process group of its own, holding the ranks it starts: the server's supervisor ends them all at once when it
    # replaces a worker that is stuck or half dead.
    with contextlib.suppress(OSError):
        os.setpgrp()
    if os.environ.get("DITSERVE_DEBUG") != "1":
        quiet_libraries()
    worker = Worker(json.loads(engine_args_json), address)
    try:
        try:
            worker.load()
        except Exception as e:  # noqa: BLE001 - report why, so the server can say it instead of waiting forever
            worker.sock.send_multipart(msg.encode({"type": "load_failed", "message": f"{type(e).__name__}: {e}"}))
            sys.exit(1)
        worker.serve()
    finally:
        worker.close()
