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

An epilogue can add a second term to each output row before it is stored, so that the sparse backends' other
branch costs no pass of its own over [B, N, H, D] tensors:
- `LinearBranch` (SLA): a linear attention over all keys through a learned projection, from per-head key
  statistics computed beforehand ([B, H, D, D] and [B, H, D]);
- `GatedCoarse` (VSA): a per-token gate times the coarse (pooled) attention's output of the row's query block.

The kernel's key tile, warps and stages are autotuned (`KernelConfig`, `tuned_configs`) on CUDA for large launches.
On Hopper, SLA's FP8 launches (key blocks as runs, full LUT rows, head dim 128) run a warp-specialised Gluon kernel
instead (kernels/sla_fp8_hopper.py), unless a `config` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditserve.kernels import sla_fp8_hopper
from ditserve.kernels.fp8_attention import KEY_BLOCK
from ditserve.kernels.fused_norm import _use_triton

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


@dataclass(frozen=True)
class LinearBranch:
    """SLA's linear attention through its projection W, b, added to every row:
    φ(q)·kv / (eps + φ(q)·k_sum) + bias, φ the softmax over the head dimension. With kv = (Σₙ φ(kₙ) vₙᵀ) Wᵀ this
    is W(linear attention) + b: the projection folded into the [D, D] statistics, so it runs once per head."""

    kv: torch.Tensor  # [B, H, D, D] (size-1 B or H broadcast)
    k_sum: torch.Tensor  # [B, H, D] float32: Σₙ φ(kₙ)
    bias: torch.Tensor  # [D]
    eps: float = 1e-5


@dataclass(frozen=True)
class GatedCoarse:
    """VSA's coarse branch, added to every row: gate[token] · coarse[the row's query block]."""

    gate: torch.Tensor  # [B, N, H, D], like q
    coarse: torch.Tensor  # [B, H, query blocks, D] float32


def _epilogue_reference(epilogue: LinearBranch | GatedCoarse, q: torch.Tensor, q_of: torch.Tensor) -> torch.Tensor:
    """The epilogue's term in float32, [B, N, H, D] (rows in no query block: zero)."""
    if isinstance(epilogue, LinearBranch):
        phi = torch.softmax(q.float(), dim=-1)
        numerator = torch.einsum("bnhd,bhde->bnhe", phi, epilogue.kv.float().expand(q.shape[0], q.shape[2], -1, -1))
        denominator = torch.einsum("bnhd,bhd->bnh", phi, epilogue.k_sum.float().expand(q.shape[0], q.shape[2], -1))
        term = numerator / (denominator[..., None] + epilogue.eps) + epilogue.bias.float()
    else:
        coarse = epilogue.coarse.float().expand(q.shape[0], q.shape[2], -1, -1)[:, :, q_of.clamp(min=0)]
        term = epilogue.gate.float() * coarse.transpose(1, 2)
    return term * (q_of >= 0)[None, :, None, None]


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
    epilogue: LinearBranch | GatedCoarse | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ·scale over the allowed keys) v in float32 for q, k, v [B, N, H, D], plus the epilogue's term; a
    dense mask built from the tables (memory N² per head: for tests and small inputs). Query rows in no block are
    zero; rows whose block names no key block get the epilogue's term alone. `fp8`: q, k and v rounded to the
    kernel's e4m3 operands first (kernels/fp8_attention.py; the epilogue reads q as given)."""
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q_given = q
    if fp8:
        from ditserve.kernels.fp8_attention import dequantized, quantize_heads_reference

        operands = dequantized(quantize_heads_reference(q, k, v, scale), n, k.shape[1], scale)
        q, k, v = (t.transpose(1, 2) for t in operands)
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
    out = (weights @ vf).transpose(1, 2)
    if epilogue is not None:
        out = out + _epilogue_reference(epilogue, q_given, q_of)
    return out.to(q_given.dtype)


