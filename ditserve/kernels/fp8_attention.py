"""FP8 attention (`--attention-backend fp8`): both products of flash attention on FP8 tensor cores, beside the torch
reference it is tested against.

Hopper's tensor cores multiply e4m3 at twice the bf16 rate. At video lengths attention is most of a DiT's time
(Wan2.1-14B 480p×81: 32,760 tokens, 1.5 s of a 2.4 s FP8 forward on cuDNN's bf16 kernel), so its two products are
where FP8 pays next to the linears. How the operands are made FP8, and why:
- q: one scale per block of QUERY_BLOCK rows of a head (the kernel's query tile), softmax's scale and log2(e)
  folded in, so the kernel's scores come out in the base-2 domain exp2 wants at one multiply;
- k: one scale per block of KEY_BLOCK keys (the kernel's key tiles lie inside one), so a tile's scores share one
  scale with q's: the kernel takes the row maxima of the raw products and folds the scale into exp2's argument,
  one multiply-add per score where a per-key scale costs a multiply more (13 % of the kernel's time at Wan 480p);
- v: one scale per channel of a head over the whole sequence (P·V sums over keys, so a channel's scale factors out
  of the sum and is applied once at the end), stored transposed [B, H, D, keys] so that the kernel's key tile is
  contiguous along the product's reduction dimension, as FP8 tensor-core operands must be;
- P: the softmax numerators times 448 (exp2 of the score less the running max less log2 448: ≤ 448, e4m3's
  largest value) in e4m3, the sum of the rows kept in float32 from the unrounded values, so the 448 cancels in
  the final division.
FP8 is a floating-point format: its rounding is relative to each value (2⁻⁴), whatever the block's scale, so
these scales only keep values inside its range; e4m3's range below the scale (2⁻⁶ · 448 / amax ≈ 3.5e-5 of the
block's largest value reaches subnormals) loses nothing that matters to a softmax.

`fp8_attention_reference` quantises q, k and v exactly as the kernels do and runs float32 attention over the
dequantised values: the kernel equals it up to P's rounding and the order of its sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditserve.kernels.fp8_quant import FP8, fp8_scale, to_fp8
from ditserve.kernels.fused_norm import _use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None

LOG2E = 1.4426950408889634
QUERY_BLOCK = 128  # rows of q per scale, and the attention kernel's query tile
KEY_BLOCK = 128  # keys of k per scale; the kernels' key tiles lie inside one
MIN_HEAD_DIM = 32  # q·kᵀ reduces over the head: 8-bit tensor-core products take 32 at a time
KEY_ALIGN = 16  # the transposed v's rows are padded to this many keys (16-byte aligned FP8 rows)


@dataclass(frozen=True)
class QuantizedHeads:
    """q, k and v in the layouts the kernel reads: q8, k8 [B, H, S, D] e4m3; vt8 [B, H, D, S_k padded to
    KEY_ALIGN] e4m3; q_scale [B, H, query blocks] (softmax scale and log2 e folded in), k_scale [B, H, key
    blocks], v_scale [B, H, D], all float32."""

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    vt8: torch.Tensor
    v_scale: torch.Tensor


def _block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] → [B, H, ⌈S / block⌉]: the scale of each run of `block` rows (the last shorter)."""
    b, h, n, d = x.shape
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - n))
    return fp8_scale(padded.view(b, h, blocks, block, d).abs().amax(dim=(-1, -2)))


