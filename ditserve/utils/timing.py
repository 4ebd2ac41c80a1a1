"""Per-request stage and step timings.

Stage times are wall-clock with a device synchronisation at each boundary, so they add up to the request's time.
Step times use CUDA events (no synchronisation inside the loop), read once after the loop. Each stage's peak device
memory is recorded too (the allocator's peak is reset at the stage's start): `summary()["memory"]`.

The timer is also where stages and steps become profiler and NVTX ranges (utils/profiling.py).
"""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager

import torch

from ditserve.utils import memory, profiling


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.stages: dict[str, float] = {}
        self.stage_peaks_mb: dict[str, float | None] = {}  # per stage: peak allocated device memory (None on CPU)
        self.current_stage: str | None = None
        self._step_events: list[tuple] = []
        self._step_wall: list[float] = []
        self._step_start: float | None = None
        self._step_index = 0
        self._step_range: contextlib.ExitStack | None = None
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        synchronize(self.device)
        memory.reset_peak(self.device)
        self.current_stage = name
        profiling.stage_begin(name)
        start = time.perf_counter()
        try:
            with profiling.named_range(f"stage:{name}"):
                yield
        finally:
            self._end_step_range()
            synchronize(self.device)
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start
            peak = memory.peak_mb(self.device)
            before = self.stage_peaks_mb.get(name)
            self.stage_peaks_mb[name] = None if peak is None else round(max(peak, before or 0.0), 1)
            self.current_stage = None
            profiling.stage_end(name)  # after the timing: writing a trace is not the stage's time

    def step_begin(self) -> None:
        profiling.step_begin(self._step_index)
        if profiling.ranges_on:
            self._step_range = contextlib.ExitStack()
            self._step_range.enter_context(profiling.named_range(f"step {self._step_index}"))
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._step_events.append((start,))
        else:
            self._step_start = time.perf_counter()

    def step_end(self) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._step_events[-1] = (self._step_events[-1][0], end)
        else:
            self._step_wall.append(time.perf_counter() - self._step_start)  # type: ignore[operator]
        self._end_step_range()
        profiling.step_end(self._step_index)
        self._step_index += 1

    def _end_step_range(self) -> None:
        if self._step_range is not None:
            self._step_range.close()
            self._step_range = None

    def step_times(self) -> list[float]:
        if self._step_events:
            synchronize(self.device)
            return [start.elapsed_time(end) / 1000.0 for start, end in self._step_events]
        return list(self._step_wall)

    def summary(self) -> dict:
        synchronize(self.device)
        summary = {**self.stages, "total": time.perf_counter() - self._start, "steps": self.step_times()}
        summary["stage_peak_memory_mb"] = dict(self.stage_peaks_mb)
        return summary