if triton is not None:

    @triton.jit
    def _listed_block(lut_row, KV_START, KV_LEN, slot, count, n_keys, RUNS: tl.constexpr, MAX_KV_LEN: tl.constexpr):
        """The first key and the length of the key block in LUT slot `slot` (a scalar, or a vector of slots): length
        0 for slots past the row's count. RUNS: the key blocks are runs of MAX_KV_LEN keys from the first, so
        their tables are not read."""
        listed = slot < count
        j = tl.load(lut_row + slot, mask=listed, other=0)
        if RUNS:
            start = j * MAX_KV_LEN
            length = tl.minimum(n_keys - start, MAX_KV_LEN)
        else:
            start = tl.load(KV_START + j, mask=listed, other=0)
            length = tl.load(KV_LEN + j, mask=listed, other=0)
        return start, tl.where(listed, length, 0)

    @triton.jit
    def _listed_pair(lut_row, KV_START, KV_LEN, slot, count, n_keys, RUNS: tl.constexpr, MAX_KV_LEN: tl.constexpr):
        """`_listed_block` of LUT slots `slot` and `slot` + 1: (start, length) of each."""
        start_a, len_a = _listed_block(lut_row, KV_START, KV_LEN, slot, count, n_keys, RUNS, MAX_KV_LEN)
        start_b, len_b = _listed_block(lut_row, KV_START, KV_LEN, slot + 1, count, n_keys, RUNS, MAX_KV_LEN)
        return start_a, len_a, start_b, len_b

    @triton.jit
    def _pair_from_row(lut_vec, slots, first):
        """The block indices in slots `first` and `first` + 1 of a LUT row held in registers (`lut_vec` over
        `slots`), taken in one reduction: both packed in one int32 (fewer than 2¹⁶ key blocks, the launcher
        checks)."""
        pair = tl.sum(tl.where(slots == first, lut_vec, 0) + tl.where(slots == first + 1, lut_vec << 16, 0), 0)
        return pair & 0xFFFF, pair >> 16

    @triton.jit
    def _fp8_key_tile(
        q, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start, length, qk_scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, WIDEN: tl.constexpr, KS_BLOCK: tl.constexpr, MASKED: tl.constexpr,
    ):  # fmt: skip
        """One key block of `length` ≤ BLOCK_N consecutive keys from `start` under FP8: its vᵀ tile (read as [keys,
        D], keys contiguous), its raw products q·kᵀ (−inf past the block's length where MASKED; unmasked, the block
        must be whole) and their one scale (the block lies inside one of k's scale blocks; > 0), which the caller
        folds into exp2's multiply-add."""
        cols = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k_tok = (tl.multiple_of(start, 16) + cols).to(tl.int64)
        k_ptrs = K + b * skb + h * skh + k_tok[:, None] * skn + offs_d[None, :]
        v_ptrs = V + b * svb + h * svh + k_tok[:, None] + offs_d[None, :] * svd
        if MASKED:
            col_ok = cols < length
            kb = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            vb = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            kb = tl.load(k_ptrs)
            vb = tl.load(v_ptrs)
        scale = tl.load(ks_head + start // KS_BLOCK) * qk_scale
        if WIDEN:  # the interpreter's widened operands
            kb = kb.to(tl.float32)
        s = tl.dot(q, tl.trans(kb))
        if MASKED:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        return vb, s, scale

    @triton.jit
    def _fp8_pair_step(
        q, acc, m_i, l_i, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start_a, len_a, start_b, len_b, qk_scale,
        D: tl.constexpr, MAX_KV_LEN: tl.constexpr, WIDEN: tl.constexpr, KS_BLOCK: tl.constexpr, MASKED: tl.constexpr,
    ):  # fmt: skip
        """Two key blocks (`start`, `len` each; a length of 0: no block), each a run of consecutive keys read as its
        own tile (the loads of vᵀ, keys contiguous, stay vector loads), in one step of the online softmax: one
        rescale and one running-max update for the pair. Unmasked (MASKED False), both must be whole."""
        vb_a, s_a, c_a = _fp8_key_tile(
            q, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start_a, len_a, qk_scale,
            D, MAX_KV_LEN, WIDEN, KS_BLOCK, MASKED,
        )  # fmt: skip
        vb_b, s_b, c_b = _fp8_key_tile(
            q, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start_b, len_b, qk_scale,
            D, MAX_KV_LEN, WIDEN, KS_BLOCK, MASKED,
        )  # fmt: skip
        # Each tile's scores share one positive scale: row maxima over the raw products, the scale into exp2's
        # argument (one multiply-add per score).
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s_a, 1) * c_a, tl.max(s_b, 1) * c_b))
        if MASKED:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        else:
            m_new_safe = m_new
        # P times 448 (≤ e4m3's largest value) straight from exp2; the row sums scale alike
        shift = (m_new_safe - 8.807354922057604)[:, None]  # log2(448)
        p_a = tl.math.exp2(s_a * c_a - shift)
        p_b = tl.math.exp2(s_b * c_b - shift)
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p_a, 1) + tl.sum(p_b, 1)
        if WIDEN:
            acc = tl.dot(p_a, vb_a.to(tl.float32), acc * alpha[:, None])
            acc = tl.dot(p_b, vb_b.to(tl.float32), acc)
        else:
            acc = tl.dot(p_a.to(vb_a.dtype), vb_a, acc * alpha[:, None])
            acc = tl.dot(p_b.to(vb_b.dtype), vb_b, acc)
        return acc, m_new, l_i

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
        E0,
        E1,
        E2,
        QE,
        QS,
        KS,
        VS,
        sm_scale,
        lin_eps,
        heads,
        n_bucket,
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
        se0b,
        se0h,
        se0n,
        se1b,
        se1h,
        se1m,
        sqeb,
        sqen,
        sqeh,
        svd,
        n_keys,
        n_key_scales,
        D: tl.constexpr,
        MAX_COUNT: tl.constexpr,
        MAX_KV_LEN: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        RUNS: tl.constexpr,
        FULL: tl.constexpr,
        WIDEN: tl.constexpr,
        EPILOGUE: tl.constexpr,
        FP8: tl.constexpr,
        KS_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        LUT_WIDTH: tl.constexpr,
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
        if FP8:
            # e4m3 operands (kernels/fp8_attention.py): q's scale per query block of 128 with softmax's scale and
            # log2(e) folded in, k's per key, v's per channel (applied after the loop); V is vᵀ [B, H, D, keys].
            qk_scale = tl.load(QS + bh * tl.num_programs(0) + m)
        else:
            qk_scale = sm_scale * 1.4426950408889634  # exp2 below: log2(e) folded into the scale
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        lut_row = LUT + b * slb + h * slh + m * slm
        if FULL:  # every LUT row lists MAX_COUNT blocks (SLA's top-k)
            count = MAX_COUNT
        else:
            count = tl.load(COUNT + b * scb + h * sch + m)
        ks_head = KS + bh.to(tl.int64) * n_key_scales  # FP8: k's scales, one per KS_BLOCK keys
        if FP8 and BLOCK_N == 2 * MAX_KV_LEN:
            # Two key blocks a step (`_fp8_pair_step`). SLA's case (key blocks as runs, full LUT rows, rows sorted
            # by the launcher): every slot is listed and only the last can hold the sequence's partial last block,
            # so every pair but the last runs unmasked.
            if RUNS and FULL:
                # The LUT row is held in registers and each pair's blocks taken from it: tile addresses that come
                # from a load in the loop would hold Triton's software pipelining to one step ahead, every step
                # then waiting for its own tiles.
                slots = tl.arange(0, LUT_WIDTH)
                lut_vec = tl.load(lut_row + slots, mask=slots < MAX_COUNT, other=0)
                for step in range(0, (MAX_COUNT - 1) // 2):
                    j_a, j_b = _pair_from_row(lut_vec, slots, 2 * step)
                    start_a = j_a * MAX_KV_LEN
                    start_b = j_b * MAX_KV_LEN
                    acc, m_i, l_i = _fp8_pair_step(
                        q, acc, m_i, l_i, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start_a, MAX_KV_LEN,
                        start_b, MAX_KV_LEN, qk_scale, D, MAX_KV_LEN, WIDEN, KS_BLOCK, False,
                    )  # fmt: skip
                start_a, len_a, start_b, len_b = _listed_pair(
                    lut_row, KV_START, KV_LEN, (MAX_COUNT - 1) // 2 * 2, count, n_keys, RUNS, MAX_KV_LEN
                )
                acc, m_i, l_i = _fp8_pair_step(
                    q, acc, m_i, l_i, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start_a, len_a, start_b,
                    len_b, qk_scale, D, MAX_KV_LEN, WIDEN, KS_BLOCK, True,
                )  # fmt: skip
            else:
                for step in range(0, (MAX_COUNT + 1) // 2):
                    start_a, len_a, start_b, len_b = _listed_pair(
                        lut_row, KV_START, KV_LEN, 2 * step, count, n_keys, RUNS, MAX_KV_LEN
                    )
                    acc, m_i, l_i = _fp8_pair_step(
                        q, acc, m_i, l_i, K, V, b, h, ks_head, skb, skh, skn, svb, svh, svd, start_a, len_a,
                        start_b, len_b, qk_scale, D, MAX_KV_LEN, WIDEN, KS_BLOCK, True,
                    )  # fmt: skip
        else:
            cols = tl.arange(0, BLOCK_N)
            # One flat loop (the only loop: Triton software-pipelines innermost loops) over the key columns of the
            # query block's LUT entries laid end to end, each entry MAX_KV_LEN wide: a step of BLOCK_N columns
            # covers part of one key block (BLOCK_N < MAX_KV_LEN) or several (BLOCK_N > MAX_KV_LEN). Both are
            # powers of two. The trip count is known when compiling (the LUT's width); columns past a block's
            # length or the query block's count are masked.
            # SLA's runs with full LUT rows, steps of at most two key blocks: the block indices come from the row
            # held in registers (as the FP8 pairs above), so that the tiles' addresses need no load in the loop.
            LUT_IN_REGISTERS: tl.constexpr = RUNS and FULL and not FP8 and BLOCK_N <= 2 * MAX_KV_LEN
            if LUT_IN_REGISTERS:
                slots = tl.arange(0, LUT_WIDTH)
                lut_vec = tl.load(lut_row + slots, mask=slots < MAX_COUNT, other=0)
            for step in range(0, (MAX_COUNT * MAX_KV_LEN + BLOCK_N - 1) // BLOCK_N):
                if LUT_IN_REGISTERS:
                    column = step * BLOCK_N + cols
                    within = column % MAX_KV_LEN
                    first = step * BLOCK_N // MAX_KV_LEN  # the step's first slot; a second is first + 1
                    j_first, j_second = _pair_from_row(lut_vec, slots, first)
                    slot = column // MAX_KV_LEN
                    kv_start = tl.where(slot == first, j_first, j_second) * MAX_KV_LEN
                    kv_len = tl.where(slot < MAX_COUNT, tl.minimum(n_keys - kv_start, MAX_KV_LEN), 0)
                elif FP8:
                    # A step lies inside one key block (BLOCK_N ≤ MAX_KV_LEN): its block is looked up once and its
                    # keys are consecutive, so the loads of vᵀ (keys contiguous) are vector loads rather than a
                    # gather of single bytes.
                    first = step * BLOCK_N
                    kv_start, kv_len = _listed_block(
                        lut_row, KV_START, KV_LEN, first // MAX_KV_LEN, count, n_keys, RUNS, MAX_KV_LEN
                    )
                    kv_start = tl.multiple_of(kv_start, 16)
                    within = first % MAX_KV_LEN + cols
                else:
                    column = step * BLOCK_N + cols
                    within = column % MAX_KV_LEN
                    kv_start, kv_len = _listed_block(
                        lut_row, KV_START, KV_LEN, column // MAX_KV_LEN, count, n_keys, RUNS, MAX_KV_LEN
                    )
                col_ok = within < kv_len
                if HAS_ORDER:
                    k_tok = tl.load(ORDER + kv_start + within, mask=col_ok, other=0).to(tl.int64)
                else:
                    k_tok = (kv_start + within).to(tl.int64)
                kb = tl.load(
                    K + b * skb + h * skh + k_tok[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0
                )
                if FP8:
                    vb = tl.load(
                        V + b * svb + h * svh + k_tok[:, None] + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0
                    )
                else:
                    vb = tl.load(
                        V + b * svb + h * svh + k_tok[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0
                    )
                if WIDEN:
                    kb = kb.to(tl.float32)
                    vb = vb.to(tl.float32)
                if FP8:
                    k_scale = tl.load(ks_head + k_tok // KS_BLOCK, mask=col_ok, other=0.0)
                    s = tl.dot(q, tl.trans(kb)) * (k_scale * qk_scale)[None, :]
                else:
                    s = tl.dot(q, tl.trans(kb)) * qk_scale
                s = tl.where(col_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN from −inf − −inf
                if FP8:  # P times 448 (≤ e4m3's largest value) straight from exp2; the row sums scale alike
                    p = tl.math.exp2(s - (m_safe - 8.807354922057604)[:, None])  # log2(448)
                else:
                    p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None])
                m_i = m_new
        if FP8:
            acc = acc * tl.load(VS + bh * D + offs_d)[None, :]
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        if EPILOGUE == 1:
            # SLA's linear branch through its projection: φ(q)·KVW / (ε + φ(q)·Σφ(k)) + bias, φ the softmax over
            # the head dimension. E0 [B, H, D, D] = (Σ φ(k) vᵀ) Wᵀ in q's dtype, E1 [B, H, D] = Σ φ(k) float32,
            # E2 [D] = the projection's bias float32. q is read again (from cache; QE: q as given, also under
            # FP8), its pointers built anew: a [BLOCK_M, D] pointer tensor kept live across the loop would hold
            # registers the loop needs.
            q_rows = (QE + (b * sqeb + h * sqeh)) + (q_tok * sqen)[:, None]
            qf = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            # φ(q) = e / Σe with e = exp(q − max q); Σe cancels between numerator and denominator, so φ is never
            # formed: e·KVW / (e·Σφ(k) + ε·Σe).
            e = tl.math.exp2((qf - tl.max(qf, 1)[:, None]) * 1.4426950408889634)
            k_sum = tl.load(E1 + b * se1b + h * se1h + offs_d)
            denominator = tl.sum(e * k_sum[None, :], 1) + lin_eps * tl.sum(e, 1)
            kvw = tl.load(E0 + b * se0b + h * se0h + offs_d[:, None] * D + offs_d[None, :])
            # acc/l + e·KVW/den = (acc·den/l + e·KVW)/den: the product accumulates into acc's registers, so the
            # epilogue holds one [BLOCK_M, D] float32 tile, not two.
            acc = acc * (denominator / l_safe)[:, None]
            if WIDEN:
                acc = tl.dot(e, kvw.to(tl.float32), acc)
            else:
                acc = tl.dot(e.to(kvw.dtype), kvw, acc)
            bias = tl.load(E2 + offs_d)
            out = acc / denominator[:, None] + bias[None, :]
        else:
            out = acc / l_safe[:, None]
        if EPILOGUE == 2:
            # VSA's gated coarse output: gate[token] · coarse[query block]. E0 [B, N, H, D] the gate (any strides,
            # se0b/se0h/se0n), E1 [B, H, Mq, D] float32 the coarse attention's output per query block.
            gate = tl.load(E0 + b * se0b + h * se0h + q_tok[:, None] * se0n + offs_d[None, :], mask=row_ok[:, None])
            coarse = tl.load(E1 + b * se1b + h * se1h + m * se1m + offs_d)
            out = out + gate.to(tl.float32) * coarse[None, :]
        tl.store(
            OUT + b * sob + h * soh + q_tok[:, None] * son + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None],
        )

    # Tile configurations tried at size (BLOCK_N, warps, stages); BLOCK_M is the layout's query block. Chosen per
    # key (head dim, blocks, LUT width, epilogue, sequence length rounded to a power of two) by timing them once.
    # Query blocks of 128 rows take two warpgroups (8 warps: one warpgroup spills registers there, compiled for
    # sm_90), blocks of 64 (VSA's cubes) one.
    TUNE_CONFIGS = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 8, 3), (128, 4, 3))
    ]

    def _fitting_configs(configs, named_args, **kwargs):
        """The configs worth timing for the launch's query block: two warpgroups for 128 rows, one for fewer; under
        FP8, key tiles within one key block or of two whole ones."""
        block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
        fp8 = kwargs.get("FP8", named_args.get("FP8"))
        max_kv_len = kwargs.get("MAX_KV_LEN", named_args.get("MAX_KV_LEN"))
        return [
            c
            for c in configs
            if c.num_warps == (8 if block_m >= 128 else 4)
            and not (fp8 and not _fp8_tile_fits(c.kwargs["BLOCK_N"], max_kv_len))
        ]

    _tuned_kernel = triton.autotune(
        TUNE_CONFIGS,
        key=["D", "BLOCK_M", "MAX_KV_LEN", "MAX_COUNT", "HAS_ORDER", "RUNS", "FULL", "EPILOGUE", "FP8", "n_bucket"],
        prune_configs_by={"early_config_prune": _fitting_configs},
    )(_block_sparse_attention_kernel)


def _fp8_tile_fits(block_n: int, max_kv_len: int) -> bool:
    """FP8 key tiles lie inside one key block or take two whole ones (vᵀ's keys must be contiguous in a tile)."""
    return block_n <= max_kv_len or block_n == 2 * max_kv_len


def _runs(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) int32 of runs of `size` tokens from the first (the last shorter)."""
    starts = torch.arange(0, n, size, device=device, dtype=torch.int32)
    return starts, (n - starts).clamp(max=size)


def _lut_strides(t: torch.Tensor, dims: int) -> list[int]:
    """Strides of the batch and head dimensions (0 where they broadcast) and, for a LUT, of its query blocks."""
    strides = [0 if t.shape[i] == 1 else t.stride(i) for i in range(2)]
    return strides + ([t.stride(2)] if dims == 4 else [])


@dataclass(frozen=True)
class KernelConfig:
    """The kernel's tile of keys per step and its launch shape (BLOCK_M is the layout's query block)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_config(block_m: int) -> KernelConfig:
    """What runs untuned: small problems, deterministic mode, the interpreter."""
    return KernelConfig(64, 8 if block_m >= 128 else 4, 3)