def quantize_heads_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> QuantizedHeads:
    """The FP8 operands of q, k, v [B, S, H, D] (see the module's docstring), in torch."""
    b, n, h, d = q.shape
    nk = k.shape[1]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    q_block_scale = _block_scales(qf, QUERY_BLOCK)  # [B, H, query blocks]
    q8 = to_fp8(qf, q_block_scale.repeat_interleave(QUERY_BLOCK, dim=-1)[..., :n, None])
    k_scale = _block_scales(kf, KEY_BLOCK)  # [B, H, key blocks]
    k8 = to_fp8(kf, k_scale.repeat_interleave(KEY_BLOCK, dim=-1)[..., :nk, None])
    v_scale = fp8_scale(vf.abs().amax(dim=-2))  # [B, H, D]
    vt8 = torch.zeros(b, h, d, -(-nk // KEY_ALIGN) * KEY_ALIGN, dtype=FP8, device=q.device)
    vt8[..., :nk] = to_fp8(vf, v_scale[:, :, None, :]).transpose(-1, -2)
    return QuantizedHeads(q8, q_block_scale * (sm_scale * LOG2E), k8, k_scale, vt8, v_scale)


def dequantized(quantized: QuantizedHeads, n: int, nk: int, sm_scale: float):
    """(q, k, v) [B, H, S, D] float32 as the FP8 operands hold them (q without the folded softmax scale)."""
    qs = quantized.q_scale / (sm_scale * LOG2E)
    q = quantized.q8.float() * qs.repeat_interleave(QUERY_BLOCK, dim=-1)[..., :n, None]
    k = quantized.k8.float() * quantized.k_scale.repeat_interleave(KEY_BLOCK, dim=-1)[..., :nk, None]
    v = quantized.vt8[..., :nk].float().transpose(-1, -2) * quantized.v_scale[:, :, None, :]
    return q, k, v


def fp8_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v in float32 over q, k, v rounded to their FP8 operands; q, k, v and the result
    [B, S, H, D], the result in q's dtype."""
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = dequantized(quantize_heads_reference(q, k, v, sm_scale), q.shape[1], k.shape[1], sm_scale)
    weights = torch.softmax(qf @ kf.transpose(-1, -2) * sm_scale, dim=-1)
    return (weights @ vf).transpose(1, 2).to(q.dtype)


def fp8_attention_can_take(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels run these [B, S, H, D] inputs (else `fp8_attention` runs the reference)."""
    d = q.shape[-1]
    return (
        _use_triton(q)
        and MIN_HEAD_DIM <= d <= 256
        and d & (d - 1) == 0
        and v.shape[-1] == d
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


if triton is not None:

    @triton.jit
    def _quantize_qk_kernel(
        X, X8, SCALE, heads, n, sxb, sxn, sxh, scale_mul, D: tl.constexpr, BLOCK: tl.constexpr
    ):  # fmt: skip
        """A tile of BLOCK rows of one head of x [B, S, H, D] (any strides, unit in D) into x8 [B, H, S, D], with
        one scale for the tile, times scale_mul."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < n
        offs_d = tl.arange(0, D)
        x = tl.load(
            X + b * sxb + h * sxh + rows.to(tl.int64)[:, None] * sxn + offs_d[None, :], mask=row_ok[:, None], other=0.0
        ).to(tl.float32)
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0) / 448.0, 1e-12)
        x8 = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(SCALE + bh * tl.num_programs(0) + blk, scale * scale_mul)
        out = X8 + bh.to(tl.int64) * n * D + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(out, x8.to(X8.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _quantize_v_kernel(V, VT8, VSCALE, heads, n, n_pad, svb, svn, svh, D: tl.constexpr, BLOCK: tl.constexpr):
        """A tile of BLOCK keys of one head of v [B, S, H, D] into vt8 [B, H, D, S_pad], divided by the head's
        per-channel scales."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        keys = blk * BLOCK + tl.arange(0, BLOCK)
        key_ok = keys < n
        offs_d = tl.arange(0, D)
        v = tl.load(
            V + b * svb + h * svh + keys.to(tl.int64)[:, None] * svn + offs_d[None, :], mask=key_ok[:, None], other=0.0
        ).to(tl.float32)
        scale = tl.load(VSCALE + bh * D + offs_d)
        v8 = tl.clamp(v / scale[None, :], -448.0, 448.0).to(VT8.dtype.element_ty)
        out = VT8 + bh.to(tl.int64) * D * n_pad + offs_d[None, :] * n_pad + keys[:, None]
        tl.store(out, v8, mask=(keys < n_pad)[:, None])  # padding keys (v = 0) written as zeros

    @triton.jit
    def _fp8_attention_step(
        q, acc, m_i, l_i, k_head, ks_head, vt_head, n_pad, start, q_scale,
        N_KEYS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, WIDEN: tl.constexpr,
        KB: tl.constexpr,
    ):  # fmt: skip
        """One key tile [start, start + BLOCK_N) of the online softmax (inside one block of KB keys, k's scale
        block); MASKED: the last tile, partly past N_KEYS."""
        cols = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k_ptrs = k_head + cols.to(tl.int64)[:, None] * D + offs_d[None, :]
        vt_ptrs = vt_head + offs_d[:, None] * n_pad + cols[None, :]
        if MASKED:
            col_ok = cols < N_KEYS
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
        # The tile's scores share one scale (q's block times k's block, log2 e and softmax's scale folded in,
        # > 0): the row maxima are taken over the raw products and the scale goes into exp2's argument, one
        # multiply-add per score.
        scale = tl.load(ks_head + start // KB) * q_scale
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        # P times 448 (e4m3's largest value) straight from exp2: the numerators ≤ 448, the row sums scaled alike
        p = tl.math.exp2(s * scale - (m_new - 8.807354922057604)[:, None])  # log2(448)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WIDEN:  # Triton's CPU interpreter rounds some values to e4m3 wrongly: there P stays float32
            acc = tl.dot(p, tl.trans(vt.to(tl.float32)), acc * alpha[:, None])
        else:
            acc = tl.dot(p.to(vt.dtype), tl.trans(vt), acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _fp8_attention_kernel(
        Q8,
        QS,
        K8,
        KS,
        VT8,
        VS,
        OUT,
        heads,
        n_q,
        n_pad,
        sob,
        son,
        soh,
        N_KEYS: tl.constexpr,
        D: tl.constexpr,
        WIDEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        KB: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        offs_d = tl.arange(0, D)
        q = tl.load(
            Q8 + bh.to(tl.int64) * n_q * D + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        q_scale = tl.load(QS + bh * tl.num_programs(0) + m)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        k_head = K8 + bh.to(tl.int64) * N_KEYS * D
        ks_head = KS + bh * ((N_KEYS + KB - 1) // KB)
        vt_head = VT8 + bh.to(tl.int64) * D * n_pad
        # Whole key tiles unmasked (the loop Triton pipelines), then the last, partial one masked. The key count is
        # a compile-time constant: one kernel per sequence length, as a server sees a few (and Triton 3.6's
        # interpreter, which the CPU tests run, takes no loop bound known only at run time).
        for start in range(0, N_KEYS // BLOCK_N * BLOCK_N, BLOCK_N):
            acc, m_i, l_i = _fp8_attention_step(
                q, acc, m_i, l_i, k_head, ks_head, vt_head, n_pad, start, q_scale, N_KEYS, D, BLOCK_N, False, WIDEN, KB
            )
        if N_KEYS % BLOCK_N != 0:
            last = N_KEYS // BLOCK_N * BLOCK_N
            acc, m_i, l_i = _fp8_attention_step(
                q, acc, m_i, l_i, k_head, ks_head, vt_head, n_pad, last, q_scale, N_KEYS, D, BLOCK_N, True, WIDEN, KB
            )
        v_scale = tl.load(VS + bh * D + offs_d)
        out = acc * v_scale[None, :] / l_i[:, None]
        tl.store(
            OUT + b * sob + h * soh + rows.to(tl.int64)[:, None] * son + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None],
        )

    # Key tile (≤ KEY_BLOCK), warps and stages tried per (head dim, key count); the query tile is QUERY_BLOCK (the
    # q scales' block). Timed at Wan 480p × 81 on an H200: 64 keys on one warpgroup fastest (28.7 ms, 767 TFLOP/s),
    # 128 keys on two 29.6 ms; 128 keys on one warpgroup spills (55 ms) and is not tried.
    TUNE_CONFIGS = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4), (64, 8, 3))
    ]
    _tuned_kernel = triton.autotune(TUNE_CONFIGS, key=["D", "N_KEYS"])(_fp8_attention_kernel)


# Launches of fewer programs than this run the default config: timing configs costs more than it saves there.
TUNE_MIN_PROGRAMS = 2048
DEFAULT_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)


def quantize_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> QuantizedHeads:
    """`quantize_heads_reference` in three Triton kernels (and one torch reduction for v's channel maxima)."""
    b, n, h, d = q.shape
    nk = k.shape[1]
    blocks = -(-n // QUERY_BLOCK)
    q8 = torch.empty(b, h, n, d, dtype=FP8, device=q.device)
    q_scale = torch.empty(b, h, blocks, dtype=torch.float32, device=q.device)
    _quantize_qk_kernel[(blocks, b * h)](
        q, q8, q_scale, h, n, q.stride(0), q.stride(1), q.stride(2), sm_scale * LOG2E, D=d, BLOCK=QUERY_BLOCK,
    )  # fmt: skip
    k_blocks = -(-nk // KEY_BLOCK)
    k8 = torch.empty(b, h, nk, d, dtype=FP8, device=q.device)
    k_scale = torch.empty(b, h, k_blocks, dtype=torch.float32, device=q.device)
    _quantize_qk_kernel[(k_blocks, b * h)](
        k, k8, k_scale, h, nk, k.stride(0), k.stride(1), k.stride(2), 1.0, D=d, BLOCK=KEY_BLOCK
    )
    # max |v| over the keys in one read (no |v| temporary): [B, H, D]
    v_scale = fp8_scale(torch.linalg.vector_norm(v, ord=float("inf"), dim=1).float()).contiguous()
    n_pad = -(-nk // KEY_ALIGN) * KEY_ALIGN
    vt8 = torch.empty(b, h, d, n_pad, dtype=FP8, device=q.device)
    _quantize_v_kernel[(-(-n_pad // 64), b * h)](
        v, vt8, v_scale, h, nk, n_pad, v.stride(0), v.stride(1), v.stride(2), D=d, BLOCK=64
    )
    return QuantizedHeads(q8, q_scale, k8, k_scale, vt8, v_scale)


# torch.compile leaves these launches as they are (one graph break per attention).
@torch.compiler.disable
def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, config: dict | None = None
) -> torch.Tensor:
    """Non-causal attention of [B, S, H, D] q, k, v with FP8 products; the result [B, S_q, H, D] in q's dtype.
    `fp8_attention_reference` where the kernels cannot run (`fp8_attention_can_take`). `config` (BLOCK_N,
    num_warps, num_stages) None: autotuned on CUDA for large launches outside deterministic mode."""
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not fp8_attention_can_take(q, k, v):
        return fp8_attention_reference(q, k, v, sm_scale)
    if config is not None and KEY_BLOCK % config.get("BLOCK_N", KEY_BLOCK):
        raise ValueError(f"fp8 attention: key tile {config['BLOCK_N']} must divide k's scale block of {KEY_BLOCK}")
    b, n, h, d = q.shape
    nk = k.shape[1]
    ops = quantize_heads(q, k, v, sm_scale)
    out = torch.empty_like(q)
    grid = (ops.q_scale.shape[-1], b * h)
    args = (ops.q8, ops.q_scale, ops.k8, ops.k_scale, ops.vt8, ops.v_scale, out, h, n, ops.vt8.shape[-1])
    args = (*args, out.stride(0), out.stride(1), out.stride(2))
    tune = (
        config is None
        and q.is_cuda
        and grid[0] * grid[1] >= TUNE_MIN_PROGRAMS
        and not torch.are_deterministic_algorithms_enabled()
    )
    if tune:
        _tuned_kernel[grid](*args, N_KEYS=nk, D=d, WIDEN=False, BLOCK_M=QUERY_BLOCK, KB=KEY_BLOCK)
    else:
        launch = dict(N_KEYS=nk, D=d, WIDEN=not q.is_cuda, BLOCK_M=QUERY_BLOCK, KB=KEY_BLOCK)
        _fp8_attention_kernel[grid](*args, **launch, **(config or DEFAULT_CONFIG))
    return out


__all__ = [
    "QuantizedHeads",
    "fp8_attention",
    "fp8_attention_can_take",
    "fp8_attention_reference",
    "quantize_heads",
    "quantize_heads_reference",
]
