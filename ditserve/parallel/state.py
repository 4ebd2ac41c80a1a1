"""The tensor-parallel group, the one piece of process-wide state the layers read.

With no group set, every layer behaves as on one device (rank 0 of 1). The multi-GPU work sets a group here once
per process, before models are built, and the parallel linears shard themselves from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditserve.parallel.reduce import SymmetricAllReduce, make_all_reduce


@dataclass(frozen=True)
class TensorParallelGroup:
    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1
    # Sums a partial result over the group (the tensor given may be updated in place): see parallel/reduce.py.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda y: y

    def buffer_for(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Where to write a product that all_reduce will sum, when the reduction has a place for it (else None)."""
        if isinstance(self.all_reduce, SymmetricAllReduce):
            return self.all_reduce.buffer_for(shape, dtype, device)
        return None


_TP = TensorParallelGroup()


def set_tensor_parallel_group(group: dist.ProcessGroup | None, all_reduce: str = "nccl") -> None:
    """Set (or with None clear) the group; `all_reduce` is how partial sums are added (see parallel/reduce.py)."""
    global _TP
    if group is None:
        _TP = TensorParallelGroup()
    else:
        _TP = TensorParallelGroup(
            group, dist.get_rank(group), dist.get_world_size(group), make_all_reduce(group, all_reduce)
        )


def tp_group() -> TensorParallelGroup:
    return _TP
