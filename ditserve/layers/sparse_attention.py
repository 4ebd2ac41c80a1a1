"""Sparse attention backends for video self-attention, on the block-sparse kernel (kernels/block_sparse_attention.py).

Three patterns, chosen by the attention backend's name (config.py `parse_attention_backend`):
- `sliding-tile[:T,H,W]`: training-free. The (frames, rows, columns) token grid is cut into tiles of `TILE` tokens
  (the tiles at the grid's far edges shorter); each query tile attends to the window of T × H × W tiles around it,
  shifted inwards at the grid's edges so that every tile sees the same number of keys (the pattern of sliding-tile
  attention, Zhang et al. 2025, "Fast Video Generation with Sliding Tile Attention"). Video DiTs' attention is
  mostly local in space and time, so the window keeps most of each row's softmax mass; what it drops is measured in
  RESULTS.md. The tiles are read in place through a token order: q, k and v stay in the model's raster order.
- `sla[:ratio]`: SLA, sparse-linear attention (Zhang et al. 2025, arXiv:2509.24006), for checkpoints fine-tuned
  with it (TurboDiffusion's checkpoints). Queries in runs of 128 and keys in runs of 64 are mean-pooled (the keys
  centred on their mean first); each query block attends exactly to the `ratio` of key blocks with the highest
  pooled scores, and a linear attention over all keys (softmax feature maps over the head dimension), through the
  checkpoint's learned projection `proj_l` (head_dim → head_dim, per block of the model), is added. This is what
  TurboDiffusion's published SLA module computes (its linear branch spans every key, not only the unselected ones).
  The linear branch's key side is two reductions ([B, H, D, D], [B, H, D]) in one pass over k and v
  (kernels/key_statistics.py), proj_l folded in; its query side runs in the kernel's epilogue.
- `vsa[:sparsity]`: video sparse attention (Zhang et al. 2025, arXiv:2505.13389), for checkpoints trained with it
  (FastVideo's FastWan). The grid is cut into cubes of 4 × 4 × 4 tokens; the cube means attend densely (the coarse
  stage), each query cube keeps the ⌈(1 − sparsity) · cubes⌉ key cubes of highest coarse score and attends to their
  tokens exactly (the fine stage, cubes read in place through a token order), and the coarse output of the query's
  cube, times a learned per-token gate (`to_gate_compress` of the block's input), is added in the epilogue.

All take q, k, v [B, N, H, D] over the whole sequence of the video tokens in raster order (frames slowest), which
is what each rank holds under Ulysses (heads split, every token), and return [B, N, H, D].
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ditserve.kernels.block_sparse_attention import (
    GatedCoarse,
    LinearBranch,
    _runs,
    block_sparse_attention,
    block_sparse_attention_reference,
)
from ditserve.kernels.key_statistics import key_statistics

# Tokens of one tile: 2 frames × 8 rows × 8 columns = 128, the kernel's query block.
TILE = (2, 8, 8)
DEFAULT_WINDOW = (3, 3, 5)  # tiles per axis each query tile attends to (frames, rows, columns)
SLA_QUERY_BLOCK, SLA_KEY_BLOCK = 128, 64  # as TurboDiffusion runs SLA (BLKQ=128, BLKK=64)
DEFAULT_SLA_TOPK = 0.1  # TurboDiffusion's default --sla_topk (it suggests 0.15 for better quality)
LINEAR_EPS = 1e-5  # the linear branch's normaliser, as published
VSA_CUBE = (4, 4, 4)  # VSA's cubes of (frames, rows, columns) tokens: 64, the kernel's query and key block
DEFAULT_VSA_SPARSITY = 0.8  # FastWan2.1-T2V-1.3B's VSA_sparsity (FastVideo runs its 14B checkpoints at 0.9)


@dataclass(frozen=True)
class SlidingTile:
    window: tuple[int, int, int] = DEFAULT_WINDOW


@dataclass(frozen=True)
class SLA:
    topk: float = DEFAULT_SLA_TOPK
    fp8: bool = False  # `sla-fp8`: the block-sparse products on FP8 tensor cores (TurboDiffusion's quantised SLA)


@dataclass(frozen=True)
class VSA:
    sparsity: float = DEFAULT_VSA_SPARSITY  # the share of key cubes each query cube leaves out


def parse_sparse_backend(name: str) -> SlidingTile | SLA | VSA | None:
    """The sparse pattern a backend name asks for, None for a dense backend. Names are checked by config.py."""
    kind, _, arg = name.partition(":")
    if kind == "sliding-tile":
        return SlidingTile(tuple(int(x) for x in arg.split(",")) if arg else DEFAULT_WINDOW)  # type: ignore[arg-type]
    if kind in ("sla", "sla-fp8"):
        return SLA(float(arg) if arg else DEFAULT_SLA_TOPK, fp8=kind == "sla-fp8")
    if kind == "vsa":
        return VSA(float(arg) if arg else DEFAULT_VSA_SPARSITY)
    return None


# ---- sliding tiles ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileLayout:
    """The tiles of one token grid and their window pattern, as the kernel's tables (all on one device)."""

    order: torch.Tensor  # [N] int32: token (raster index) at each position of the tile-major order
    starts: torch.Tensor  # [tiles] int32: where each tile begins in that order
    lengths: torch.Tensor  # [tiles] int32
    lut: torch.Tensor  # [1, 1, tiles, K] int32: the key tiles of each query tile
    counts: torch.Tensor  # [1, 1, tiles] int32: K for every tile
    block: int  # the longest tile, rounded up to a power of two (the kernel's query block)


