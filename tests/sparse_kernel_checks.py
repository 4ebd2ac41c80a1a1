"""The block-sparse attention kernel against its torch reference, for sliding tiles, SLA (its linear branch in the
kernel's epilogue) and VSA (its gated coarse term in the epilogue), at the default config and at others (key tiles
narrower and wider than a key block); VSA's whole path also against a from-scratch float64 rendering of FastVideo's
definition. Run as a script with TRITON_INTERPRET=1 on the CPU (tests/test_sparse_attention.py), imported by the
CUDA tests."""

from __future__ import annotations

import math
import sys

import torch

from ditserve.kernels import block_sparse_attention as kernel
from ditserve.layers.attention import attention_reference
from ditserve.layers.sparse_attention import (
    SLA,
    SLA_KEY_BLOCK,
    SLA_QUERY_BLOCK,
    VSA,
    SlidingTile,
    _runs,
    sla_attention,
    sla_block_map,
    sla_key_statistics,
    sliding_tile_attention,
    tile_layout,
    vsa_attention,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_sliding_tile(device: str, dtype: torch.dtype, grid, heads: int, d: int, window, tol: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    # q, k, v as strided views of one fused projection, as the model hands them over
    qkv = torch.randn(1, n, 3, heads, d, generator=g).to(device, dtype)
    q, k, v = qkv.unbind(2)
    assert kernel._use_triton(q), "the Triton path is not taken"
    out = sliding_tile_attention(q, k, v, grid, SlidingTile(window))
    layout = tile_layout(tuple(grid), tuple(window), q.device)
    blocks = (layout.starts, layout.lengths)
    ref = kernel.block_sparse_attention_reference(
        q.double(), k.double(), v.double(), blocks, blocks, layout.lut, layout.counts, layout.order
    )
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel(out, ref) < tol, ("sliding-tile", rel(out, ref), grid, window)
    big = tuple(2 * t + 1 for t in grid)  # a window over every tile: dense attention
    dense = sliding_tile_attention(q, k, v, grid, SlidingTile(big))
    assert rel(dense, attention_reference(q.double(), k.double(), v.double())) < tol, ("full window", grid)


def check_sla(device: str, dtype: torch.dtype, b: int, n: int, heads: int, d: int, topk: float, tol: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, heads, d, generator=g).to(device, dtype) for _ in range(3))
    projection = torch.nn.Linear(d, d).to(device, dtype)
    with torch.no_grad():
        projection.weight.copy_(0.1 * torch.randn(d, d, generator=g))
        out = sla_attention(q, k, v, SLA(topk), projection)
        ref = sla_attention(q, k, v, SLA(topk), projection, reference=True)
    assert rel(out, ref) < tol, ("sla", rel(out, ref), n, topk)


def check_sla_fp8(device: str, dtype: torch.dtype, b: int, n: int, heads: int, d: int, topk: float, seed: int):
    """`sla-fp8`: the kernel on e4m3 operands against the reference over the same rounding of q, k and v. On CUDA
    what is left is P's rounding (about 2%); Triton's CPU interpreter widens the operands (P stays float32) and gets
    some of the quantiser's round-ups wrong (tests/kernel_checks.py), so there the bound only catches indexing."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, heads, d, generator=g).to(device, dtype) for _ in range(3))
    projection = torch.nn.Linear(d, d).to(device, dtype)
    with torch.no_grad():
        projection.weight.copy_(0.1 * torch.randn(d, d, generator=g))
        out = sla_attention(q, k, v, SLA(topk, fp8=True), projection)
        ref = sla_attention(q, k, v, SLA(topk, fp8=True), projection, reference=True)
        plain = sla_attention(q, k, v, SLA(topk), projection, reference=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, ref) < (5e-2 if device != "cpu" else 0.15), ("sla-fp8", rel(out, ref), n, topk)
    assert rel(ref, plain) < 0.1, ("sla-fp8 reference", rel(ref, plain))
    # The kernel alone (no epilogue) against exact attention over the operands it was given: the quantiser's own
    # rounding out of the way, what is left on the CPU (P widened) is float32 summation order.
    from ditserve.kernels.fp8_attention import dequantized, quantize_heads

    lut, counts = sla_block_map(q, k, topk)
    q_blocks, kv_blocks = _runs(n, SLA_QUERY_BLOCK, q.device), _runs(n, SLA_KEY_BLOCK, q.device)
    bare = kernel.block_sparse_attention(q, k, v, q_blocks, kv_blocks, lut, counts, fp8=True)
    own = (t.transpose(1, 2) for t in dequantized(quantize_heads(q, k, v, d**-0.5), n, n, d**-0.5))
    exact = kernel.block_sparse_attention_reference(*own, q_blocks, kv_blocks, lut, counts)
    bound = (1e-5 if dtype == torch.float32 else 1e-2) if device == "cpu" else 5e-2
    assert rel(bare, exact) < bound, ("sla-fp8 kernel", rel(bare, exact))
    # key tiles of two key blocks (one softmax update per pair; an odd count leaves the last pair half empty), the
    # blocks' bounds computed from the runs and every LUT row full, as sla_attention launches it
    paired = kernel.KernelConfig(2 * SLA_KEY_BLOCK, 8, 2)
    two = kernel.block_sparse_attention(q, k, v, q_blocks, None, lut, None, fp8=True, config=paired)
    assert rel(two, exact) < bound, ("sla-fp8 kernel, paired key blocks", rel(two, exact), lut.shape[-1])
    # the same pairs read from the tables, every step masked
    tables = kernel.block_sparse_attention(q, k, v, q_blocks, kv_blocks, lut, counts, fp8=True, config=paired)
    assert rel(tables, exact) < bound, ("sla-fp8 kernel, paired key blocks from tables", rel(tables, exact))


def check_key_statistics(device: str, dtype: torch.dtype, b: int, n: int, heads: int, d: int, tol: float, seed: int):
    """SLA's one-pass key statistics against their torch reference, over strided views of a fused projection."""
    from ditserve.kernels import key_statistics as stats

    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, n, 2, heads, d, generator=g).to(device, dtype).unbind(2)
    assert stats.key_statistics_can_take(k, v), "the Triton path is not taken"
    out = stats.key_statistics(k, v)
    ref = stats.key_statistics_reference(k, v)
    for name in ("kv", "k_sum"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.shape == want.shape and got.dtype == torch.float32, (name, got.shape, want.shape)
        assert rel(got, want) < tol, ("key statistics", name, rel(got, want), n)


def vsa_plain(q, k, v, gate, grid, sparsity: float) -> torch.Tensor:
    """VSA from its definition, float64, token by token: each token's cube from its (frame, row, column), the
    cube means, dense attention of the means, the ⌈(1 − sparsity)·cubes⌉ best key cubes per query cube, softmax
    attention over those cubes' tokens, plus gate × the coarse output of the query's cube."""
    b, n, h, d = q.shape
    f_, h_, w_ = grid
    t = torch.arange(n)
    frame, row, col = t // (h_ * w_), (t // w_) % h_, t % w_
    cubes_per = [-(-g // 4) for g in grid]
    cube = (frame // 4 * cubes_per[1] + row // 4) * cubes_per[2] + col // 4
    m = cubes_per[0] * cubes_per[1] * cubes_per[2]
    size = torch.bincount(cube, minlength=m).double()
    qd, kd, vd, gd = (x.double().transpose(1, 2) for x in (q, k, v, gate))  # [B, H, N, D]

    def means(x):
        return torch.zeros(b, h, m, d, dtype=torch.float64).index_add_(2, cube, x) / size[:, None]

    q_c, k_c, v_c = means(qd), means(kd), means(vd)
    scores = q_c @ k_c.transpose(-1, -2) * d**-0.5
    chosen = max(1, min(m, math.ceil((1 - sparsity) * m)))
    picked = torch.zeros(b, h, m, m, dtype=torch.bool).scatter_(-1, scores.topk(chosen, -1).indices, True)
    allowed = picked[:, :, cube][:, :, :, cube]  # [B, H, N, N]
    fine = (qd @ kd.transpose(-1, -2) * d**-0.5).masked_fill(~allowed, float("-inf")).softmax(-1) @ vd
    coarse = (scores.softmax(-1) @ v_c)[:, :, cube]
    return (fine + gd * coarse).transpose(1, 2)


def check_vsa(device: str, dtype: torch.dtype, b: int, grid, heads: int, d: int, sparsity: float, tol: float, seed):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    qkvg = torch.randn(b, n, 4, heads, d, generator=g).to(device, dtype)
    q, k, v, gate = qkvg.unbind(2)  # strided views of one fused projection, as the model hands them over
    assert kernel._use_triton(q), "the Triton path is not taken"
    out = vsa_attention(q, k, v, gate, grid, VSA(sparsity))
    ref = vsa_attention(q, k, v, gate, grid, VSA(sparsity), reference=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel(out, ref) < tol, ("vsa", rel(out, ref), grid, sparsity)
    if dtype == torch.float32:  # the same cube choice as float64 needs float32 scores
        plain = vsa_plain(q.cpu(), k.cpu(), v.cpu(), gate.cpu(), grid, sparsity)
        assert rel(out.cpu(), plain) < tol, ("vsa vs its definition", rel(out.cpu(), plain), grid, sparsity)


def check_configs(device: str, dtype: torch.dtype, configs, tol: float, d: int = 16, heads: int = 2) -> None:
    """Explicit kernel configs (key tiles narrower and wider than a key block) against the reference, with an
    order (sliding tiles) and with SLA's runs and linear epilogue."""
    g = torch.Generator().manual_seed(5)
    grid = (3, 10, 9)
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, n, heads, d, generator=g).to(device, dtype) for _ in range(3))
    layout = tile_layout(grid, (3, 1, 1), q.device)
    blocks = (layout.starts, layout.lengths)
    tile_ref = kernel.block_sparse_attention_reference(q, k, v, blocks, blocks, layout.lut, layout.counts, layout.order)
    projection = torch.nn.Linear(d, d).to(device, dtype)
    with torch.no_grad():
        lut, counts = sla_block_map(q, k, 0.5)
        q_blocks, kv_blocks = _runs(n, SLA_QUERY_BLOCK, q.device), _runs(n, SLA_KEY_BLOCK, q.device)
        linear = kernel.LinearBranch(*sla_key_statistics(k, v, projection))
        sla_ref = kernel.block_sparse_attention_reference(q, k, v, q_blocks, kv_blocks, lut, counts, epilogue=linear)
        for config in configs:
            out = kernel.block_sparse_attention(
                q,
                k,
                v,
                blocks,
                blocks,
                layout.lut,
                layout.counts,
                layout.order,
                None,
                layout.block,
                layout.block,
                config=config,
            )
            assert rel(out, tile_ref) < tol, ("tiles", config, rel(out, tile_ref))
            out = kernel.block_sparse_attention(
                q,
                k,
                v,
                q_blocks,
                kv_blocks,
                lut,
                counts,
                None,
                None,
                SLA_QUERY_BLOCK,
                SLA_KEY_BLOCK,
                linear,
                config=config,
            )
            assert rel(out, sla_ref) < tol, ("sla", config, rel(out, sla_ref))


def run_all(device: str, dtype: torch.dtype, tol: float, sizes: str = "small") -> None:
    if sizes == "small":
        for seed, (grid, window) in enumerate([((3, 9, 10), (1, 1, 1)), ((3, 10, 9), (3, 1, 1))]):
            check_sliding_tile(device, dtype, grid, 2, 16, window, tol, seed)
        for seed, (n, topk) in enumerate([(300, 0.5), (140, 0.1)]):
            check_key_statistics(device, dtype, 1 + seed, n, 2, 16, 1e-5 if dtype == torch.float32 else 1e-2, seed)
            check_sla(device, dtype, 1 + seed, n, 1, 16, topk, tol, seed)
            check_sla_fp8(device, dtype, 1 + seed, n, 2, 32, topk, seed)
        if dtype == torch.float32:  # key-block pairs: an even count (two unmasked pairs, then the partial one)
            check_sla_fp8(device, dtype, 1, 600, 1, 32, 0.6, 2)
        for seed, (grid, sparsity) in enumerate([((5, 6, 9), 0.5), ((4, 8, 4), 0.0)]):
            check_vsa(device, dtype, 1 + seed, grid, 2, 16, sparsity, tol, seed)
        if dtype == torch.float32:
            configs = [kernel.KernelConfig(32, 4, 1), kernel.KernelConfig(128, 4, 1), kernel.KernelConfig(256, 4, 1)]
            check_configs(device, dtype, configs, tol)
    else:
        check_sliding_tile(device, dtype, (6, 30, 52), 4, 128, (3, 3, 5), tol, 0)
        check_key_statistics(device, dtype, 2, 75600 // 8, 3, 128, 1e-2, 3)
        check_sla(device, dtype, 1, 9360, 4, 128, 0.1, tol, 1)
        check_sla_fp8(device, dtype, 1, 9360, 4, 128, 0.1, 1)
        check_vsa(device, dtype, 1, (6, 30, 52), 4, 128, 0.8, tol, 2)
        tried = kernel._fitting_configs(kernel.TUNE_CONFIGS, {}, BLOCK_M=128)  # what autotuning times for both
        configs = [kernel.KernelConfig(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tried]
        check_configs(device, dtype, configs, tol, d=128, heads=4)


if __name__ == "__main__":
    run_all("cpu", torch.float32, 1e-5)
    run_all("cpu", torch.bfloat16, 2e-2)
    print("sparse kernel checks passed")
    sys.exit(0)
