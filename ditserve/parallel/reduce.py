"""How tensor-parallel partial sums are added up across ranks: the one collective that tensor parallelism adds.

Row-parallel linears end in an all-reduce of their output (a few to a hundred MB per layer for a DiT). Two ways:

- "nccl" (the default): `dist.all_reduce` (gloo's on the CPU).
- "two-shot": through symmetric memory. Each rank's partial product lies in a buffer that every other rank of the
  group maps into its own address space; PyTorch's two-shot kernel has every rank sum 1/n of the elements, reading
  the peers' partials directly over NVLink, and write its sums to every rank (the ranks synchronise through signal
  pads before reading and after). The layer writes its GEMM output straight into the buffer (`buffer_for`), so the
  partial is not copied. Faster than NCCL on 2 GPUs for messages of a few to tens of MB, the same at 100 MB. It is
  not the default: it has run far less than NCCL. The measurements, and why PyTorch's one-shot kernel is not
  offered: docs/parallel.md, "Why the thresholds are what they are".

The symmetric buffer grows to the largest message seen. Growing is collective (a rendezvous), which is safe
because the ranks of a tensor-parallel group run the same layers on the same shapes in the same order; it cannot
happen inside a CUDA graph capture, so a message larger than the buffer during a capture goes through NCCL (the
engine's eager warm-up at the same shape has grown it by then).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist

from ditserve.parallel.symmetric import symmetric_buffer

ALL_REDUCE_METHODS = ("nccl", "two-shot")
# PyTorch's symmetric-memory kernels take these dtypes, in vectors of up to 16 bytes.
_SYMMETRIC_DTYPES = (torch.bfloat16, torch.float32)


def _fits_kernels(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> bool:
    return dtype in _SYMMETRIC_DTYPES and math.prod(shape) * dtype.itemsize % 16 == 0


class NcclAllReduce:
    """The process group's own all-reduce (NCCL's on GPUs, gloo's on the CPU), in place."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(y, group=self.group)
        return y


class SymmetricAllReduce:
    """A sum over `group` through symmetric memory, by PyTorch's two-shot kernel."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.fallback = NcclAllReduce(group)  # for what the kernel does not take
        self.name = group.group_name
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        # The view handed out by buffer_for, until its all-reduce. Held weakly: a product dropped before its sum (an
        # exception mid-forward) frees the buffer with it, instead of keeping every later sum off the buffer.
        self._claim: weakref.ref[torch.Tensor] | None = None

    @property
    def claimed(self) -> torch.Tensor | None:
        return self._claim() if self._claim is not None else None

    def _buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            if torch.cuda.is_current_stream_capturing():
                return None
            grown_from = buffer.numel() if buffer is not None else 0
            self.buffers.pop(dtype, None)
            buffer, _ = symmetric_buffer(numel, dtype, device, self.group, grown_from)
            self.buffers[dtype] = buffer
        return buffer

    # Both entry points keep state between calls (the claimed view), which torch.compile must not trace into.
    @torch.compiler.disable
    def buffer_for(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """A tensor of `shape` in this rank's symmetric buffer, for a product about to be all-reduced: writing the
        product there saves copying it in. None while another claimed view awaits its all-reduce."""
        if self.claimed is not None or not _fits_kernels(shape, dtype):
            return None
        numel = math.prod(shape)
        buffer = self._buffer(numel, dtype, device)
        if buffer is None:
            return None
        claimed = buffer[:numel].view(shape)
        self._claim = weakref.ref(claimed)
        return claimed

    @torch.compiler.disable
    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        claimed = self.claimed
        if claimed is not None and claimed.data_ptr() == y.data_ptr() and claimed.shape == y.shape:
            # The peers read this buffer: the sum goes elsewhere.
            self._claim = None
            source, out = claimed, torch.empty_like(y)
        elif claimed is not None:
            # Another product lies in the buffer, waiting for its own sum (two sums finished in the other order than
            # they were started): copying this one in would overwrite it.
            return self.fallback(y)
        else:
            buffer = self._buffer(y.numel(), y.dtype, y.device) if _fits_kernels(y.shape, y.dtype) else None
            if buffer is None:  # a dtype or size the kernels don't take, or larger than the buffer in a capture
                return self.fallback(y)
            source, out = buffer[: y.numel()].view(y.shape), y  # in place, as dist.all_reduce
            source.copy_(y)
        torch.ops.symm_mem.two_shot_all_reduce_out(source, "sum", self.name, out)
        return out


def make_all_reduce(group: dist.ProcessGroup, method: str) -> NcclAllReduce | SymmetricAllReduce:
    """The all-reduce for a tensor-parallel group, by method (see the module docstring)."""
    if method not in ALL_REDUCE_METHODS:
        raise ValueError(f"tp_all_reduce {method!r} is not one of {', '.join(ALL_REDUCE_METHODS)}")
    if method == "nccl":
        return NcclAllReduce(group)
    if dist.get_backend(group) != "nccl":
        raise ValueError(f"tp_all_reduce {method!r} needs CUDA GPUs with NCCL")
    return SymmetricAllReduce(group)