def _window_start(index: torch.Tensor, window: int, tiles: int) -> torch.Tensor:
    """First tile of each query tile's window along one axis: centred, shifted inwards at the edges."""
    w = min(window, tiles)
    return (index - w // 2).clamp(0, tiles - w)


@functools.lru_cache(maxsize=16)
def tile_layout(
    grid: tuple[int, int, int], window: tuple[int, int, int], device: torch.device, tile: tuple[int, int, int] = TILE
) -> TileLayout:
    """The tile tables of a (frames, rows, columns) grid (cached: they depend only on the shape)."""
    f, h, w = grid
    tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    # Tile coordinates and position inside the tile of every raster token; sort by (tile, position).
    ft, ht, wt = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    coords = [ft.flatten(), ht.flatten(), wt.flatten()]
    tile_id = torch.zeros_like(coords[0])
    for axis in range(3):
        tile_id = tile_id * tiles[axis] + coords[axis] // tile[axis]
    order = torch.argsort(tile_id * (f * h * w) + torch.arange(f * h * w), stable=True)
    lengths = torch.bincount(tile_id, minlength=math.prod(tiles))
    starts = torch.cumsum(lengths, 0) - lengths
    # Each query tile's window: the product of its per-axis ranges.
    axes = torch.meshgrid(*(torch.arange(n) for n in tiles), indexing="ij")
    ranges = []
    for axis in range(3):
        first = _window_start(axes[axis].flatten(), window[axis], tiles[axis])
        ranges.append(first[:, None] + torch.arange(min(window[axis], tiles[axis]))[None, :])
    ta, tb, tc = ranges
    keys = (ta[:, :, None, None] * tiles[1] + tb[:, None, :, None]) * tiles[2] + tc[:, None, None, :]
    lut = keys.flatten(1)
    longest = int(lengths.max())
    return TileLayout(
        order=order.to(device, torch.int32),
        starts=starts.to(device, torch.int32),
        lengths=lengths.to(device, torch.int32),
        lut=lut[None, None].to(device, torch.int32),
        counts=torch.full((1, 1, lut.shape[0]), lut.shape[1], dtype=torch.int32, device=device),
        block=max(16, 1 << (longest - 1).bit_length()),
    )


@torch.compiler.disable  # a Triton launch over cached tables: compiled blocks call it as it is
def sliding_tile_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], pattern: SlidingTile
) -> torch.Tensor:
    """Sliding-tile attention over the video tokens of `grid` (q, k, v [B, F·H·W, heads, D] in raster order)."""
    if q.shape[1] != math.prod(grid) or k.shape[1] != q.shape[1]:
        raise ValueError(f"sliding-tile attention: {q.shape[1]} queries, {k.shape[1]} keys for a {grid} token grid")
    layout = tile_layout(tuple(grid), pattern.window, q.device)
    blocks = (layout.starts, layout.lengths)
    return block_sparse_attention(
        q, k, v, blocks, blocks, layout.lut, layout.counts, layout.order, block_m=layout.block, max_kv_len=layout.block
    )


def sliding_tile_density(grid: tuple[int, int, int], window: tuple[int, int, int], tile=TILE) -> float:
    """The fraction of (query, key) pairs the pattern computes (the tiles at the edges counted as they are)."""
    layout = tile_layout(tuple(grid), tuple(window), torch.device("cpu"), tuple(tile))
    lengths = layout.lengths.long()
    per_query_tile = lengths[layout.lut[0, 0].long()].sum(-1)
    return float((lengths * per_query_tile).sum()) / math.prod(grid) ** 2


