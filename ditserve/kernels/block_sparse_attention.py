"""Block-sparse attention: each query block attends only to the key blocks a lookup table names, beside the plain
torch reference it is tested against.

The sequence is cut into blocks by two tables, `starts` and `lengths` (int32, one entry per block), over an `order`
of the tokens: block i holds tokens order[starts[i] : starts[i] + lengths[i]]. With order None the blocks are runs of
the sequence itself (SLA's blocks of 128 queries and 64 keys); with an order they can be any sets of tokens, such as
the 3D tiles of a video's token grid (layers/sparse_attention.py), read in place, without gathering q, k and v into
tile order first. Blocks may be shorter than the kernel's tile (the last run, the tiles at the grid's edges).

`lut` [B, H, Mq, K] (int32; size-1 batch or head dimensions broadcast) names for each query block the key blocks it
attends to, its first `counts` [B, H, Mq] entries valid. Each query row takes the softmax over exactly those keys,
as flash attention does over all of them: one pass, a running max and sum, float32 accumulation.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None


def _token_blocks(starts: torch.Tensor, lengths: torch.Tensor, order: torch.Tensor | None, n: int) -> torch.Tensor:
    """[n] block index of each token (−1 for tokens in no block)."""
    block_of = torch.full((n,), -1, dtype=torch.long, device=starts.device)
    for i, (s, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        positions = torch.arange(s, s + length, device=starts.device)
        tokens = positions if order is None else order[positions].long()
        block_of[tokens] = i
    return block_of


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_blocks: tuple[torch.Tensor, torch.Tensor],
    kv_blocks: tuple[torch.Tensor, torch.Tensor],
    lut: torch.Tensor,
    counts: torch.Tensor,
    order: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale over the allowed keys) v in float32 for q, k, v [B, N, H, D]; a dense mask built from the
    tables (memory N² per head: for tests and small inputs). Query rows in no block, or whose block names no key
    block, are zero."""
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q_of = _token_blocks(*q_blocks, order, n)
    k_of = _token_blocks(*kv_blocks, order, k.shape[1])
    mq, mk = q_blocks[0].numel(), kv_blocks[0].numel()
    lut_full = lut.expand(b, h, mq, lut.shape[-1]).long()
    valid = torch.arange(lut.shape[-1], device=lut.device) < counts.expand(b, h, mq)[..., None]
    allowed = torch.zeros(b, h, mq, mk + 1, dtype=torch.bool, device=q.device)  # the last column: no block
    allowed.scatter_(-1, torch.where(valid, lut_full, mk), True)
    allowed = allowed[..., :mk]
    # token (query i, key j) allowed when i's block names j's block
    rows = allowed[:, :, q_of.clamp(min=0)] & (q_of >= 0)[None, None, :, None]  # [B, H, N, Mk]
    mask = rows[..., k_of.clamp(min=0)] & (k_of >= 0)[None, None, None, :]  # [B, H, N, Nk]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zero
    return (weights @ vf).transpose(1, 2).to(q.dtype)


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None or os.environ.get("DITSERVE_DISABLE_TRITON") == "1":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _block_sparse_attention_kernel(
        Q,
        K,
        V,
        OUT,
        ORDER,
        Q_START,
        Q_LEN,
        KV_START,
        KV_LEN,
        LUT,
        COUNT,
        sm_scale,
        heads,
        sqb,
        sqn,
        sqh,
        skb,
        skn,
        skh,
        svb,
        svn,
        svh,
        sob,
        son,
        soh,
        slb,
        slh,
        slm,
        scb,
        sch,
        D: tl.constexpr,
        MAX_COUNT: tl.constexpr,
        MAX_KV_LEN: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        WIDEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        offs_d = tl.arange(0, D)
        q_start = tl.load(Q_START + m)
        q_len = tl.load(Q_LEN + m)
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        if HAS_ORDER:
            q_tok = tl.load(ORDER + q_start + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            q_tok = (q_start + rows).to(tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + q_tok[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if WIDEN:
            q = q.to(tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # exp2 below: log2(e) folded into the scale
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        lut_row = LUT + b * slb + h * slh + m * slm
        count = tl.load(COUNT + b * scb + h * sch + m)
        cols = tl.arange(0, BLOCK_N)
        # Loops of bounds known when compiling (the LUT's width, the longest key block), masked to each block's
        # own: the same trip count for every program.
        for i in range(0, MAX_COUNT):
            j = tl.load(lut_row + i, mask=i < count, other=0)
            kv_start = tl.load(KV_START + j)
            kv_len = tl.where(i < count, tl.load(KV_LEN + j), 0)
            for off in range(0, MAX_KV_LEN, BLOCK_N):
                col_ok = off + cols < kv_len
                if HAS_ORDER:
                    k_tok = tl.load(ORDER + kv_start + off + cols, mask=col_ok, other=0).to(tl.int64)
                else:
                    k_tok = (kv_start + off + cols).to(tl.int64)
                kt = tl.load(
                    K + b * skb + h * skh + k_tok[None, :] * skn + offs_d[:, None], mask=col_ok[None, :], other=0.0
                )
                if WIDEN:
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt) * qk_scale
                s = tl.where(col_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN from −inf − −inf
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                vb = tl.load(
                    V + b * svb + h * svh + k_tok[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0
                )
                if WIDEN:
                    vb = vb.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
                m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            OUT + b * sob + h * soh + q_tok[:, None] * son + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None],
        )


def _lut_strides(t: torch.Tensor, dims: int) -> list[int]:
    """Strides of the batch and head dimensions (0 where they broadcast) and, for a LUT, of its query blocks."""
    strides = [0 if t.shape[i] == 1 else t.stride(i) for i in range(2)]
    return strides + ([t.stride(2)] if dims == 4 else [])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_blocks: tuple[torch.Tensor, torch.Tensor],
    kv_blocks: tuple[torch.Tensor, torch.Tensor],
    lut: torch.Tensor,
    counts: torch.Tensor,
    order: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 64,
    max_kv_len: int | None = None,
) -> torch.Tensor:
    """`block_sparse_attention_reference` in one Triton kernel where it can run (q, k, v [B, N, H, D] with unit
    stride in D, D a power of two ≥ 16); query blocks at most `block_m` long, key blocks at most `max_kv_len`
    (default `block_n`). Every query row must lie in a block
    (rows outside every block are left as they were in the new output: uninitialised)."""
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    max_kv_len = block_n if max_kv_len is None else max_kv_len
    usable = (
        _use_triton(q)
        and d >= 16
        and d & (d - 1) == 0
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
    if not usable:
        return block_sparse_attention_reference(q, k, v, q_blocks, kv_blocks, lut, counts, order, scale)
    out = torch.empty_like(q)
    q_start, q_len = (t.to(torch.int32).contiguous() for t in q_blocks)
    kv_start, kv_len = (t.to(torch.int32).contiguous() for t in kv_blocks)
    lut = lut.to(torch.int32)
    counts = counts.to(torch.int32)
    order_arg = order.to(torch.int32).contiguous() if order is not None else q_start  # unused without an order
    grid = (q_start.numel(), b * h)
    _block_sparse_attention_kernel[grid](
        q,
        k,
        v,
        out,
        order_arg,
        q_start,
        q_len,
        kv_start,
        kv_len,
        lut,
        counts,
        scale,
        h,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        *_lut_strides(lut, 4),
        *_lut_strides(counts, 3),
        D=d,
        MAX_COUNT=lut.shape[-1],
        MAX_KV_LEN=max_kv_len,
        HAS_ORDER=order is not None,
        # Triton 3.6's interpreter multiplies 16-bit operands of tl.dot wrongly (it reads their bits as garbage):
        # on the CPU the operands are widened to float32 first; compiled kernels multiply them as they are.
        WIDEN=not q.is_cuda and q.dtype != torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=8 if block_m >= 128 else 4,
        num_stages=3,
    )
    return out


__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]
