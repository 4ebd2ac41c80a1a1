"""The tensor-parallel group, the one piece of process-wide state the layers read.

With no group set, every layer behaves as on one device (rank 0 of 1). The multi-GPU work sets a group here once
per process, before models are built, and the parallel linears shard themselves from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1


_TP = TensorParallelGroup()


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    global _TP
    if group is None:
        _TP = TensorParallelGroup()
    else:
        _TP = TensorParallelGroup(group, dist.get_rank(group), dist.get_world_size(group))


def tp_group() -> TensorParallelGroup:
    return _TP