# ---- SLA ---------------------------------------------------------------------------------------------------------
def _run_sums(x: torch.Tensor, size: int, axis: int = 1) -> torch.Tensor:
    """Float32 sums of each run of `size` entries along `axis` (the last run shorter): [B, N, H, D] →
    [B, ceil(N/size), H, D] for the default axis. Reduced from x as it is (no float copy, no padding)."""
    n = x.shape[axis]
    full = n // size
    sums = x.narrow(axis, 0, full * size).unflatten(axis, (full, size)).sum(axis + 1, dtype=torch.float32)
    if n > full * size:
        rest = x.narrow(axis, full * size, n - full * size).sum(axis, keepdim=True, dtype=torch.float32)
        sums = torch.cat([sums, rest], dim=axis)
    return sums


def _run_lengths(n: int, size: int, device: torch.device) -> torch.Tensor:
    return (n - torch.arange(0, n, size, device=device)).clamp(max=size).float()


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLA's choice of key blocks: (lut [B, H, Mq, K], counts [B, H, Mq]), K = max(1, ⌊topk · Mk⌋) key blocks per
    query block, those of highest pooled score (pooled queries · pooled keys centred on the keys' mean). The
    means are float32 (TurboDiffusion centres the keys in their own dtype first: the same up to rounding); the
    centred pooled keys are the pooled keys less the mean, so the keys are never copied."""
    n, nk = q.shape[1], k.shape[1]
    pooled_q = _run_sums(q, SLA_QUERY_BLOCK) / _run_lengths(n, SLA_QUERY_BLOCK, q.device)[None, :, None, None]
    key_block_sums = _run_sums(k, SLA_KEY_BLOCK).transpose(1, 2)  # [B, H, Mk, D]
    k_mean = key_block_sums.sum(2, keepdim=True) / nk
    pooled_k = key_block_sums / _run_lengths(nk, SLA_KEY_BLOCK, q.device)[None, None, :, None] - k_mean
    scores = pooled_q.transpose(1, 2) @ pooled_k.transpose(-1, -2)  # [B, H, Mq, Mk]
    mk = scores.shape[-1]
    chosen = max(1, min(mk, int(topk * mk)))
    lut = torch.topk(scores, chosen, dim=-1, sorted=False).indices.to(torch.int32)
    return lut, torch.full(lut.shape[:-1], chosen, dtype=torch.int32, device=q.device)


def sla_linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """φ(q)(φ(k)ᵀv) / (ε + φ(q)·Σφ(k)) with φ the softmax over the head dimension, float32, [B, N, H, D]: the
    published formula, for the reference."""
    phi_q, phi_k = torch.softmax(q.float(), dim=-1), torch.softmax(k.float(), dim=-1)
    kv = torch.einsum("bnhd,bnhe->bhde", phi_k, v.float())
    k_sum = phi_k.sum(dim=1)  # [B, H, D]
    numerator = torch.einsum("bnhd,bhde->bnhe", phi_q, kv)
    denominator = torch.einsum("bnhd,bhd->bnh", phi_q, k_sum)[..., None] + LINEAR_EPS
    return numerator / denominator


def sla_key_statistics(
    k: torch.Tensor, v: torch.Tensor, projection: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key side of SLA's linear branch with the projection folded in (kernels' `LinearBranch`): (Σ φ(k) vᵀ) Wᵀ
    [B, H, D, D] in k's dtype, Σ φ(k) [B, H, D] float32, the bias [D] float32; the sums in one pass over k and v
    (kernels/key_statistics.py). W is applied through the module itself (W x = proj(x) − proj(0)), so a LoRA or
    FP8 projection folds the same way."""
    statistics = key_statistics(k, v)
    bias = projection(torch.zeros(1, k.shape[-1], device=k.device, dtype=k.dtype)).float()[0]
    kv_w = projection(statistics.kv.to(k.dtype)).float() - bias
    return kv_w.to(k.dtype), statistics.k_sum, bias


@torch.compiler.disable
def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SLA,
    projection: torch.nn.Module,
    reference: bool = False,
) -> torch.Tensor:
    """SLA over the whole sequence: block-sparse attention over the chosen key blocks plus `projection` (the
    checkpoint's proj_l) of the linear branch. The fast path is one kernel launch, the linear branch's query side
    in its epilogue; `reference` computes the published formula in plain torch (float32)."""
    q_blocks = _runs(q.shape[1], SLA_QUERY_BLOCK, q.device)
    if reference:
        lut, counts = sla_block_map(q, k, pattern.topk)
        kv_blocks = _runs(k.shape[1], SLA_KEY_BLOCK, q.device)
        sparse = block_sparse_attention_reference(q, k, v, q_blocks, kv_blocks, lut, counts, fp8=pattern.fp8)
        linear = projection(sla_linear_branch(q, k, v).to(projection.weight.dtype))
        return (sparse.float() + linear.float()).to(q.dtype)
    lut, _ = sla_block_map(q, k, pattern.topk)
    linear = LinearBranch(*sla_key_statistics(k, v, projection), LINEAR_EPS)
    # key blocks: runs of SLA_KEY_BLOCK from the first (no tables); counts: every query block lists as many
    return block_sparse_attention(
        q,
        k,
        v,
        q_blocks,
        None,
        lut,
        None,
        block_m=SLA_QUERY_BLOCK,
        max_kv_len=SLA_KEY_BLOCK,
        epilogue=linear,
        fp8=pattern.fp8,
    )


