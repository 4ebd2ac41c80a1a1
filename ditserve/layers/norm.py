"""Normalisations used by DiTs. The fused forms dispatch to Triton kernels on CUDA (ditserve.kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fp8_quant import QuantizedRows
from ditserve.kernels.fused_norm import (
    layer_norm_affine,
    layer_norm_modulate,
    residual_layer_norm_affine,
    rms_norm_across_heads_rope_into,
    rms_norm_rope_into,
    rms_norm_scale,
)
from ditserve.kernels.fused_residual import gated_rms_residual
from ditserve.layers.linear import ShapeMismatchError
from ditserve.parallel.state import tp_group

__all__ = ["FP32LayerNorm", "HeadsRMSNorm", "QKNorm", "RMSNorm", "layer_norm_modulate"]


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
        joint: QKNorm | None = None,
    ) -> None:
        """q_out/k_out[:, seq_offset : seq_offset + S] = rope(norm(q/k)); outputs are joint [B, S_total, H, D]
        (or `FP8Heads`, see `Attention.input_buffers`). `joint`: the other stream's norm writing the same joint
        outputs, whose weights bound them too (`rms_norm_rope_into`)."""
        joint_q, joint_k = (joint.norm_q.weight, joint.norm_k.weight) if joint is not None else (None, None)
        rms_norm_rope_into(q_out, q, self.norm_q.weight, self.norm_q.eps, *rope, seq_offset, joint_q)
        rms_norm_rope_into(k_out, k, self.norm_k.weight, self.norm_k.eps, *rope, seq_offset, joint_k)


class FP32LayerNorm(nn.Module):
    """LayerNorm with a learned scale and bias, computed in float32 whatever the activations' dtype (the result is
    float32), as diffusers' FP32LayerNorm (Wan's cross-attention norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)

    def rounded(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor | QuantizedRows:
        """forward(x) rounded to x's dtype, as the next layer takes it: one fused pass on CUDA; `quantize`: its rows
        quantised for the FP8 linear that reads them (`LinearBase.takes_quantized_input`)."""
        return layer_norm_affine(x, self.weight, self.bias, self.eps, quantize)

    def rounded_after_residual(
        self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None, quantize: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | QuantizedRows]:
        """(r, rounded(r)) for the residual stream r = x + (gate[:, None] ·) y rounded to x's dtype: the add and the
        norm in one pass on CUDA, r written once and not read back."""
        return residual_layer_norm_affine(x, y, gate, self.weight, self.bias, self.eps, quantize)


class HeadsRMSNorm(nn.Module):
    """One RMS norm over all heads of a token together (Wan's q and k norm over the whole inner width), with a
    learned scale per channel; then, optionally, the rotary embedding per head.

    Under tensor parallelism each rank holds some heads: its scale is its share of the checkpoint's (loaded by
    `weight_loader`), and the mean square is summed over the ranks, so the result is the unsharded one."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.tp = tp_group()
        if width % self.tp.size:
            raise ValueError(f"width {width} is not divisible by the tensor-parallel size ({self.tp.size})")
        self.eps = eps
        self.width = width  # unsharded
        self.weight = nn.Parameter(torch.empty(width // self.tp.size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if tuple(loaded.shape) != (self.width,):
            raise ShapeMismatchError(
                f"weight: checkpoint has shape {tuple(loaded.shape)}, model expects ({self.width},)"
            )
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

    def _reduce(self):
        return self.tp.all_reduce if self.tp.size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] (this rank's heads) → normalised, same shape."""
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return self.norm_rope_into(out, x, None)

    def norm_rope_into(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        seq_offset: int = 0,
    ) -> torch.Tensor:
        """out[:, seq_offset : seq_offset + S] = rope(norm(x)); out as `Attention.input_buffers` hands it out."""
        cos, sin = rope if rope is not None else (None, None)
        return rms_norm_across_heads_rope_into(
            out, x, self.weight, self.eps, cos, sin, seq_offset, self._reduce(), self.width
        )
