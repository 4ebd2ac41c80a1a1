"""Gated residual add, x + gate · y with a per-sample gate [B, D], beside its torch reference.

Eager torch runs this as a broadcasting multiply and an add (two passes, an extra temporary); `torch.addcmul`
is one pass but its broadcast path is not vectorised (measured 6 ms per FLUX.1 forward at 1024² on H200). This
kernel reads x and y once with 16-byte accesses and writes the sum once.
"""

from __future__ import annotations

import torch

from ditserve.kernels.fused_norm import _use_triton, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gated_residual_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, seq_len, dim, gate_batch_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < dim
        batch = row // seq_len
        x = tl.load(x_ptr + row * dim + col, mask=mask).to(tl.float32)
        y = tl.load(y_ptr + row * dim + col, mask=mask).to(tl.float32)
        gate = tl.load(gate_ptr + batch * gate_batch_stride + col, mask=mask).to(tl.float32)
        tl.store(out_ptr + row * dim + col, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate[:, None] * y


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None] · y for x, y [B, S, D] and gate [B, D]."""
    if not (_use_triton(x) and x.is_contiguous() and y.is_contiguous() and gate.stride(-1) == 1):
        return gated_residual_reference(x, gate, y)
    b, s, d = x.shape
    out = torch.empty_like(x)
    block = 1024
    _gated_residual_kernel[(b * s, triton.cdiv(d, block))](x, gate, y, out, s, d, gate.stride(0), BLOCK=block)
    return out
