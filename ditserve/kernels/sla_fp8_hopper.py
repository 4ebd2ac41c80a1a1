"""SLA's FP8 block-sparse attention on Hopper, warp-specialised, in Gluon (Triton's lower-level dialect): the case
TurboWan runs (key blocks as runs of 64 keys, full LUT rows, head dim 128, the linear branch as epilogue) at about
0.85× the Triton kernel's time (docs/sparse-attention.md).

One program per (query block of 128 rows, batch × head), in three warpgroups:
- a producer issues TMA copies of each LUT pair's two key blocks (k [64, D] and vᵀ [D, 64] each) into a ring of
  STAGES shared buffers, waiting on an "empty" mbarrier per stage before it refills one;
- two consumers each own 64 of the query block's rows: each step they issue the next pair's scores q·kᵀ on the tensor
  cores before running this pair's softmax (the exp2s and the e4m3 rounding of P overlap those products), then P·v;
  each releases a stage (one arrival of two) once its products from it are done.
No CTA-wide barrier runs in the loop, so the two consumers drift apart and one's softmax overlaps the other's
products. Numerics are the Triton kernel's (`block_sparse_attention` with fp8): e4m3 q, k and vᵀ from
kernels/fp8_attention.py, scores scaled by q's block scale times k's, P times 448 rounded to e4m3, v's channel
scales and 1/l after the loop, SLA's linear branch in the epilogue; the two agree to rounding (the sums run in a
different order), and `block_sparse_attention_reference(fp8=True)` is the reference both are tested against.

Two choices the compiler forces, both checked by compiling for sm_90 (tests/test_sparse_attention.py):
- each step waits for its own P·v before the loop's back edge: a P·v accumulator still in flight across the back
  edge makes ptxas serialise every wgmma in the kernel (warning C7514), which cost more than the overlap gained;
- worker partitions take no constexpr arguments in Triton 3.6 (they arrive as tensors), so the consumers read the
  tile sizes from the ring's shape and the LUT's width and the epilogue's kind as run-time values.
"""

from __future__ import annotations

import torch

from ditserve.kernels.fp8_attention import KEY_BLOCK as K_SCALE_BLOCK
from ditserve.kernels.fp8_attention import QUERY_BLOCK

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no Triton, or one without Gluon: the Triton kernel serves
    gluon = None

HEAD_DIM = 128
KV_BLOCK = 64  # SLA's key blocks; its query blocks are fp8_attention's QUERY_BLOCK, q's scale blocks
STAGES = 4  # pairs in the ring: 3, 4 and 5 timed alike at Wan 720p
CONSUMER_REGISTERS = 240  # per consumer thread (setmaxnreg); the producer drops to 24


def _gluon_dtype(dtype: torch.dtype):
    """Gluon's element type of a torch dtype the kernel's descriptors take."""
    return {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16}[dtype]


def usable(q: torch.Tensor, max_kv_len: int) -> bool:
    """Whether this kernel can take a `block_sparse_attention` fp8 launch over key-block runs with full LUT rows:
    Hopper (sm_90), bf16 q, k, v with head dim 128, SLA's 64-key blocks, Gluon importable."""
    return (
        gluon is not None
        and q.is_cuda
        and q.dtype == torch.bfloat16
        and q.shape[-1] == HEAD_DIM
        and max_kv_len == KV_BLOCK
        and torch.cuda.get_device_capability(q.device) == (9, 0)
    )