# Launches of fewer programs than this (query blocks × batch × heads) run the default config: timing configs
# costs more than it saves there.
TUNE_MIN_PROGRAMS = 2048


def tuned_configs() -> dict[tuple, KernelConfig]:
    """The configs autotuning chose so far in this process, by tuning key (D, BLOCK_M, MAX_KV_LEN, MAX_COUNT,
    HAS_ORDER, RUNS, FULL, EPILOGUE, FP8, sequence length rounded up to a power of two, then Triton's dtype
    entries)."""
    if triton is None:
        return {}
    return {key: KernelConfig(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for key, c in _tuned_kernel.cache.items()}


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_blocks: tuple[torch.Tensor, torch.Tensor],
    kv_blocks: tuple[torch.Tensor, torch.Tensor] | None,
    lut: torch.Tensor,
    counts: torch.Tensor | None,
    order: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 128,
    max_kv_len: int = 64,
    epilogue: LinearBranch | GatedCoarse | None = None,
    config: KernelConfig | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """`block_sparse_attention_reference` in one Triton kernel where it can run (q, k, v [B, N, H, D] with unit
    stride in D, D a power of two ≥ 16): query blocks at most `block_m` long, key blocks at most `max_kv_len`
    (a power of two), `epilogue` added to each row before the store. `kv_blocks` None: the key blocks are runs of
    `max_kv_len` keys from the first (SLA's; the kernel then computes their bounds instead of reading tables);
    `counts` None: every LUT row lists lut.shape[-1] blocks (a top-k choice). `config` None: autotuned on CUDA for large
    launches outside deterministic mode (`tuned_configs` says what was chosen), the default config otherwise.
    Every query row must lie in a block (rows outside every block are left as they were in the new output:
    uninitialised). `fp8`: both products on FP8 tensor cores over e4m3 operands (kernels/fp8_attention.py's
    quantisation; its reference here with `fp8=True`), for query blocks that are runs of QUERY_BLOCK tokens from the
    first (SLA's), no order."""
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    usable = (
        _use_triton(q)
        and d >= (32 if fp8 else 16)  # 8-bit tensor-core products reduce over 32 at a time
        and d & (d - 1) == 0
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
    if fp8:
        from ditserve.kernels.fp8_attention import QUERY_BLOCK

        runs = -(-n // QUERY_BLOCK)
        if order is not None or block_m != QUERY_BLOCK or q_blocks[0].numel() != runs or max_kv_len % 16:
            raise ValueError(
                f"fp8 block-sparse attention takes query blocks of runs of {QUERY_BLOCK} tokens and key blocks of runs "
                "of a multiple of 16, no order"
            )
        if config is not None and not _fp8_tile_fits(config.block_n, max_kv_len):
            raise ValueError(
                f"fp8 block-sparse attention: key tile {config.block_n} neither inside a key block of {max_kv_len} "
                "nor two of them"
            )
    kv_runs, full = kv_blocks is None, counts is None
    if not usable:  # the reference reads tables: made here for the cases the kernel computes instead
        if kv_runs:
            kv_blocks = _runs(k.shape[1], max_kv_len, k.device)
        if full:
            counts = torch.full(lut.shape[:-1], lut.shape[-1], dtype=torch.int32, device=lut.device)
        return block_sparse_attention_reference(q, k, v, q_blocks, kv_blocks, lut, counts, order, scale, epilogue, fp8)
    if max_kv_len & (max_kv_len - 1) or block_m & (block_m - 1):
        raise ValueError(f"block_m ({block_m}) and max_kv_len ({max_kv_len}) must be powers of two")
    out = torch.empty_like(q)
    given = q  # read by SLA's epilogue as it is
    fp8_args = [q, q, q]  # placeholders: no FP8
    v_d_stride = 1
    if fp8:
        from ditserve.kernels.fp8_attention import quantize_heads

        operands = quantize_heads(q, k, v, scale)
        # [B, H, S, D] e4m3 seen through the kernel's (batch, token, head) strides; v transposed [B, H, D, keys]
        q = operands.q8.transpose(1, 2)
        k = operands.k8.transpose(1, 2)
        v = operands.vt8.permute(0, 3, 1, 2)
        v_d_stride = operands.vt8.stride(2)
        fp8_args = [operands.q_scale, operands.k_scale, operands.v_scale]
    q_start, q_len = (t.to(torch.int32).contiguous() for t in q_blocks)
    # tables the kernel does not read (key blocks as runs, full LUT rows) are passed as placeholders
    kv_start, kv_len = (q_start, q_len) if kv_runs else (t.to(torch.int32).contiguous() for t in kv_blocks)
    lut = lut.to(torch.int32).contiguous()  # the kernel steps through a LUT row with unit stride
    if fp8 and kv_runs and full:
        # FP8 key-block pairs then run unmasked but for the last: only the last slot can name the partial block
        lut = lut.sort(dim=-1).values
    if kv_runs and full and -(-k.shape[1] // max_kv_len) > 0xFFFF:
        raise ValueError(f"block-sparse attention over runs takes fewer than 65,536 key blocks of {max_kv_len} keys")
    if (
        fp8
        and kv_runs
        and full
        and config is None
        and not isinstance(epilogue, GatedCoarse)
        and sla_fp8_hopper.usable(given, max_kv_len)
    ):
        # SLA's case on Hopper: the warp-specialised Gluon kernel (a `config` keeps the Triton kernel)
        return sla_fp8_hopper.sla_fp8_attention(operands, given, lut, out, epilogue)
    counts = q_start if full else counts.to(torch.int32)
    order_arg = order.to(torch.int32).contiguous() if order is not None else q_start  # unused without an order
    extras, extra_strides, kind, eps = [q_start] * 3, [0] * 6, 0, 0.0  # placeholders: no epilogue
    if isinstance(epilogue, LinearBranch):
        kind, eps = 1, epilogue.eps
        kv = epilogue.kv.to(given.dtype).contiguous()
        k_sum = epilogue.k_sum.float().contiguous()
        extras = [kv, k_sum, epilogue.bias.float().contiguous()]
        extra_strides = [*_lut_strides(kv, 3)[:2], 0, *_lut_strides(k_sum, 3)[:2], 0]
    elif isinstance(epilogue, GatedCoarse):
        kind = 2
        gate, coarse = epilogue.gate, epilogue.coarse.float()
        if gate.stride(-1) != 1:
            gate = gate.contiguous()
        extras = [gate, coarse, q_start]
        extra_strides = [gate.stride(0), gate.stride(2), gate.stride(1), *_lut_strides(coarse, 4)]
    grid = (q_start.numel(), b * h)
    args = (
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
        *extras,
        given,
        *fp8_args,
        scale,
        eps,
        h,
        1 << max(n - 1, 0).bit_length(),  # the sequence length's tuning bucket
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
        *([0, 0] if full else _lut_strides(counts, 3)),
        *extra_strides,
        given.stride(0),
        given.stride(1),
        given.stride(2),
        v_d_stride,
        k.shape[1],
        fp8_args[1].shape[-1] if fp8 else 0,  # k's scales per head
    )
    constants = dict(
        D=d,
        MAX_COUNT=lut.shape[-1],
        LUT_WIDTH=triton.next_power_of_2(lut.shape[-1]),
        MAX_KV_LEN=max_kv_len,
        HAS_ORDER=order is not None,
        RUNS=kv_runs,
        FULL=full,
        # Triton 3.6's interpreter multiplies 16-bit operands of tl.dot wrongly (it reads their bits as garbage):
        # on the CPU the operands are widened to float32 first; compiled kernels multiply them as they are.
        # FP8 operands too: the interpreter also rounds some values to e4m3 wrongly (P's among them), so there
        # P stays float32 and the CUDA checks cover its rounding.
        WIDEN=not q.is_cuda and (given.dtype != torch.float32 or fp8),
        EPILOGUE=kind,
        FP8=fp8,
        KS_BLOCK=KEY_BLOCK,
        BLOCK_M=block_m,
    )
    tune = (
        config is None
        and q.is_cuda
        and grid[0] * grid[1] >= TUNE_MIN_PROGRAMS
        and not torch.are_deterministic_algorithms_enabled()
    )
    if tune:
        # Timing picks among configs that compute the same sums in different tile orders: results can differ
        # in the last bits between processes that chose differently (deterministic mode runs the default).
        _tuned_kernel[grid](*args, **constants)
    else:
        c = config or default_config(block_m)
        _block_sparse_attention_kernel[grid](
            *args, **constants, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages
        )
    return out


__all__ = [
    "GatedCoarse",
    "KernelConfig",
    "LinearBranch",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "default_config",
    "tuned_configs",
]
