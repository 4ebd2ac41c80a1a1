"""Normalisations used by DiTs. The fused forms dispatch to Triton kernels on CUDA (ditserve.kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fused_norm import layer_norm_modulate, rms_norm_rope_into, rms_norm_scale
from ditserve.kernels.fused_residual import gated_rms_residual

__all__ = ["QKNorm", "RMSNorm", "layer_norm_modulate"]


class RMSNorm(nn.Module):
    """RMS norm over the last dimension with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def scaled(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """self(x) · (1 + scale[:, None]) in one pass; x [B, S, D], scale [B, D]."""
        return rms_norm_scale(x, self.weight, self.eps, scale)

    def residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x + gate[:, None] · self(y) in one pass (x + self(y) without a gate); x, y [B, S, D], gate [B, D]."""
        return gated_rms_residual(x, gate, y, self.weight, self.eps)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys, fused with the rotary embedding that follows it."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)

    def norm_rope_into(
        self,
        q_out: torch.Tensor,
        k_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        seq_offset: int = 0,
    ) -> None:
        """q_out/k_out[:, seq_offset : seq_offset + S] = rope(norm(q/k)); outputs are joint [B, S_total, H, D]."""
        rms_norm_rope_into(q_out, q, self.norm_q.weight, self.norm_q.eps, *rope, seq_offset)
        rms_norm_rope_into(k_out, k, self.norm_k.weight, self.norm_k.eps, *rope, seq_offset)
