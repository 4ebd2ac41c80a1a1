"""GELU (tanh approximation) over rows of a strided view, beside its torch reference.

FLUX's single-stream blocks apply GELU to the MLP columns of one fused projection [q | k | v | mlp]: a view whose
rows are strided. torch's elementwise kernel takes such a view one element at a time, with index arithmetic per
element (measured 331 µs per block at 2048² on half an H200's tokens, 0.6 TB/s). This kernel reads each row with
16-byte accesses and writes a contiguous output, which is also the layout the following GEMM reads best. Before
an FP8 linear it can write its rows quantised for it instead (`quantize=True`), saving that linear a pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditserve.kernels.fp8_quant import FP8, QuantizedRows, quantized
from ditserve.kernels.fused_norm import _use_triton, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gelu_tanh_f32(x):
        # As torch computes it, in float32: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), with tanh(u) written as
        # 1 − 2 / (e^{2u} + 1). |u| is capped at 15, where tanh is ±1 in float32 already, so e^{2u} stays finite.
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        return 0.5 * x * (1.0 + tanh)

    @triton.jit
    def _gelu_tanh_rows_kernel(x_ptr, out_ptr, cols, x_row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < cols
        x = tl.load(x_ptr + row * x_row_stride + col, mask=mask).to(tl.float32)
        tl.store(out_ptr + row * cols + col, _gelu_tanh_f32(x).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_tanh_quantized_rows_kernel(x_ptr, q_ptr, scale_ptr, cols, x_row_stride, BLOCK: tl.constexpr):
        """GELU quantised per row from float32 (as `quantize_rows`), a whole row per program: not chunks read
        twice as the LayerNorms are, since GELU's arithmetic is not hidden under a second read (1.5× slower at
        Wan's 13,824 columns on an H200; benchmarks/RESULTS.md)."""
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        mask = col < cols
        x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, _gelu_tanh_f32(x), 0.0)
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / 448.0, 1e-12)
        tl.store(q_ptr + row * cols + col, tl.clamp(y / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, cols] with contiguous rows at one stride, or None when it has no such view."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


# A quantised row is one program's: rows up to this wide (FFN widths are ~14k).
QUANTIZED_MAX_COLS = 32768


def gelu_tanh(x: torch.Tensor, quantize: bool = False) -> torch.Tensor | QuantizedRows:
    """GELU(tanh) of x [..., C]; the result is contiguous. `quantize`: quantised per row for an FP8 linear
    (`QuantizedRows`) in the same pass, from float32 where the kernel runs."""
    rows = _rows(x) if _use_triton(x) else None
    if rows is None or rows.numel() == 0 or (quantize and rows.shape[1] > QUANTIZED_MAX_COLS):
        out = gelu_tanh_reference(x)
        return quantized(out) if quantize else out
    if quantize:
        q = torch.empty(x.shape, dtype=FP8, device=x.device)
        scales = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(rows.shape[1])
        _gelu_tanh_quantized_rows_kernel[(rows.shape[0],)](
            rows, q, scales, rows.shape[1], rows.stride(0), BLOCK=block, num_warps=8 if block >= 4096 else 4
        )
        return QuantizedRows(q, scales, x.dtype)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = 1024
    _gelu_tanh_rows_kernel[(rows.shape[0], triton.cdiv(rows.shape[1], block))](
        rows, out, rows.shape[1], rows.stride(0), BLOCK=block
    )
    return out
