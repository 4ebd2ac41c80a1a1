"""The block-sparse attention kernel against its torch reference, for sliding tiles and SLA's block map: run as a
script with TRITON_INTERPRET=1 on the CPU (tests/test_sparse_attention.py), imported by the CUDA test."""

from __future__ import annotations

import sys

import torch

from ditserve.kernels import block_sparse_attention as kernel
from ditserve.layers.attention import attention_reference
from ditserve.layers.sparse_attention import (
    SLA,
    SlidingTile,
    sla_attention,
    sliding_tile_attention,
    tile_layout,
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


def run_all(device: str, dtype: torch.dtype, tol: float, sizes: str = "small") -> None:
    if sizes == "small":
        for seed, (grid, window) in enumerate([((3, 9, 10), (1, 1, 1)), ((3, 10, 9), (3, 1, 1))]):
            check_sliding_tile(device, dtype, grid, 2, 16, window, tol, seed)
        for seed, (n, topk) in enumerate([(300, 0.5), (140, 0.1)]):
            check_sla(device, dtype, 1 + seed, n, 1, 16, topk, tol, seed)
    else:
        check_sliding_tile(device, dtype, (6, 30, 52), 4, 128, (3, 3, 5), tol, 0)
        check_sla(device, dtype, 1, 9360, 4, 128, 0.1, tol, 1)


if __name__ == "__main__":
    run_all("cpu", torch.float32, 1e-5)
    run_all("cpu", torch.bfloat16, 2e-2)
    print("sparse kernel checks passed")
    sys.exit(0)
