"""Regional torch.compile: each repeated block is compiled, not the whole model.

Blocks of one class share compiled code (parameters are graph inputs), so compile time is that of one double-
and one single-stream block, not of 57, and a new image size recompiles blocks only.
"""

from __future__ import annotations

from torch import nn


def compile_repeated_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    # Sequence-parallel attention runs collectives that dynamo does not trace: it is left out of the graph
    # (torch.compiler.disable), so those blocks compile as two graphs around it instead of one.
    from ditserve.parallel.sequence import SequenceParallelAttention

    split = any(isinstance(m, SequenceParallelAttention) for m in model.modules())
    for block in model.repeated_blocks():  # type: ignore[operator]
        block.compile(fullgraph=not split, dynamic=False, mode=mode)
    return model
