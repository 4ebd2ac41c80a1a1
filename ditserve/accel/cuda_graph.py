"""CUDA graphs for the DiT forward: one graph per input shape, replayed every denoising step.

Why: eager PyTorch spends CPU time launching every kernel (a FLUX.1 forward is ~2,000 launches plus one collective
per attention or tensor-parallel layer on several GPUs). On one GPU that hides behind the GPU's own work, but split
over 2 or 4 GPUs each rank's share of the work is shorter than the CPU's launch time, and the GPUs wait on Python.
A replayed graph launches the whole forward at once.

It attaches at one seam, the model's `forward` (as sequence parallelism does, and on top of it): the first call with
a new set of input shapes runs eagerly twice (to settle cuDNN/cuBLAS workspaces and NCCL communicators), then is
captured; later calls copy their inputs into the graph's static buffers, replay, and return a copy of the output.
Graphs share one memory pool (`GraphPool`), across the models of an engine too (Wan2.2's two experts, never run at
once): each replay's intermediates are dead once its output is copied out, so a graph may reuse another's
intermediate memory. Only the model's tensors are read in place, so anything that changes which
kernels run or which tensors they read (LoRA changes) must call `reset()`.

While a hook decides at the block loop which blocks run (DiT caching, accel/cache.py), one graph of the whole
forward cannot hold both outcomes: the forward then runs eagerly around the loop, and the hook replays graphs of
the runs of blocks it chose (`CudaGraphs.replay`), keyed with the model's, forgotten with them.

With several ranks, every rank captures the same graphs in the same order (they run the same forwards), so the
collectives inside line up as in eager mode.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2


def _signature(args: tuple, kwargs: dict) -> tuple | None:
    """The graph key: shape, dtype, stride-free layout of every tensor input; None when a graph can't be used."""
    key = []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return None
            key.append((name, tuple(value.shape), value.dtype, value.device.index))
        elif value is None or isinstance(value, (bool, int, float, str)):
            key.append((name, value))
        elif isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value):
            key.append((name, value))  # a shape such as a token grid
        else:
            return None
    return tuple(key)


class _Graph:
    def __init__(self, fn: Callable, args: tuple, kwargs: dict, pool, warmup_stream: Callable[[], torch.cuda.Stream]):
        # Static inputs live outside the pool: the pool's blocks are rewritten by other graphs' replays.
        def static(value):
            return value.clone(memory_format=torch.contiguous_format) if isinstance(value, torch.Tensor) else value

        self.args = tuple(static(a) for a in args)
        self.kwargs = {k: static(v) for k, v in kwargs.items()}
        side = warmup_stream()
        side.wait_stream(torch.cuda.current_stream(side.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                fn(*self.args, **self.kwargs)
        torch.cuda.current_stream(side.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may touch CUDA (memory stats) while this thread captures.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn(*self.args, **self.kwargs)
        outputs = self.output if isinstance(self.output, tuple) else (self.output,)
        if not all(isinstance(t, torch.Tensor) for t in outputs):
            raise TypeError(f"CUDA graphs need a tensor output (or a tuple of them), got {type(self.output).__name__}")

    def replay(self, args: tuple, kwargs: dict) -> torch.Tensor | tuple[torch.Tensor, ...]:
        for mine, value in [*zip(self.args, args), *((self.kwargs[k], v) for k, v in kwargs.items())]:
            if isinstance(mine, torch.Tensor):
                mine.copy_(value)
        self.graph.replay()
        # Copies: the pool's memory is reused by the next replay of any graph.
        if isinstance(self.output, tuple):
            return tuple(t.clone() for t in self.output)
        return self.output.clone()

    def release(self) -> None:
        """Free the executable graph now rather than whenever Python collects it: NCCL cannot tear down a
        communicator while a graph holding its collectives is alive."""
        self.graph.reset()


class GraphPool:
    """The CUDA graph memory pool several `CudaGraphs` capture into. A pool whose graphs were all freed is not
    captured into again (the caching allocator has released it): `renew` gives the next captures a fresh one."""

    def __init__(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()

    def renew(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()


class CudaGraphs:
    """Graphs of one model's forward (and of its runs of blocks, while a block-loop hook is on), keyed by input
    shapes, at most `max_graphs` kept (least recently used goes)."""

    def __init__(self, model: nn.Module, device: torch.device, max_graphs: int = 16, pool: GraphPool | None = None):
        self.model = model
        self.device = device
        self.max_graphs = max_graphs
        self.eager_forward = model.forward  # whatever forward was there (the plain one, or a parallel wrapper)
        self.wrapped_instance_forward = "forward" in model.__dict__
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.failed: set[tuple] = set()
        self.pool = pool or GraphPool()
        # One stream for every capture's warm-up runs (made at the first capture): each new stream would get, and
        # keep, its own cuBLAS workspace.
        self._side_stream: torch.cuda.Stream | None = None
        self.captures = 0  # for tests and logs: how many graphs were captured since the start

    def warmup_stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        loop = getattr(self.model, "block_loop", None)
        if loop is not None and loop.hook is not None:
            return self.eager_forward(*args, **kwargs)  # the hook replays graphs of the blocks it runs
        return self.replay("forward", self.eager_forward, args, kwargs)

    def replay(self, name: str, fn: Callable, args: tuple, kwargs: dict | None = None):
        """`fn(*args, **kwargs)` (tensors, or a tuple of them) through the graph captured for `name` and these input
        shapes, capturing it on first use; eager where a graph cannot be used."""
        kwargs = kwargs or {}
        signature = _signature(args, kwargs)
        key = None if signature is None else (name, signature)
        if key is None or key in self.failed or torch.is_grad_enabled():
            return fn(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            failure = None
            try:
                graph = _Graph(fn, args, kwargs, self.pool.handle, self.warmup_stream)
            except Exception as e:  # noqa: BLE001 - a forward that can't be captured still runs, eagerly
                failure = f"{type(e).__name__}: {e}"
            if failure is not None:  # outside the handler, so the failed capture's tensors are freed first
                log.warning("CUDA graph capture failed (%s); running this shape eagerly", failure)
                self.failed.add(key)
                torch.cuda.synchronize(self.device)
                return fn(*args, **kwargs)
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)[1].release()
        self.graphs.move_to_end(key)
        return graph.replay(args, kwargs)

    def reset(self) -> None:
        """Forget every graph (after a change to the weights' tensors or to the code path, such as LoRA; before
        leaving the process group)."""
        torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.release()
        self.graphs.clear()
        self.failed.clear()
        self.pool.renew()  # other models' graphs keep the old pool alive as long as they live


def enable_cuda_graphs(
    model: nn.Module, device: torch.device, max_graphs: int = 16, pool: GraphPool | None = None
) -> CudaGraphs:
    """Route `model(...)` through CUDA graphs (inference only: with grad enabled the eager forward runs); `pool`
    shared with the graphs of models that never run at the same time as this one."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    graphs = CudaGraphs(model, device, max_graphs, pool)
    model.forward = graphs  # type: ignore[method-assign]
    return graphs


def disable_cuda_graphs(model: nn.Module) -> None:
    """Undo enable_cuda_graphs: the forward that was there before."""
    graphs = model.__dict__.get("forward")
    if isinstance(graphs, CudaGraphs):
        graphs.reset()
        if graphs.wrapped_instance_forward:
            model.forward = graphs.eager_forward  # type: ignore[method-assign]
        else:
            del model.forward


__all__ = ["CudaGraphs", "GraphPool", "disable_cuda_graphs", "enable_cuda_graphs"]
