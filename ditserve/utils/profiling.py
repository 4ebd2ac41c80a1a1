"""Profiling: torch.profiler traces of chosen stages and steps, and named ranges for Nsight Systems.

Ranges come from three seams, never from model code: `StageTimer.stage` (one per stage: `stage:encode`,
`stage:denoise`, ...), `StageTimer.step_begin/step_end` (one per denoising step: `step 3`) and `LoopStep.run` in
the block loop (one per block: `block 7`, and `glue` between runs of blocks). They are emitted only while a
profile window is open or NVTX ranges are on, so a request that is not profiled pays one boolean test per block.

A `ProfileConfig` says what to record: the stages (None: all four) and, within the denoise stage, the steps
(`start:stop`, Python's half-open range, 0-based). `profiling(config, out_dir)` arms it for the requests run inside
it: every request (a batch) writes one Chrome/Perfetto JSON trace per window it opens, named by its label, rank and
a counter, and the session lists them. With steps given, the window is those steps only (the stages' ranges that
enclose them are not in it); without, each chosen stage is its own window.

With CUDA graphs the DiT's forward is one graph launch: its kernels appear in the trace, the per-block ranges only
in the eager forwards before capture. `--no-cuda-graphs` shows each block's range around its kernels.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

STAGES = ("encode", "prepare", "denoise", "decode")


class ProfileConfigError(ValueError):
    """A profile setting that cannot be honoured; `field` names it (`stages`, `steps`, `nvtx`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ProfileConfig:
    stages: tuple[str, ...] | None = None  # None: every stage
    steps: tuple[int, int] | None = None  # denoising steps [start, stop); None: the whole stages
    record_shapes: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in STAGES]
            if unknown or not self.stages:
                raise ProfileConfigError("stages", f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
        if self.steps is not None:
            start, stop = self.steps
            if start < 0 or stop <= start:
                raise ProfileConfigError("steps", f"steps {start}:{stop} is empty; give START:STOP with STOP > START")
            if self.stages is not None and "denoise" not in self.stages:
                raise ProfileConfigError("steps", "steps are denoising steps: they need the denoise stage")

    @classmethod
    def coerce(cls, value: ProfileConfig | dict | None) -> ProfileConfig:
        """A ProfileConfig from itself, None (defaults) or a dict such as an HTTP body gives."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ProfileConfigError("profile", f"expected an object, got {type(value).__name__}")
        unknown = sorted(set(value) - {"stages", "steps", "record_shapes", "with_stack"})
        if unknown:
            raise ProfileConfigError(unknown[0], f"unknown profile setting {unknown[0]!r}")
        stages = value.get("stages")
        if isinstance(stages, str):
            stages = parse_stages(stages)
        elif stages is not None:
            if not isinstance(stages, list | tuple) or not all(isinstance(s, str) for s in stages):
                raise ProfileConfigError("stages", "stages is a list of stage names or 'encode,denoise'")
            stages = tuple(stages)
        steps = value.get("steps")
        if isinstance(steps, str):
            steps = parse_steps(steps)
        elif steps is not None:
            if not (isinstance(steps, list | tuple) and len(steps) == 2 and all(type(s) is int for s in steps)):
                raise ProfileConfigError("steps", "steps is 'START:STOP' or [START, STOP]")
            steps = (steps[0], steps[1])
        flags = {}
        for name in ("record_shapes", "with_stack"):
            if name in value:
                if not isinstance(value[name], bool):
                    raise ProfileConfigError(name, f"{name} is true or false")
                flags[name] = value[name]
        return cls(stages=stages, steps=steps, **flags)

    def to_dict(self) -> dict:
        return {
            "stages": list(self.stages) if self.stages is not None else None,
            "steps": list(self.steps) if self.steps is not None else None,
            "record_shapes": self.record_shapes,
            "with_stack": self.with_stack,
        }


def parse_steps(text: str) -> tuple[int, int]:
    """`2:4` → (2, 4): steps 2 and 3; `5` → (5, 6)."""
    start, sep, stop = text.strip().partition(":")
    try:
        first = int(start)
        last = int(stop) if sep else first + 1
    except ValueError:
        raise ProfileConfigError("steps", f"{text!r} is not START:STOP (e.g. 2:4 for steps 2 and 3)") from None
    if first < 0 or last <= first:
        raise ProfileConfigError("steps", f"{text!r} is empty; give START:STOP with STOP > START >= 0")
    return first, last


def parse_stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ProfileConfigError("stages", f"unknown stage(s) {unknown or [text]}; the stages are {', '.join(STAGES)}")
    return stages


# ---- the ranges the seams emit ------------------------------------------------------------------------------------
_lock = threading.Lock()
_session: ProfileSession | None = None
_nvtx = False
# True while a window records or NVTX is on: the seams' one test.
ranges_on = False


def _update() -> None:
    global ranges_on
    ranges_on = _nvtx or (_session is not None and _session.window is not None)


def set_nvtx(enabled: bool) -> None:
    """NVTX ranges for every request from now on (Nsight Systems: `nsys profile ditserve ... --nvtx`)."""
    global _nvtx
    if enabled and not (torch.cuda.is_available() and torch.version.cuda):
        raise ProfileConfigError("nvtx", "NVTX ranges need a CUDA build of torch and a CUDA device")
    _nvtx = enabled
    _update()


@contextlib.contextmanager
def named_range(name: str) -> Iterator[None]:
    """`name` as a torch.profiler range (while a window records) and an NVTX range (while NVTX is on)."""
    if not ranges_on:
        yield
        return
    recording = _session is not None and _session.window is not None
    if _nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        if recording:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if _nvtx:
            torch.cuda.nvtx.range_pop()


def stage_begin(name: str) -> None:
    if _session is not None:
        _session.stage_begin(name)


def stage_end(name: str) -> None:
    if _session is not None:
        _session.stage_end(name)


def step_begin(index: int) -> None:
    if _session is not None:
        _session.step_begin(index)


def step_end(index: int) -> None:
    if _session is not None:
        _session.step_end(index)


# ---- sessions ---------------------------------------------------------------------------------------------------
class ProfileSession:
    """An armed profile: windows open and close at the seams' stage and step boundaries, each written as a trace."""

    def __init__(self, config: ProfileConfig, out_dir: Path, rank: int = 0, device: torch.device | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.device = device
        self.traces: list[Path] = []
        self.window: torch.profiler.profile | None = None
        self._label = ""
        self._stage: str | None = None

    def _wanted(self, stage: str) -> bool:
        """Whether `stage` is a window of its own (with steps and no stages named: none is, only the steps)."""
        if self.config.stages is None:
            return self.config.steps is None
        return stage in self.config.stages

    def _open(self, label: str) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device is not None and self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.window = torch.profiler.profile(
            activities=activities, record_shapes=self.config.record_shapes, with_stack=self.config.with_stack
        )
        self.window.start()
        self._label = label
        _update()

    def _close(self) -> None:
        if self.window is None:
            return
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        window, self.window = self.window, None
        _update()
        window.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{len(self.traces):03d}-{self._label}.rank{self.rank}.json"
        window.export_chrome_trace(str(path))
        self.traces.append(path)

    def stage_begin(self, name: str) -> None:
        self._stage = name
        if self._wanted(name) and (self.config.steps is None or name != "denoise") and self.window is None:
            self._open(f"stage-{name}")

    def stage_end(self, name: str) -> None:
        if self.config.steps is None or name != "denoise":
            if self.window is not None and self._label == f"stage-{name}":
                self._close()
        elif self.window is not None:  # a request with fewer steps than the window's end
            self._close()
        self._stage = None

    def step_begin(self, index: int) -> None:
        steps = self.config.steps
        if steps is not None and self._stage == "denoise" and index == steps[0] and self.window is None:
            self._open(f"steps-{steps[0]}-{steps[1]}")

    def step_end(self, index: int) -> None:
        steps = self.config.steps
        if steps is not None and self._stage == "denoise" and self.window is not None and index == steps[1] - 1:
            self._close()

    def abort(self) -> None:
        """Close an open window (a request that failed inside it, or a stop between requests)."""
        self._close()


@contextlib.contextmanager
def profiling(
    config: ProfileConfig | dict | None, out_dir: str | Path, rank: int = 0, device: torch.device | None = None
) -> Iterator[ProfileSession]:
    """Profile the requests run inside: their traces go to `out_dir` and are listed in the session's `traces`."""
    session = start(config, out_dir, rank, device)
    try:
        yield session
    finally:
        stop()


def start(
    config: ProfileConfig | dict | None, out_dir: str | Path, rank: int = 0, device: torch.device | None = None
) -> ProfileSession:
    global _session
    with _lock:
        if _session is not None:
            raise ProfileConfigError("profile", "a profile is already running; stop it first")
        _session = ProfileSession(ProfileConfig.coerce(config), Path(out_dir), rank, device)
        _update()
        return _session


def stop() -> ProfileSession | None:
    """End the running profile (None if there was none); its `traces` are the files written."""
    global _session
    with _lock:
        session, _session = _session, None
        if session is not None:
            session.abort()
        _update()
        return session


def current() -> ProfileSession | None:
    return _session


__all__ = [
    "ProfileConfig",
    "ProfileConfigError",
    "ProfileSession",
    "STAGES",
    "current",
    "named_range",
    "parse_stages",
    "parse_steps",
    "profiling",
    "set_nvtx",
    "start",
    "stop",
]