# ---- VSA ---------------------------------------------------------------------------------------------------------
def vsa_cube_means(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, F·H·W, heads, D] in raster order → [B, heads, cubes, D]: the mean of each VSA_CUBE cube of the grid
    over its tokens (the cubes at the far edges smaller), cubes in raster order of their coordinates, float32
    sums written in x's dtype (as FastVideo pools). Reduced one axis at a time, columns first, so only the
    first sum reads the whole tensor."""
    b, _, heads, d = x.shape
    sums = x.view(b, *grid, heads, d)
    for axis in (3, 2, 1):
        sums = _run_sums(sums, VSA_CUBE[axis - 1], axis)
    counts = [_run_lengths(g, c, x.device) for g, c in zip(grid, VSA_CUBE)]
    volume = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    means = sums / volume[None, :, :, :, None, None]
    return means.flatten(1, 3).transpose(1, 2).to(x.dtype)


def vsa_coarse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], sparsity: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VSA's coarse stage: the cube means attend densely. Returns (lut [B, H, M, K] of the K = ⌈(1 − sparsity)·M⌉
    key cubes of highest coarse score per query cube, counts [B, H, M], the coarse output [B, H, M, D] float32)."""
    q_c, k_c, v_c = (vsa_cube_means(t, grid).float() for t in (q, k, v))
    scores = (q_c @ k_c.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, M, M]
    m = scores.shape[-1]
    chosen = max(1, min(m, math.ceil((1 - sparsity) * m)))
    lut = torch.topk(scores, chosen, dim=-1, sorted=False).indices.to(torch.int32)
    coarse = torch.softmax(scores, dim=-1) @ v_c
    return lut, torch.full(lut.shape[:-1], chosen, dtype=torch.int32, device=q.device), coarse


@torch.compiler.disable
def vsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    grid: tuple[int, int, int],
    pattern: VSA,
    reference: bool = False,
) -> torch.Tensor:
    """Video sparse attention over the tokens of `grid` (q, k, v and the learned gate [B, F·H·W, heads, D] in raster
    order): fine attention of each query cube over its chosen key cubes, plus gate × the coarse output of its cube.
    The fast path is one kernel launch (cubes read in place through the token order, the gated coarse term in its
    epilogue); `reference` computes the fine stage in plain torch."""
    if q.shape[1] != math.prod(grid) or k.shape[1] != q.shape[1]:
        raise ValueError(f"vsa attention: {q.shape[1]} queries, {k.shape[1]} keys for a {grid} token grid")
    layout = tile_layout(tuple(grid), (1, 1, 1), q.device, VSA_CUBE)
    lut, counts, coarse = vsa_coarse(q, k, v, grid, pattern.sparsity)
    cubes = (layout.starts, layout.lengths)
    term = GatedCoarse(gate, coarse)
    if reference:
        return block_sparse_attention_reference(q, k, v, cubes, cubes, lut, counts, layout.order, epilogue=term)
    return block_sparse_attention(
        q, k, v, cubes, cubes, lut, counts, layout.order, block_m=layout.block, max_kv_len=layout.block, epilogue=term
    )


__all__ = [
    "SLA",
    "VSA",
    "SlidingTile",
    "TileLayout",
    "parse_sparse_backend",
    "sla_attention",
    "sla_block_map",
    "sla_key_statistics",
    "sla_linear_branch",
    "sliding_tile_attention",
    "sliding_tile_density",
    "tile_layout",
    "vsa_attention",
    "vsa_coarse",
    "vsa_cube_means",
]
