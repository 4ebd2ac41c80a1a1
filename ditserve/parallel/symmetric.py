"""Symmetric memory (torch.distributed._symmetric_memory) for our collectives, the two-shot all-reduce and the
copy-engine exchange, and the one thing a process must remember about it.

PyTorch's CUDA symmetric memory trades each rendezvous's handles through the group's store, under keys numbered by a
counter that belongs to the process, not to the world (c10d's StoreExchange: "CUDASymmetricMemory/<n>/<rank>").
The ranks of a world line up only if each has made as many rendezvous as the others before:
- the ranks of a torchrun job run one program, so they have;
- the ranks our engine spawns start fresh, and so does the driver at its first multi-GPU engine;
- a driver whose earlier engine made rendezvous is ahead of the fresh ranks it spawns for the next one: its next
  rendezvous waits on keys they never write, and every rank hangs, whatever the groups are named
  (docs/parallel.md).
So every symmetric buffer of ours comes from `symmetric_buffer` here, whose rendezvous are counted, and the engine
keeps a world that it spawns from a process that has made any off symmetric memory (`ParallelConfig.for_fresh_ranks`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_rendezvous_made = 0


def rendezvous_made() -> int:
    """How many symmetric-memory rendezvous this process has made (or tried)."""
    return _rendezvous_made


def symmetric_buffer(
    numel: int, dtype: torch.dtype, device: torch.device, group: dist.ProcessGroup, grown_from: int = 0
) -> tuple[torch.Tensor, object]:
    """A flat tensor of at least `numel` elements in symmetric memory, mapped by every rank of `group`, and its
    rendezvous handle. Collective: the ranks of `group` call it alike. `grown_from`: the elements of the buffer
    (same dtype) it replaces, grown too small; the new one is at least twice that, so that a few distinct sizes
    don't each cost a rendezvous."""
    global _rendezvous_made
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(max(numel, 2 * grown_from), dtype=dtype, device=device)
    _rendezvous_made += 1  # before the call: one that fails may have moved PyTorch's counter all the same
    return buffer, symm_mem.rendezvous(buffer, group)
