"""Per-row (per-token) quantisation to float8 e4m3, beside the torch reference it is tested against.

FP8 linears quantise their input on every call: each row x gets the scale amax(|x|) / 448 (448 is e4m3's largest
finite value) and is stored as x / scale in e4m3. In torch that is four passes over the activation (abs, amax,
divide, cast); the kernel reads each row once and writes the e4m3 row and its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditserve.kernels.dispatch import use_triton as _use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# The smallest scale: an all-zero row quantises to zeros instead of dividing by zero.
MIN_SCALE = 1e-12


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps values of at most `amax` onto e4m3's range (amax / 448, at least MIN_SCALE)."""
    return (amax / FP8_MAX).clamp(min=MIN_SCALE)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (clamped to its range): the rounding every FP8 reference here does."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


@dataclass(frozen=True)
class QuantizedRows:
    """An activation already quantised per row for an FP8 linear by the kernel that produced it (a LayerNorm, GELU:
    `quantize=True`), as `quantize_rows` would, from float32, so that the linear skips its own quantising pass.
    data e4m3 [..., K] contiguous, scale float32 [rows, 1], dtype the activation's (the product's output dtype)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self) -> torch.Tensor:
        rows = self.data.reshape(-1, self.data.shape[-1]).float() * self.scale
        return rows.view(self.data.shape).to(self.dtype)


def quantized(x: torch.Tensor) -> QuantizedRows:
    """x [..., K] quantised per row: what a producer whose kernel cannot run hands an FP8 linear instead."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q, scale = quantize_rows(rows)
    return QuantizedRows(q.view(x.shape), scale, x.dtype)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (e4m3 [M, K], float32 scales [M, 1]) with x ≈ q · scale, each row scaled to e4m3's range."""
    xf = x.float()
    scale = fp8_scale(xf.abs().amax(dim=-1, keepdim=True))
    return to_fp8(xf, scale), scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, cols, x_stride, q_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * q_stride + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_reference` in one pass per row (Triton) where it can run; x [M, K] with unit column stride."""
    if not _use_triton(x) or x.dim() != 2 or x.stride(-1) != 1 or x.shape[-1] > 32768:
        return quantize_rows_reference(x)
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        _quantize_rows_kernel[(rows,)](
            x, q, scale, cols, x.stride(0), q.stride(0), BLOCK=block, num_warps=8 if block >= 4096 else 4
        )
    return q, scale


__all__ = ["FP8", "FP8_MAX", "QuantizedRows", "quantize_rows", "quantize_rows_reference", "quantized"]
