"""Regional torch.compile: each repeated block is compiled, not the whole model.

Blocks of one class share compiled code (parameters are graph inputs), so compile time is that of one double-
and one single-stream block, not of 57, and a new image size recompiles blocks only.
"""

from __future__ import annotations

from torch import nn


def compile_repeated_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    # Sequence-parallel attention and the symmetric-memory all-reduce run work that dynamo does not trace: they are
    # left out of the graph (torch.compiler.disable), so those blocks compile as several graphs around them.
    from ditserve.parallel.reduce import SymmetricAllReduce
    from ditserve.parallel.sequence import SequenceParallelAttention
    from ditserve.parallel.state import tp_group

    split = isinstance(tp_group().all_reduce, SymmetricAllReduce) or any(
        isinstance(m, SequenceParallelAttention) for m in model.modules()
    )
    for block in model.repeated_blocks():  # type: ignore[operator]
        block.compile(fullgraph=not split, dynamic=False, mode=mode)
    return model
