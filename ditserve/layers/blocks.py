"""The block loop: the one place a DiT runs its repeated blocks, and the seam features that skip blocks attach to.

A model describes its loop as data instead of writing the `for` itself: the state (a tuple of tensors: the streams
the blocks carry), then runs of blocks (`Blocks`: the modules and how one is called on the state, with the
per-forward tensors every block of the run takes), with `Glue` between runs where the state changes form (a model
that joins its text and image streams into one sequence). With no hook installed `BlockLoop` runs the steps in order,
exactly the loop the model would have written. A hook (DiT caching, accel/cache.py) receives the same steps and
decides which blocks run.

`signal`, when a model gives it, computes the first block's timestep-modulated input on demand (TeaCache reads it).

Layerwise offload (accel/offload.py) sits here too: with `BlockLoop.offload` set, every step carries it and
`run_steps` hands a run of steps to it, which copies each block's weights in ahead of its turn; `signal` then runs
with the first block copied in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ditserve.utils import profiling

State = tuple[torch.Tensor, ...]


class Blocks:
    """A run of blocks that take the state the same way: `call(block, state, *args) -> state`."""

    def __init__(self, modules: Sequence[nn.Module], call: Callable[..., State], *args: Any):
        self.modules = modules
        self.call = call
        self.args = args


@dataclass(frozen=True)
class Glue:
    """A cheap change of the state's form between runs of blocks (no weights, not a block)."""

    fn: Callable[[State], State]


@dataclass(frozen=True)
class LoopStep:
    """One step of the loop: a block (`block` set) or glue (`block` None); `run(state) -> state`."""

    block: nn.Module | None
    fn: Callable[..., State]
    args: tuple[Any, ...] = ()
    offload: Any = None  # the loop's BlockOffload (accel/offload.py), when its blocks live on the host
    name: str = ""  # the profiler's and NVTX's range for this step ("block 7", "glue")

    def run(self, state: State) -> State:
        if profiling.ranges_on:
            with profiling.named_range(self.name):
                return self._run(state)
        return self._run(state)

    def _run(self, state: State) -> State:
        if self.block is None:
            return self.fn(state)
        return self.fn(self.block, state, *self.args)


class BlockLoopHook(Protocol):
    def __call__(self, steps: list[LoopStep], state: State, signal: Callable[[], torch.Tensor] | None) -> State: ...


def run_steps(steps: Sequence[LoopStep], state: State) -> State:
    offload = next((s.offload for s in steps if s.offload is not None), None)
    if offload is not None:
        return offload.run(steps, state)
    for step in steps:
        state = step.run(state)
    return state


class BlockLoop:
    """Runs a model's repeated blocks; `hook` (None: plain loop) may run them its own way; `offload` (None: the
    blocks are on the device) brings each block's weights in for its turn."""

    def __init__(self) -> None:
        self.hook: BlockLoopHook | None = None
        self.offload: Any = None

    def __call__(self, state: State, *parts: Blocks | Glue, signal: Callable[[], torch.Tensor] | None = None) -> State:
        steps: list[LoopStep] = []
        for part in parts:
            if isinstance(part, Glue):
                steps.append(LoopStep(None, part.fn, (), self.offload, "glue"))
            else:
                first = sum(s.block is not None for s in steps)
                steps.extend(
                    LoopStep(block, part.call, part.args, self.offload, f"block {first + i}")
                    for i, block in enumerate(part.modules)
                )
        if self.offload is not None and signal is not None:
            signal = self.offload.with_block(next(s.block for s in steps if s.block is not None), signal)
        if self.hook is None:
            return run_steps(steps, state)
        return self.hook(steps, state, signal)
