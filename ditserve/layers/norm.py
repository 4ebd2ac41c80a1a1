"""Normalisations used by DiTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without learned affine: DiT blocks take scale and shift from the modulation instead."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """RMS norm over the last dimension with a learned scale (QK-norm in attention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
