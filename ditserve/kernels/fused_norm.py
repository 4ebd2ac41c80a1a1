"""Fused norm kernels for DiT blocks, each beside the torch reference it is tested against.

Eager PyTorch runs each elementwise step of these as its own kernel, with float32 temporaries for RoPE: measured
on FLUX.1 at 1024², the QK-norm + RoPE of one block moves about 1.2 GB instead of the 0.1 GB it must. Each kernel
here reads its input once and writes its output once.

- `layer_norm_modulate`: LayerNorm (no affine) then x·(1 + scale) + shift, per-sample [B, D] modulation.
- `layer_norm_affine`: LayerNorm with a learned scale and bias in float32, rounded to the input's dtype (Wan's
  cross-attention norm: in eager torch an upcast copy, the norm and a downcast copy, 20 ms of a 14B forward).
- `rms_norm_scale`: RMS norm with its learned weight, then · (1 + scale), per-sample [B, D] scale (Z-Image's
  modulated block inputs; eager torch's broadcast multiply is not vectorised: H200, 1024², 69 µs → 21 µs).
- `rms_norm_rope_into`: RMS norm over each head, then interleaved-pair rotary embedding, written into a slice of
  a (joint) output sequence, so the concatenation of text and image tokens costs nothing extra.
- `rms_norm_across_heads_rope_into`: the same with one RMS over all heads of a token together (Wan normalises q and
  k over the whole inner width, before splitting heads); under tensor parallelism the mean square is summed over
  the ranks' heads.

The two LayerNorms can also write their rows quantised for an FP8 linear (`quantize=True`: `QuantizedRows`,
quantised from float32, one rounding fewer than writing the rows and quantising them afterwards), which saves that
linear a pass over its input.

The references are what the models ran before these kernels existed; they stay the semantics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditserve.kernels.cudnn_fp8_attention import FP8Heads
from ditserve.kernels.dispatch import use_triton as _use_triton
from ditserve.kernels.fp8_quant import FP8, QuantizedRows, quantized

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references serve
    triton = None


# ---- Row norms: one program per token row of x [B, S, D] ------------------------------------------------------
# The row kernels below share their addressing (rows of x may be strided views, e.g. a slice of a fused
# projection; the output is contiguous) and take (x, out, seq_len, dim, x's batch and sequence strides) first, then
# their own operands.
if triton is not None:

    @triton.jit
    def _x_row_offset(row, seq_len, x_stride_b, x_stride_s):
        """Where row `row` (batch-major over B·S, int64) of a strided x [B, S, D] starts."""
        return (row // seq_len) * x_stride_b + (row % seq_len) * x_stride_s


def _rows_kernel_fits(x: torch.Tensor) -> bool:
    """Whether x can go to a row kernel: Triton in use, [B, S, D] with rows to run and a contiguous last dim."""
    return _use_triton(x) and x.dim() == 3 and x.numel() > 0 and x.stride(-1) == 1


def _launch_per_row(kernel, x: torch.Tensor, *operands) -> torch.Tensor:
    """Run a row kernel over x [B, S, D] (last dim contiguous) into a new contiguous tensor of x's shape/dtype."""
    b, s, d = x.shape
    out = torch.empty((b, s, d), device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(d)
    kernel[(b * s,)](
        x, out, s, d, x.stride(0), x.stride(1), *operands, BLOCK=block, num_warps=8 if block >= 2048 else 4
    )
    return out


# ---- LayerNorms: one program per row, the row read in chunks -------------------------------------------------
# A whole row in registers (BLOCK = the row's width rounded up to a power of two, as the kernels above) leaves few
# programs on an SM, and each waits out its reductions. Here a row is read in chunks, partial sums kept per lane
# (one reduction per statistic), and read again from cache for each later pass: mean, variance, (the quantised
# output's row maximum,) output. The passes are unrolled, so that each issues all its chunks' loads at once (Wan's
# 75,600 × 5,120 quantised: 0.55 against 0.64 ms looping; benchmarks/RESULTS.md, 2026-12-04). Chunks of 1,024 on 4
# warps where there are many rows (Wan: 1.4–1.6× faster than a whole row at 32,760 × 5,120 on an H200), of 2,048 on
# 8 warps where there are few (FLUX's 4,096 × 3,072: as fast as a whole row, where the narrow chunks are slower);
# benchmarks/RESULTS.md, 2026-12-03.
LN_MANY_ROWS = 16384

if triton is not None:

    @triton.jit
    def _row_chunk(x_row, y_row, g_row, cols, mask, RESIDUAL: tl.constexpr):
        """Columns `cols` of the row the norm reads, in float32 (zero where masked): x, or the residual sum x + y
        (RESIDUAL 1) or x + gate·y (RESIDUAL 2) computed in float32 and rounded to x's dtype, as the separate add
        stores it."""
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if RESIDUAL == 0:
            return x.to(tl.float32)
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 2:
            y = y * tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        return (x.to(tl.float32) + y).to(x_row.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _layer_norm_chunk(x, p0_row, p1_row, cols, mask, mean, rstd, MODULATE: tl.constexpr):
        """Columns `cols` of the normalised row (x: those of the row, float32): ·(1 + scale) + shift (MODULATE: p0
        shift, p1 scale) or ·weight + bias (p0 weight, p1 bias); zero where masked."""
        p0 = tl.load(p0_row + cols, mask=mask, other=0.0).to(tl.float32)
        p1 = tl.load(p1_row + cols, mask=mask, other=0.0).to(tl.float32)
        normed = (x - mean) * rstd
        if MODULATE:
            out = normed * (1.0 + p1) + p0
        else:
            out = normed * p0 + p1
        return tl.where(mask, out, 0.0)

    @triton.jit
    def _layer_norm_kernel(
        x_ptr,
        out_ptr,
        seq_len,
        dim,
        x_stride_b,
        x_stride_s,
        p0_ptr,
        p1_ptr,
        p_batch_stride,
        eps,
        row_scales,
        y_ptr,
        gate_ptr,
        gate_batch_stride,
        sum_ptr,
        CHUNK: tl.constexpr,
        CHUNKS: tl.constexpr,
        MODULATE: tl.constexpr,
        QUANT: tl.constexpr,
        RESIDUAL: tl.constexpr,
    ):
        # RESIDUAL: the row normalised is x + (gate ·) y, stored to sum_ptr in the first pass (y and the sum
        # contiguous [B·S, D]) and recomputed from x and y, in cache, by the later passes.
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + _x_row_offset(row, seq_len, x_stride_b, x_stride_s)
        y_row = y_ptr + row * dim
        g_row = gate_ptr + (row // seq_len) * gate_batch_stride
        p0_row = p0_ptr + (row // seq_len) * p_batch_stride
        p1_row = p1_ptr + (row // seq_len) * p_batch_stride
        offs = tl.arange(0, CHUNK)
        total = tl.zeros([CHUNK], dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            cols = c * CHUNK + offs
            x = _row_chunk(x_row, y_row, g_row, cols, cols < dim, RESIDUAL)
            if RESIDUAL != 0:
                tl.store(sum_ptr + row * dim + cols, x.to(sum_ptr.dtype.element_ty), mask=cols < dim)
            total += x
        mean = tl.sum(total, axis=0) / dim
        squares = tl.zeros([CHUNK], dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            cols = c * CHUNK + offs
            mask = cols < dim
            centered = tl.where(mask, _row_chunk(x_row, y_row, g_row, cols, mask, RESIDUAL) - mean, 0.0)
            squares += centered * centered
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / dim + eps)
        out_row = out_ptr + row * dim
        if QUANT:  # e4m3 from float32, scaled by the row's largest value (as `quantize_rows`)
            largest = tl.zeros([CHUNK], dtype=tl.float32)
            for c in tl.static_range(CHUNKS):
                cols = c * CHUNK + offs
                mask = cols < dim
                x = _row_chunk(x_row, y_row, g_row, cols, mask, RESIDUAL)
                out = _layer_norm_chunk(x, p0_row, p1_row, cols, mask, mean, rstd, MODULATE)
                largest = tl.maximum(largest, tl.abs(out))
            scale = tl.maximum(tl.max(largest, axis=0) / 448.0, 1e-12)
            tl.store(row_scales + row, scale)
            for c in tl.static_range(CHUNKS):
                cols = c * CHUNK + offs
                mask = cols < dim
                x = _row_chunk(x_row, y_row, g_row, cols, mask, RESIDUAL)
                out = _layer_norm_chunk(x, p0_row, p1_row, cols, mask, mean, rstd, MODULATE)
                tl.store(out_row + cols, tl.clamp(out / scale, -448.0, 448.0).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            for c in tl.static_range(CHUNKS):
                cols = c * CHUNK + offs
                mask = cols < dim
                x = _row_chunk(x_row, y_row, g_row, cols, mask, RESIDUAL)
                out = _layer_norm_chunk(x, p0_row, p1_row, cols, mask, mean, rstd, MODULATE)
                tl.store(out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_layer_norm(
    x: torch.Tensor,
    p0: torch.Tensor,
    p1: torch.Tensor,
    p_batch_stride: int,
    eps: float,
    modulate: bool,
    quantize: bool,
    residual: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor | QuantizedRows | tuple[torch.Tensor, torch.Tensor | QuantizedRows]:
    """`_layer_norm_kernel` over x [B, S, D] (last dim contiguous) into a new contiguous tensor of x's shape and
    dtype, or (quantize) e4m3 rows with their scales. `residual` (y, gate or None): the norm of x + (gate ·) y,
    returned after that sum (a new contiguous tensor of x's shape and dtype)."""
    b, s, d = x.shape
    out = torch.empty((b, s, d), device=x.device, dtype=FP8 if quantize else x.dtype)
    row_scales = torch.empty((b * s, 1), device=x.device, dtype=torch.float32) if quantize else out
    chunk, warps = (1024, 4) if b * s >= LN_MANY_ROWS else (2048, 8)
    chunk = min(chunk, triton.next_power_of_2(d))
    if residual is None:
        kind, y, gate, gate_stride, total = 0, x, x, 0, x
    else:
        y, gate = residual
        kind, gate_stride = (1, 0) if gate is None else (2, gate.stride(0))
        gate = y if gate is None else gate
        total = torch.empty((b, s, d), device=x.device, dtype=x.dtype)
    _layer_norm_kernel[(b * s,)](
        x, out, s, d, x.stride(0), x.stride(1), p0, p1, p_batch_stride, eps, row_scales, y, gate, gate_stride, total,
        CHUNK=chunk, CHUNKS=triton.cdiv(d, chunk), MODULATE=modulate, QUANT=quantize, RESIDUAL=kind,
        num_warps=warps,
    )  # fmt: skip
    normed = QuantizedRows(out, row_scales, x.dtype) if quantize else out
    return normed if residual is None else (total, normed)


# LayerNorm + modulation
def layer_norm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, quantize: bool = False
) -> torch.Tensor | QuantizedRows:
    """LayerNorm(x) · (1 + scale) + shift; x [B, S, D] (rows may be strided), shift and scale [B, D]. `quantize`:
    the result quantised per row for an FP8 linear in the same pass (from float32 where the kernel runs; the torch
    fallback quantises it rounded to x's dtype)."""
    usable = (
        _rows_kernel_fits(x) and shift.stride(-1) == 1 and scale.stride(-1) == 1 and shift.stride(0) == scale.stride(0)
    )
    if not usable:
        out = layer_norm_modulate_reference(x, shift, scale, eps)
        return quantized(out.to(x.dtype)) if quantize else out
    return _launch_layer_norm(x, shift, scale, shift.stride(0), eps, True, quantize)


# LayerNorm with scale and bias, in float32
def layer_norm_affine_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def layer_norm_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, quantize: bool = False
) -> torch.Tensor | QuantizedRows:
    """LayerNorm(x) · weight + bias computed in float32, in x's dtype; x [B, S, D] (rows may be strided), weight
    and bias [D]. `quantize`: quantised per row for an FP8 linear, in the same pass."""
    usable = (
        _rows_kernel_fits(x)
        and weight.is_contiguous()
        and bias.is_contiguous()
        and weight.shape == bias.shape == (x.shape[-1],)
    )
    if not usable:
        out = layer_norm_affine_reference(x, weight, bias, eps)
        return quantized(out) if quantize else out
    return _launch_layer_norm(x, weight, bias, 0, eps, False, quantize)


# The residual add before a LayerNorm, in the norm's pass
def residual_sum_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """x + y, or x + gate[:, None] · y, computed in float32 and rounded to x's dtype."""
    branch = y.float() if gate is None else gate[:, None].float() * y.float()
    return (x.float() + branch).to(x.dtype)


def _residual_fits(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> bool:
    return (
        _rows_kernel_fits(x)
        and y.shape == x.shape
        and y.is_contiguous()
        and (gate is None or (gate.dim() == 2 and gate.shape == (x.shape[0], x.shape[2]) and gate.stride(-1) == 1))
    )


def residual_layer_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | QuantizedRows]:
    """(r, layer_norm_modulate(r)) for r = x + (gate ·) y (`residual_sum_reference`): the residual stream after a
    branch's output is added, and the next norm of it, in one pass where the kernel runs (r is written once and
    not read back). The norm's output in x's dtype, or quantised as `layer_norm_modulate`'s."""
    if (
        _residual_fits(x, y, gate)
        and shift.stride(-1) == 1
        and scale.stride(-1) == 1
        and shift.stride(0) == scale.stride(0)
    ):
        return _launch_layer_norm(x, shift, scale, shift.stride(0), eps, True, quantize, (y, gate))
    total = residual_sum_reference(x, y, gate)
    out = layer_norm_modulate(total, shift, scale, eps, quantize)
    return total, out if quantize else out.to(x.dtype)


def residual_layer_norm_affine(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | QuantizedRows]:
    """(r, layer_norm_affine(r)) for r = x + (gate ·) y, in one pass where the kernel runs."""
    if (
        _residual_fits(x, y, gate)
        and weight.is_contiguous()
        and bias.is_contiguous()
        and weight.shape == bias.shape == (x.shape[-1],)
    ):
        return _launch_layer_norm(x, weight, bias, 0, eps, False, quantize, (y, gate))
    total = residual_sum_reference(x, y, gate)
    return total, layer_norm_affine(total, weight, bias, eps, quantize)


# RMS norm + scale
def rms_norm_scale_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps) * (1.0 + scale)[:, None]


if triton is not None:

    @triton.jit
    def _rms_norm_scale_kernel(
        x_ptr,
        out_ptr,
        seq_len,
        dim,
        x_stride_b,
        x_stride_s,
        w_ptr,
        scale_ptr,
        scale_batch_stride,
        eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        batch = row // seq_len
        offs = tl.arange(0, BLOCK)
        mask = offs < dim
        # Every load is issued before the reduction waits on x: one memory round trip per row, not two.
        x = tl.load(
            x_ptr + _x_row_offset(row, seq_len, x_stride_b, x_stride_s) + offs,
            mask=mask,
            other=0.0,
            eviction_policy="evict_first",
        )
        w = tl.load(w_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last")
        scale = tl.load(
            scale_ptr + batch * scale_batch_stride + offs, mask=mask, other=0.0, eviction_policy="evict_last"
        )
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
        w = w.to(tl.float32)
        scale = scale.to(tl.float32)
        # Rounded where the reference rounds: the norm's output and 1 + scale are tensors of the activation dtype
        # there, and their product is rounded once more.
        dtype = out_ptr.dtype.element_ty
        normed = (x * rstd * w).to(dtype).to(tl.float32)
        out = normed * (1.0 + scale).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * dim + offs, out.to(dtype), mask=mask)


def rms_norm_scale(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: torch.Tensor) -> torch.Tensor:
    """rms_norm(x) · weight · (1 + scale[:, None]); x [B, S, D] (rows may be strided), weight [D], scale [B, D]."""
    usable = (
        _rows_kernel_fits(x)
        and scale.shape == (x.shape[0], x.shape[2])
        and weight.is_contiguous()
        and scale.stride(-1) == 1
        and weight.dtype == x.dtype
        and scale.dtype == x.dtype
    )
    if not usable:
        return rms_norm_scale_reference(x, weight, eps, scale)
    return _launch_per_row(_rms_norm_scale_kernel, x, weight, scale, scale.stride(0), eps)


# ---- RMS norm per head + rotary embedding -----------------------------------------------------------------------
# Written in e4m3 for cuDNN's FP8 attention (`FP8Heads`), the result needs no pass to find its largest value: a
# token's normed values square-sum to at most the norm's width W (x / rms(x) before the weight γ), so each is at most
# √W · max |γ|, and the rotation keeps each pair's length, so its parts stay below it too. With descale = √W · max |γ|
# / 448 nothing overflows, and typical values (about |γ|) land √W below e4m3's largest value, far above its smallest
# normal one (2¹⁵ below it): e4m3's rounding stays relative (2⁻⁴), as with a scale from the actual maximum. Where
# two norms write one tensor (a joint [text, image] sequence), both use the larger bound of the two.
def fp8_heads_descale_reference(weights: list[torch.Tensor], width: int) -> torch.Tensor:
    """The descale a norm writing FP8 heads uses: √width · max |γ| over the weights writing the tensor, / 448."""
    top = torch.stack([w.float().abs().amax() for w in weights]).amax()
    return (top * math.sqrt(width) / 448.0).clamp(min=1e-12)


def _fp8_heads_reference(heads: FP8Heads, y: torch.Tensor, weights: list[torch.Tensor], width: int) -> torch.Tensor:
    """The torch path's e4m3 write: stores the descale in `heads` and returns y scaled into e4m3's range."""
    descale = fp8_heads_descale_reference(weights, width)
    heads.descale.copy_(descale.view(1))
    return (y.float() / descale).clamp(-448.0, 448.0)


if triton is not None:

    @triton.jit
    def _bounded_descale(top, descale_ptr, token, width):
        """The descale of `fp8_heads_descale_reference` from top = max |γ|; the first token stores it."""
        descale = tl.maximum(top * tl.sqrt(width * 1.0) / 448.0, 1e-12)
        if token == 0:
            tl.store(descale_ptr, descale)
        return descale

    @triton.jit
    def _quantize_bounded(out, w, joint_w_ptrs, descale_ptr, token, width, JOINT: tl.constexpr):
        """out / descale in e4m3's range (see `fp8_heads_descale_reference`; w: the norm's weight as loaded, width:
        the norm's); the first token stores descale."""
        top = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
        if JOINT:
            top = tl.maximum(top, tl.max(tl.max(tl.abs(tl.load(joint_w_ptrs).to(tl.float32)), axis=1), axis=0))
        descale = _bounded_descale(top, descale_ptr, token, width)
        return tl.clamp(out * (1.0 / descale), -448.0, 448.0)  # one division a token, not one a value


def rms_norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RMS-normalise each head of x [B, S, H, D], then rotate interleaved pairs by cos/sin [S, D] (float32)."""
    from ditserve.layers.rotary import apply_rope

    return apply_rope(F.rms_norm(x, (x.shape[-1],), weight, eps), cos, sin)


if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        seq_len,
        heads,
        seq_offset,
        x_stride_b,
        x_stride_s,
        x_stride_h,
        o_stride_b,
        o_stride_s,
        o_stride_g1,
        o_stride_g2,
        o_stride_h,
        group2,
        per_group,
        eps,
        descale_ptr,
        joint_w_ptr,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        QUANT: tl.constexpr,
        JOINT: tl.constexpr,
    ):
        # One program per token: a [heads, D] tile loaded with contiguous (vectorised) rows; the interleaved
        # pairs are separated in registers (reshape + split) rather than by strided loads.
        token = tl.program_id(0)
        b = token // seq_len
        s = token % seq_len
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = h < heads
        x = tl.load(x_ptr + b * x_stride_b + s * x_stride_s + h * x_stride_h + d, mask=mask, other=0.0)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + d).to(tl.float32)
        # Round the normed values to the activation dtype, as the reference's separate norm does.
        y = (x * rstd * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        pos = (seq_offset + s) * D  # row of the [S_total, D] cos/sin tables
        cos = tl.load(cos_ptr + pos + d)
        sin = tl.load(sin_ptr + pos + d)
        y_even, y_odd = tl.split(tl.reshape(y, (BLOCK_H, D // 2, 2)))
        rotated = tl.reshape(tl.join(-y_odd, y_even), (BLOCK_H, D))  # (x0, x1) → (-x1, x0) per pair
        out = y * cos + rotated * sin
        if QUANT:
            out = _quantize_bounded(out, w, joint_w_ptr + d, descale_ptr, token, D, JOINT)
        # Output heads may lie in groups (head = (g1 · group2 + g2) · per_group + i), as in a message per rank.
        head = (h // (group2 * per_group)) * o_stride_g1 + ((h // per_group) % group2) * o_stride_g2
        head += (h % per_group) * o_stride_h
        o_ptrs = out_ptr + b * o_stride_b + s * o_stride_s + head + d
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_rope_into(
    out: torch.Tensor | FP8Heads,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seq_offset: int = 0,
    joint_weight: torch.Tensor | None = None,
) -> torch.Tensor | FP8Heads:
    """out[:, seq_offset : seq_offset + S] = rope(rms_norm(x)), positions taken from cos/sin rows seq_offset + s.

    x [B, S, H, D] may be a strided view (a part of a fused QKV output); `out` is the joint [B, S_total, H, D],
    or [B, S_total, *groups, h, D] with up to three head dimensions (H = their product, in order) when the heads
    lie in groups elsewhere in memory (sequence parallelism's message to each rank). `out` as `FP8Heads`: written
    in e4m3 with the descale `fp8_heads_descale_reference` gives for this norm's weight and `joint_weight` (the
    other norm writing the same joint tensor, if any).
    """
    b, s, h, d = x.shape
    quant = isinstance(out, FP8Heads)
    target = (out.data if quant else out)[:, seq_offset : seq_offset + s]
    head_dims = list(target.shape[2:-1])
    if math.prod(head_dims) != h or not 1 <= len(head_dims) <= 3:
        raise ValueError(f"output heads {head_dims} do not hold the input's {h} heads")
    usable = (
        _use_triton(x)
        and x.stride(-1) == 1
        and target.stride(-1) == 1
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.dtype == torch.float32
        and d >= 4
        and d & (d - 1) == 0  # power-of-two head width (FLUX: 128; tiny test models: 16, 32)
    )
    if not usable:
        ref = rms_norm_rope_reference(
            x, weight, eps, cos[seq_offset : seq_offset + s], sin[seq_offset : seq_offset + s]
        )
        if quant:
            ref = _fp8_heads_reference(out, ref, [weight] + ([joint_weight] if joint_weight is not None else []), d)
        target.copy_(ref.reshape(target.shape))
        return out
    pad = 3 - len(head_dims)
    head_strides = [0] * pad + [target.stride(i) for i in range(2, target.dim() - 1)]
    head_sizes = [1] * pad + head_dims
    _rms_norm_rope_kernel[(b * s,)](
        x,
        weight,
        cos,
        sin,
        target,
        s,
        h,
        seq_offset,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        target.stride(0),
        target.stride(1),
        *head_strides,
        head_sizes[1],
        head_sizes[2],
        eps,
        out.descale if quant else x,
        joint_weight if joint_weight is not None else weight,
        D=d,
        BLOCK_H=triton.next_power_of_2(h),
        QUANT=quant,
        JOINT=quant and joint_weight is not None,
        num_warps=4,
    )
    return out


# ---- RMS norm across all heads + rotary embedding (Wan) ---------------------------------------------------------
def rms_norm_across_heads_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, reduce=None, total_width: int | None = None
) -> torch.Tensor:
    """RMS-normalise each token of x [B, S, H, D] over all its heads at once (weight [H·D]), as torch.nn.RMSNorm
    over the flat inner width does. With `reduce` (a sum over tensor-parallel ranks, each holding some heads of the
    `total_width`-wide inner dimension), the mean square is taken over every rank's heads."""
    flat = x.reshape(*x.shape[:2], -1)
    if reduce is None:
        return F.rms_norm(flat, (flat.shape[-1],), weight, eps).view(x.shape)
    # torch's own composite: the mean square in float32, the normalised value rounded, then the scale.
    xf = flat.float()
    square_sum = reduce(xf.square().sum(-1, keepdim=True))
    normed = (xf * torch.rsqrt(square_sum / (total_width or flat.shape[-1]) + eps)).to(x.dtype)
    return (normed * weight).view(x.shape)


if triton is not None:

    @triton.jit
    def _rms_norm_across_heads_rope_kernel(
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        square_sum_ptr,
        out_ptr,
        seq_len,
        heads,
        seq_offset,
        x_stride_b,
        x_stride_s,
        x_stride_h,
        o_stride_b,
        o_stride_s,
        o_stride_g1,
        o_stride_g2,
        o_stride_h,
        group2,
        per_group,
        width,
        eps,
        descale_ptr,
        D: tl.constexpr,
        CHUNK_H: tl.constexpr,
        CHUNKS: tl.constexpr,
        ROPE: tl.constexpr,
        GIVEN_SQUARE_SUM: tl.constexpr,
        QUANT: tl.constexpr,
    ):
        # One program per token, one mean square over all its heads (or over every rank's heads: then summed
        # beforehand and given per token). The heads are taken CHUNK_H at a time in two unrolled passes, the
        # second reading them again from cache: every load of a pass is in flight at once and a program holds
        # a chunk, not the whole token, so many programs share an SM (Wan's 40 × 128: 1.5× faster than the
        # whole token as one [64, 128] tile on an H200; benchmarks/RESULTS.md).
        token = tl.program_id(0)
        b = token // seq_len
        s = token % seq_len
        hc = tl.arange(0, CHUNK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        x_token = x_ptr + b * x_stride_b + s * x_stride_s
        squares = tl.zeros([CHUNK_H, D], dtype=tl.float32)
        top = 0.0
        for c in tl.static_range(CHUNKS):
            h = c * CHUNK_H + hc
            if not GIVEN_SQUARE_SUM:
                x = tl.load(x_token + h * x_stride_h + d, mask=h < heads, other=0.0).to(tl.float32)
                squares += x * x
            if QUANT:
                w = tl.load(w_ptr + h * D + d, mask=h < heads, other=0.0).to(tl.float32)
                top = tl.maximum(top, tl.max(tl.max(tl.abs(w), axis=1), axis=0))
        if GIVEN_SQUARE_SUM:
            square_sum = tl.load(square_sum_ptr + token)
        else:
            square_sum = tl.sum(tl.sum(squares, axis=1), axis=0)
        rstd = tl.rsqrt(square_sum / width + eps)
        if QUANT:  # this rank's heads, bounded by the whole width's norm (see `fp8_heads_descale_reference`)
            inverse_descale = 1.0 / _bounded_descale(top, descale_ptr, token, width)
        if ROPE:
            pos = (seq_offset + s) * D
            cos = tl.load(cos_ptr + pos + d)
            sin = tl.load(sin_ptr + pos + d)
        out_token = out_ptr + b * o_stride_b + (seq_offset + s) * o_stride_s
        for c in tl.static_range(CHUNKS):
            h = c * CHUNK_H + hc
            mask = h < heads
            x = tl.load(x_token + h * x_stride_h + d, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + h * D + d, mask=mask, other=0.0).to(tl.float32)
            # Rounded to the activation dtype, as the reference's separate norm is, before the rotation.
            y = (x * rstd * w).to(x_ptr.dtype.element_ty).to(tl.float32)
            if ROPE:
                y_even, y_odd = tl.split(tl.reshape(y, (CHUNK_H, D // 2, 2)))
                rotated = tl.reshape(tl.join(-y_odd, y_even), (CHUNK_H, D))
                y = y * cos + rotated * sin
            if QUANT:
                y = tl.clamp(y * inverse_descale, -448.0, 448.0)
            head = (h // (group2 * per_group)) * o_stride_g1 + ((h // per_group) % group2) * o_stride_g2
            head += (h % per_group) * o_stride_h
            tl.store(out_token + head + d, y.to(out_ptr.dtype.element_ty), mask=mask)


# Token counts from which the heads are taken in chunks (below: the whole token as one tile)
ACROSS_HEADS_MANY_TOKENS = LN_MANY_ROWS


def rms_norm_across_heads_rope_into(
    out: torch.Tensor | FP8Heads,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    seq_offset: int = 0,
    reduce=None,
    total_width: int | None = None,
) -> torch.Tensor | FP8Heads:
    """out[:, seq_offset : seq_offset + S] = rope(rms_norm_across_heads(x)); cos/sin None: no rotation.

    Shapes as `rms_norm_rope_into`: x [B, S, H, D] (a strided view is fine), out [B, S_total, H, D] or with the
    heads in up to three groups; out as `FP8Heads`: in e4m3 as there (the bound: this rank's weight, the whole
    width). `reduce` and `total_width` as `rms_norm_across_heads_reference`."""
    from ditserve.layers.rotary import apply_rope

    b, s, h, d = x.shape
    quant = isinstance(out, FP8Heads)
    whole = out
    out = out.data if quant else out
    target = out[:, seq_offset : seq_offset + s]
    head_dims = list(target.shape[2:-1])
    if math.prod(head_dims) != h or not 1 <= len(head_dims) <= 3:
        raise ValueError(f"output heads {head_dims} do not hold the input's {h} heads")
    rope = cos is not None
    usable = (
        _use_triton(x)
        and x.stride(-1) == 1
        and target.stride(-1) == 1
        and weight.is_contiguous()
        and (not rope or (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32))
        and d >= 4
        and d & (d - 1) == 0
    )
    if not usable:
        y = rms_norm_across_heads_reference(x, weight, eps, reduce, total_width)
        if rope:
            y = apply_rope(y, cos[seq_offset : seq_offset + s], sin[seq_offset : seq_offset + s])
        if quant:
            y = _fp8_heads_reference(whole, y, [weight], total_width or h * d)
        target.copy_(y.reshape(target.shape))
        return whole
    square_sum = None
    if reduce is not None:  # every rank's heads count: the sums of squares are exchanged first
        square_sum = reduce(x.float().square().sum((-2, -1))).contiguous()
    pad = 3 - len(head_dims)
    head_strides = [0] * pad + [out.stride(i) for i in range(2, out.dim() - 1)]
    head_sizes = [1] * pad + head_dims
    # Many tokens: chunks of up to 8 heads (1,024 values at head dim 128) on 4 warps. Few (FLUX-sized sequences of
    # 4,096): the whole token as one chunk, which fills the SMs better there (0.049 against 0.081 ms at 24 × 128).
    all_heads = triton.next_power_of_2(h)
    chunk_h = min(all_heads, max(1, 1024 // d)) if b * s >= ACROSS_HEADS_MANY_TOKENS else all_heads
    warps = 8 if chunk_h * d >= 4096 else 4
    _rms_norm_across_heads_rope_kernel[(b * s,)](
        x,
        weight,
        cos if rope else x,
        sin if rope else x,
        square_sum if square_sum is not None else x,
        out,
        s,
        h,
        seq_offset,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        *head_strides,
        head_sizes[1],
        head_sizes[2],
        total_width or h * d,
        eps,
        whole.descale if quant else x,
        D=d,
        CHUNK_H=chunk_h,
        CHUNKS=triton.cdiv(h, chunk_h),
        ROPE=rope,
        GIVEN_SQUARE_SUM=square_sum is not None,
        QUANT=quant,
        num_warps=warps,
    )
    return whole
