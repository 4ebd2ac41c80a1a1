"""Adaptive-norm modulation: the conditioning vector predicts per-channel shift, scale and gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.layers.linear import ReplicatedLinear


class Modulation(nn.Module):
    """silu(c) → linear → `chunks` vectors of width `dim`, each [B, dim]."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = ReplicatedLinear(dim, chunks * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.chunks, dim=-1)
