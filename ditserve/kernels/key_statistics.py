"""SLA's linear-branch key statistics in one pass over k and v, beside the torch reference it is tested against.

SLA (layers/sparse_attention.py) needs two reductions over every key of a head before its attention kernel runs:
Σₙ φ(kₙ) vₙᵀ [D, D] and Σₙ φ(kₙ) [D] (φ the softmax over the head dimension, in k's dtype as the published module
computes it). In torch these are a softmax written out in full, a batched matmul and a sum: three passes over
[B, N, H, D] tensors (1.2 ms at Wan 720p, 75,600 tokens × 40 heads; 2.1 ms when k and v are strided views of one
projection, as in the model). Here one kernel reads k and v once: each program takes a chunk of consecutive keys of
one head, forms φ in registers and accumulates φᵀv on the tensor cores (0.8 ms, either layout, on an H200); the
per-chunk partial sums ([B, H, chunks, D, D] float32) are added by one torch reduction after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditserve.kernels.fused_norm import _use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None

KEY_TILE = 64  # keys a step of the kernel reads
TILES_PER_PROGRAM = 32  # steps one program takes: 2,048 keys (timed against 8 and 16 at Wan 720p)
NUM_WARPS, NUM_STAGES = 8, 3


@dataclass(frozen=True)
class KeyStatistics:
    """kv [B, H, D, D] = Σ φ(k) vᵀ and k_sum [B, H, D] = Σ φ(k), float32."""

    kv: torch.Tensor
    k_sum: torch.Tensor


def key_statistics_reference(k: torch.Tensor, v: torch.Tensor) -> KeyStatistics:
    """The statistics of k, v [B, N, H, D] in torch: φ(k) computed in float32 and rounded to k's dtype (as the
    kernel's product operand), the sums in float32."""
    phi = torch.softmax(k.float(), dim=-1).to(k.dtype).float()
    return KeyStatistics(torch.einsum("bnhd,bnhe->bhde", phi, v.float()), phi.sum(1))


if triton is not None:

    @triton.jit
    def _key_statistics_kernel(
        K,
        V,
        KV,
        KSUM,
        heads,
        n,
        skb,
        skn,
        skh,
        svb,
        svn,
        svh,
        D: tl.constexpr,
        KEY_TILE: tl.constexpr,
        PER_PROGRAM: tl.constexpr,
        WIDEN: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        offs_d = tl.arange(0, D)
        rows = tl.arange(0, KEY_TILE)
        acc = tl.zeros([D, D], dtype=tl.float32)
        # φ summed elementwise across the loop and over its rows once at the end: a reduction across the rows
        # (across warps) in every step would stall the loop on shared memory
        phi_sum = tl.zeros([KEY_TILE, D], dtype=tl.float32)
        for i in range(PER_PROGRAM):
            keys = (chunk * PER_PROGRAM + i) * KEY_TILE + rows
            key_ok = keys < n
            keys64 = keys.to(tl.int64)
            k = tl.load(
                K + b * skb + h * skh + keys64[:, None] * skn + offs_d[None, :], mask=key_ok[:, None], other=0.0
            ).to(tl.float32)
            v = tl.load(
                V + b * svb + h * svh + keys64[:, None] * svn + offs_d[None, :], mask=key_ok[:, None], other=0.0
            )
            e = tl.math.exp2((k - tl.max(k, 1)[:, None]) * 1.4426950408889634)
            phi = e * (1.0 / tl.sum(e, 1))[:, None]
            phi = tl.where(key_ok[:, None], phi, 0.0).to(K.dtype.element_ty)  # k's dtype, as the product's operand
            phi_sum += phi.to(tl.float32)
            if WIDEN or K.dtype.element_ty == tl.float32:
                # float32 inputs multiplied as float32 (not TF32); Triton 3.6's interpreter multiplies 16-bit
                # operands of tl.dot wrongly, so there (WIDEN) they are widened too
                acc = tl.dot(tl.trans(phi.to(tl.float32)), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(phi), v.to(phi.dtype), acc)
        part = bh.to(tl.int64) * tl.num_programs(0) + chunk
        tl.store(KV + part * D * D + offs_d[:, None] * D + offs_d[None, :], acc)
        tl.store(KSUM + part * D + offs_d, tl.sum(phi_sum, 0))


def key_statistics_can_take(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel runs these [B, N, H, D] inputs (else `key_statistics` runs the reference)."""
    d = k.shape[-1]
    return (
        _use_triton(k)
        and 16 <= d <= 128
        and d & (d - 1) == 0
        and v.shape == k.shape
        and k.dtype == v.dtype
        and k.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.stride(-1) == 1
        and v.stride(-1) == 1
    )


def key_statistics(k: torch.Tensor, v: torch.Tensor) -> KeyStatistics:
    """`key_statistics_reference` in one Triton kernel where it can run (k, v [B, N, H, D] of one dtype, any strides
    but unit in D, D a power of two ≤ 128) and a sum over its partial results."""
    if not key_statistics_can_take(k, v):
        return key_statistics_reference(k, v)
    b, n, h, d = k.shape
    tiles = -(-n // KEY_TILE)
    per_program = min(TILES_PER_PROGRAM, tiles)
    chunks = -(-tiles // per_program)
    kv = torch.empty(b, h, chunks, d, d, dtype=torch.float32, device=k.device)
    k_sum = torch.empty(b, h, chunks, d, dtype=torch.float32, device=k.device)
    _key_statistics_kernel[(chunks, b * h)](
        k, v, kv, k_sum, h, n, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), D=d,
        KEY_TILE=KEY_TILE, PER_PROGRAM=per_program, WIDEN=not k.is_cuda and k.dtype != torch.float32,
        num_warps=NUM_WARPS if d >= 128 else 4, num_stages=NUM_STAGES,
    )  # fmt: skip
    return KeyStatistics(kv.sum(2), k_sum.sum(2))


__all__ = ["KeyStatistics", "key_statistics", "key_statistics_can_take", "key_statistics_reference"]