if gluon is not None:
    LOG2_448 = gl.constexpr(8.807354922057604)  # P is scaled by 448, e4m3's largest value
    KS_BLOCK = gl.constexpr(K_SCALE_BLOCK)  # keys per scale of k

    @gluon.jit
    def _producer(
        q_desc, k_desc, v_desc, kvw_desc, q_smem, k_smem, v_smem, kvw_smem, full, empty, q_bar, kvw_bar, lut_row,
        q_row0, kv_row0, vt_row0, kvw_row0, MAX_COUNT: gl.constexpr, KV: gl.constexpr, STAGES: gl.constexpr,
        EPILOGUE: gl.constexpr,
    ):  # fmt: skip
        """The producer warpgroup: q's tile, then each pair's k and vᵀ tiles into the ring, then (SLA's epilogue)
        the head's [D, D] linear-branch matrix."""
        NPAIRS: gl.constexpr = (MAX_COUNT + 1) // 2
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
        j_a = gl.load(lut_row)
        j_b = gl.load(lut_row + gl.minimum(1, MAX_COUNT - 1))
        for pair in range(NPAIRS):
            stage = pair % STAGES
            # the next pair's indices are loaded before this pair's copies wait for their stage
            nxt = gl.minimum(pair + 1, NPAIRS - 1)
            jn_a = gl.load(lut_row + 2 * nxt)
            jn_b = gl.load(lut_row + gl.minimum(2 * nxt + 1, MAX_COUNT - 1))
            mbarrier.wait(empty.index(stage), ((pair // STAGES) + 1) & 1, pred=pair >= STAGES)
            bar = full.index(stage)
            mbarrier.expect(bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + j_a * KV, 0], bar, k_smem.index(2 * stage))
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + j_b * KV, 0], bar, k_smem.index(2 * stage + 1))
            tma.async_copy_global_to_shared(v_desc, [vt_row0, j_a * KV], bar, v_smem.index(2 * stage))
            tma.async_copy_global_to_shared(v_desc, [vt_row0, j_b * KV], bar, v_smem.index(2 * stage + 1))
            j_a = jn_a
            j_b = jn_b
        if EPILOGUE == 1:
            mbarrier.expect(kvw_bar, kvw_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(kvw_desc, [kvw_row0, 0], kvw_bar, kvw_smem)

    @gluon.jit
    def _pair_scales(lut_row, ks_head, pair, qk_scale, max_count, KV: gl.constexpr):
        j_a = gl.load(lut_row + 2 * pair)
        j_b = gl.load(lut_row + gl.minimum(2 * pair + 1, max_count - 1))
        c_a = gl.load(ks_head + j_a * KV // KS_BLOCK) * qk_scale
        c_b = gl.load(ks_head + j_b * KV // KS_BLOCK) * qk_scale
        return c_a, c_b, j_a, j_b

    @gluon.jit
    def _scores(q, k_smem, full, pair, zero_s, STAGES: gl.constexpr):
        stage = pair % STAGES
        mbarrier.wait(full.index(stage), (pair // STAGES) & 1)
        s_a = warpgroup_mma(q, k_smem.index(2 * stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_b = warpgroup_mma(q, k_smem.index(2 * stage + 1).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        return s_a, s_b

    @gluon.jit
    def _consumer(
        q_smem, k_smem, v_smem, kvw_smem, full, empty, q_bar, kvw_bar, OUT, QS, VS, QE, E1, E2, lut_row, ks_head,
        qs_index, vs_row, e1_row, q_base, out_base, rows0, n_q, n_keys, lin_eps, son, sqen, max_count, epilogue,
        HALF: gl.constexpr,
    ):  # fmt: skip
        """A consumer warpgroup: the online softmax over every LUT pair for rows HALF·64 … HALF·64 + 63 of the
        query block, then the epilogue and the store."""
        # worker partitions take no constexpr arguments: the tile sizes come from the ring's shape, the LUT's width
        # and the epilogue's kind at run time
        ROWS: gl.constexpr = q_smem.shape[0] // 2  # each consumer warpgroup owns half the query block
        STAGES: gl.constexpr = k_smem.shape[0] // 2
        KV: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        npairs = (max_count + 1) // 2
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, KV, 32])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
        col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        col_o: gl.constexpr = gl.SliceLayout(0, mma_o)
        q = q_smem.slice(HALF * ROWS, ROWS)
        qk_scale = gl.load(QS + qs_index)
        zero_s = gl.zeros([ROWS, KV], gl.float32, mma_s)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([ROWS], gl.float32, row_s)
        acc = gl.zeros([ROWS, D], gl.float32, mma_o)

        c_a, c_b, j_a, j_b = _pair_scales(lut_row, ks_head, 0, qk_scale, max_count, KV)
        cn_a, cn_b, jn_a, jn_b = _pair_scales(lut_row, ks_head, gl.minimum(1, npairs - 1), qk_scale, max_count, KV)
        mbarrier.wait(q_bar, 0)
        s_a, s_b = _scores(q, k_smem, full, 0, zero_s, STAGES)
        s_a, s_b = warpgroup_mma_wait(0, deps=(s_a, s_b))
        for pair in range(0, npairs - 1):
            # the next pair's products run on the tensor cores while this pair's softmax runs
            sn_a, sn_b = _scores(q, k_smem, full, pair + 1, zero_s, STAGES)
            # scales two pairs ahead: their loads have a whole step to arrive
            cnn_a, cnn_b, jnn_a, jnn_b = _pair_scales(
                lut_row, ks_head, gl.minimum(pair + 2, npairs - 1), qk_scale, max_count, KV
            )
            m_new = gl.maximum(m_i, gl.maximum(gl.max(s_a, 1) * c_a, gl.max(s_b, 1) * c_b))
            shift = (m_new - LOG2_448)[:, None]
            p_a = gl.exp2(s_a * c_a - shift)
            p_b = gl.exp2(s_b * c_b - shift)
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p_a, 1) + gl.sum(p_b, 1)
            p8_a = gl.convert_layout(p_a.to(gl.float8e4nv), p_layout)
            p8_b = gl.convert_layout(p_b.to(gl.float8e4nv), p_layout)
            # acc holds every earlier pair's P·v (waited for at the end of the last step)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            stage = pair % STAGES
            acc = warpgroup_mma(p8_a, v_smem.index(2 * stage).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(p8_b, v_smem.index(2 * stage + 1).permute((1, 0)), acc, is_async=True)
            # both finish here: an accumulator still in flight across the loop's back edge makes ptxas serialise
            # every wgmma (C7514)
            s_a, s_b, acc = warpgroup_mma_wait(0, deps=(sn_a, sn_b, acc))
            mbarrier.arrive(empty.index(stage))
            m_i = m_new
            c_a, c_b, j_a, j_b = cn_a, cn_b, jn_a, jn_b
            cn_a, cn_b, jn_a, jn_b = cnn_a, cnn_b, jnn_a, jnn_b
        # the last pair: the only one that can hold the sequence's partial last block, or (odd counts) one block
        cols = gl.arange(0, KV, col_s)
        len_a = gl.minimum(n_keys - j_a * KV, KV)
        len_b = gl.where(max_count % 2 == 0, gl.minimum(n_keys - j_b * KV, KV), 0)
        s_a = gl.where((cols < len_a)[None, :], s_a * c_a, float("-inf"))
        s_b = gl.where((cols < len_b)[None, :], s_b * c_b, float("-inf"))
        m_new = gl.maximum(m_i, gl.maximum(gl.max(s_a, 1), gl.max(s_b, 1)))
        shift = (m_new - LOG2_448)[:, None]
        p_a = gl.exp2(s_a - shift)
        p_b = gl.exp2(s_b - shift)
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p_a, 1) + gl.sum(p_b, 1)
        p8_a = gl.convert_layout(p_a.to(gl.float8e4nv), p_layout)
        p8_b = gl.convert_layout(p_b.to(gl.float8e4nv), p_layout)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        stage = (npairs - 1) % STAGES
        acc = warpgroup_mma(p8_a, v_smem.index(2 * stage).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(p8_b, v_smem.index(2 * stage + 1).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))

        offs_d = gl.arange(0, D, col_o)
        rows = rows0 + HALF * ROWS + gl.arange(0, ROWS, row_o)
        row_ok = rows < n_q
        tok = rows.to(gl.int64)
        acc = acc * gl.load(VS + vs_row + offs_d)[None, :]
        l_o = gl.convert_layout(l_i, row_o)
        l_safe = gl.where(l_o > 0, l_o, 1.0)
        if epilogue == 1:
            # SLA's linear branch, as in the Triton kernel: φ(q)·KVW / (ε + φ(q)·Σφ(k)) + bias, Σe cancelled
            qf = gl.load(QE + q_base + (tok * sqen)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(
                gl.float32
            )
            e = gl.exp2((qf - gl.max(qf, 1)[:, None]) * 1.4426950408889634)
            k_sum = gl.load(E1 + e1_row + offs_d)
            denominator = gl.sum(e * k_sum[None, :], 1) + lin_eps * gl.sum(e, 1)
            mma_e: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
            )
            acc = acc * (denominator / l_safe)[:, None]
            e_op = gl.convert_layout(e.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=mma_e, k_width=2))
            mbarrier.wait(kvw_bar, 0)
            acc_e = warpgroup_mma(e_op, kvw_smem, gl.convert_layout(acc, mma_e))
            acc = gl.convert_layout(acc_e, mma_o)
            bias = gl.load(E2 + offs_d)
            out = acc / denominator[:, None] + bias[None, :]
        else:
            out = acc / l_safe[:, None]
        gl.store(
            OUT + out_base + (tok * son)[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None]
        )

    # The consumers' halves as two functions: a worker partition cannot take HALF as a constexpr argument.
    @gluon.jit
    def _consumer_top(
        q_smem, k_smem, v_smem, kvw_smem, full, empty, q_bar, kvw_bar, OUT, QS, VS, QE, E1, E2, lut_row, ks_head,
        qs_index, vs_row, e1_row, q_base, out_base, rows0, n_q, n_keys, lin_eps, son, sqen, max_count, epilogue,
    ):  # fmt: skip
        _consumer(
            q_smem, k_smem, v_smem, kvw_smem, full, empty, q_bar, kvw_bar, OUT, QS, VS, QE, E1, E2, lut_row, ks_head,
            qs_index, vs_row, e1_row, q_base, out_base, rows0, n_q, n_keys, lin_eps, son, sqen, max_count, epilogue, 0,
        )  # fmt: skip

    @gluon.jit
    def _consumer_bottom(
        q_smem, k_smem, v_smem, kvw_smem, full, empty, q_bar, kvw_bar, OUT, QS, VS, QE, E1, E2, lut_row, ks_head,
        qs_index, vs_row, e1_row, q_base, out_base, rows0, n_q, n_keys, lin_eps, son, sqen, max_count, epilogue,
    ):  # fmt: skip
        _consumer(
            q_smem, k_smem, v_smem, kvw_smem, full, empty, q_bar, kvw_bar, OUT, QS, VS, QE, E1, E2, lut_row, ks_head,
            qs_index, vs_row, e1_row, q_base, out_base, rows0, n_q, n_keys, lin_eps, son, sqen, max_count, epilogue, 1,
        )  # fmt: skip

    @gluon.jit
    def _sla_fp8_ws_kernel(
        q_desc, k_desc, v_desc, kvw_desc, OUT, LUT, QS, KS, VS, QE, E1, E2, heads, n_keys, n_q, n_q_blocks,
        n_key_scales, lin_eps, max_count, epilogue, sob, son, soh, slb, slh, slm, sqeb, sqen, sqeh, se1b, se1h,
        D: gl.constexpr, MAX_COUNT: gl.constexpr, KV: gl.constexpr, STAGES: gl.constexpr, EPILOGUE: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
    ):  # fmt: skip
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // heads
        h = bh % heads
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [2 * STAGES, KV, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [2 * STAGES, D, KV], v_desc.layout)
        kvw_smem = gl.allocate_shared_memory(kvw_desc.dtype, [D, D], kvw_desc.layout)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(full.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        mbarrier.init(bars.index(0), count=1)
        mbarrier.init(bars.index(1), count=1)
        fence_async_shared()
        lut_row = LUT + b * slb + h * slh + m * slm
        ks_head = KS + bh.to(gl.int64) * n_key_scales
        q_base = b.to(gl.int64) * sqeb + h * sqeh
        out_base = b.to(gl.int64) * sob + h * soh
        consumer_args = (
            q_smem,
            k_smem,
            v_smem,
            kvw_smem,
            full,
            empty,
            bars.index(0),
            bars.index(1),
            OUT,
            QS,
            VS,
            QE,
            E1,
            E2,
            lut_row,
            ks_head,
            bh * n_q_blocks + m,
            bh * D,
            b * se1b + h * se1h,
            q_base,
            out_base,
            m * BLOCK_M,
            n_q,
            n_keys,
            lin_eps,
            son,
            sqen,
            max_count,
            epilogue,
        )
        gl.warp_specialize(
            [
                (
                    _producer,
                    (
                        q_desc,
                        k_desc,
                        v_desc,
                        kvw_desc,
                        q_smem,
                        k_smem,
                        v_smem,
                        kvw_smem,
                        full,
                        empty,
                        bars.index(0),
                        bars.index(1),
                        lut_row,
                        bh * n_q + m * BLOCK_M,
                        bh * n_keys,
                        bh * D,
                        bh * D,
                        gl.constexpr(MAX_COUNT),
                        gl.constexpr(KV),
                        gl.constexpr(STAGES),
                        gl.constexpr(EPILOGUE),
                    ),
                ),
                (_consumer_top, consumer_args),
                (_consumer_bottom, consumer_args),
            ],
            [4, 4],
            [CONSUMER_REGS, CONSUMER_REGS],
        )


def sla_fp8_attention(operands, given_q: torch.Tensor, lut_sorted: torch.Tensor, out: torch.Tensor, epilogue=None):
    """Block-sparse attention over e4m3 `operands` (kernels/fp8_attention.QuantizedHeads of q, k, v [B, N, H, D])
    into `out` [B, N, H, D]: query block i attends to the 64-key blocks lut_sorted[b, h, i] (int32, ascending, every
    row full; size-1 batch or head dimensions broadcast), plus `epilogue` (block_sparse_attention.LinearBranch or
    None) computed from `given_q`, q as given."""
    b, h, n, d = operands.q8.shape
    nk = operands.k8.shape[2]
    e4m3 = gl.float8e4nv

    def descriptor(t: torch.Tensor, block: list[int], dtype) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    # q8, k8 [B, H, S, D] and vt8 [B, H, D, S_pad] as 2-D tables; a tile past a head's end reads the next head's
    # rows (masked: the last key block's scores, the last query block's stores) or TMA's zeros
    q_desc = descriptor(operands.q8.reshape(b * h * n, d), [QUERY_BLOCK, d], e4m3)
    k_desc = descriptor(operands.k8.reshape(b * h * nk, d), [KV_BLOCK, d], e4m3)
    v_desc = descriptor(operands.vt8.reshape(b * h * d, operands.vt8.shape[-1]), [d, KV_BLOCK], e4m3)
    lut = lut_sorted.to(torch.int32).contiguous()
    n_q_blocks = -(-n // QUERY_BLOCK)
    if epilogue is not None:
        kvw = epilogue.kv.to(given_q.dtype).expand(b, h, d, d).contiguous()
        k_sum = epilogue.k_sum.float().contiguous()
        bias = epilogue.bias.float().contiguous()
        e1_strides = [0 if k_sum.shape[i] == 1 else k_sum.stride(i) for i in range(2)]
        extras, eps, kind = (k_sum, bias), epilogue.eps, 1
    else:
        kvw = torch.zeros(1, 1, d, d, dtype=given_q.dtype, device=given_q.device).expand(b, h, d, d).contiguous()
        extras, e1_strides, eps, kind = (operands.q_scale,) * 2, [0, 0], 0.0, 0
    kvw_desc = descriptor(kvw.reshape(b * h * d, d), [d, d], gl.bfloat16)
    lut_strides = [0 if lut.shape[i] == 1 else lut.stride(i) for i in range(2)] + [lut.stride(2)]
    _sla_fp8_ws_kernel[(n_q_blocks, b * h)](
        q_desc, k_desc, v_desc, kvw_desc, out, lut, operands.q_scale, operands.k_scale, operands.v_scale, given_q,
        *extras, h, nk, n, n_q_blocks, operands.k_scale.shape[-1], eps, lut.shape[-1], kind,
        out.stride(0), out.stride(1), out.stride(2), *lut_strides,
        given_q.stride(0), given_q.stride(1), given_q.stride(2), *e1_strides,
        D=d, MAX_COUNT=lut.shape[-1], KV=KV_BLOCK, STAGES=STAGES, EPILOGUE=kind,
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4,
    )  # fmt: skip
    return out
