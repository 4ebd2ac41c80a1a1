"""Regional torch.compile: each repeated block is compiled, not the whole model.

Blocks of one class share compiled code (parameters are graph inputs), so compile time is that of one double-
and one single-stream block, not of 57, and a new image size recompiles blocks only.
"""

from __future__ import annotations

from torch import nn


def compile_repeated_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    blocks = model.repeated_blocks()  # type: ignore[operator]
    for block in blocks:
        block.compile(fullgraph=True, dynamic=False, mode=mode)
    return model
