"""Tiled VAE decoding, with the tiles spread over the ranks.

A large image's decode is the last single-GPU stage of a multi-GPU request (and its peak memory). With tiling on,
the latent is cut into overlapping tiles exactly as diffusers' `AutoencoderKL.enable_tiling()` cuts it, each rank
decodes every world-th tile, an all-gather gives every rank all decoded tiles, and the seams are blended as
diffusers blends them. With one rank the result is diffusers' tiled decode bit for bit; with several it is the
same tensor, since each tile is decoded alone whichever rank decodes it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def needs_tiling(vae, z: torch.Tensor) -> bool:
    """diffusers' rule: tile when tiling is on and the latent is larger than one tile."""
    tile = vae.tile_latent_min_size
    return bool(getattr(vae, "use_tiling", False)) and (z.shape[-1] > tile or z.shape[-2] > tile)


def _blend_weights(extent: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 − y/extent, y/extent) for y < extent, each worked out in float64 and then rounded to float32: the values
    diffusers' Python-scalar arithmetic multiplies by."""
    old = torch.tensor([1 - y / extent for y in range(extent)], dtype=torch.float64)
    new = torch.tensor([y / extent for y in range(extent)], dtype=torch.float64)
    return old.to(device, torch.float32), new.to(device, torch.float32)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Fade the end of `a` into the start of `b` along `dim`, in place on b (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return
    shape = [1] * b.dim()
    shape[dim] = extent
    w_old, w_new = (w.view(shape) for w in _blend_weights(extent, b.device))
    tail = a.narrow(dim, a.shape[dim] - extent, extent)
    head = b.narrow(dim, 0, extent)
    # Each product is rounded to the tile's dtype before the sum, as with a Python-scalar weight.
    head.copy_((tail.float() * w_old).to(b.dtype) + (head.float() * w_new).to(b.dtype))


def tiled_decode(vae, z: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Decode latents z [B, C, H, W] in overlapping tiles; with `group`, the tiles are shared out over its ranks."""
    tile = vae.tile_latent_min_size
    overlap = vae.tile_overlap_factor
    stride = int(tile * (1 - overlap))
    sample_tile = vae.tile_sample_min_size
    extent = int(sample_tile * overlap)
    limit = sample_tile - extent
    scale = sample_tile // tile
    rows, cols = list(range(0, z.shape[2], stride)), list(range(0, z.shape[3], stride))
    positions = [(i, j) for i in rows for j in cols]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)

    def decode(i: int, j: int) -> torch.Tensor:
        piece = z[:, :, i : i + tile, j : j + tile]
        if vae.post_quant_conv is not None:
            piece = vae.post_quant_conv(piece)
        return vae.decoder(piece)

    if world == 1:
        decoded = [decode(i, j) for i, j in positions]
    else:
        # Every tile padded to a full tile's size, so one all-gather moves them; each tile's real size is known
        # from its position on every rank.
        per_rank = math.ceil(len(positions) / world)
        b, channels = z.shape[0], vae.config.out_channels
        mine = z.new_zeros((per_rank, b, channels, sample_tile, sample_tile))
        for slot, (i, j) in enumerate(positions[rank::world]):
            out = decode(i, j)
            mine[slot, :, :, : out.shape[2], : out.shape[3]] = out
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        decoded = []
        for k, (i, j) in enumerate(positions):
            h, w = min(tile, z.shape[2] - i) * scale, min(tile, z.shape[3] - j) * scale
            decoded.append(gathered[k % world][k // world, :, :, :h, :w].clone())

    grid = [decoded[r * len(cols) : (r + 1) * len(cols)] for r in range(len(rows))]
    result_rows = []
    for r, row in enumerate(grid):
        pieces = []
        for c, piece in enumerate(row):
            # As diffusers: the tile above and the tile to the left are used as already blended themselves.
            if r > 0:
                _blend(grid[r - 1][c], piece, extent, dim=2)
            if c > 0:
                _blend(row[c - 1], piece, extent, dim=3)
            pieces.append(piece[:, :, :limit, :limit])
        result_rows.append(torch.cat(pieces, dim=3))
    return torch.cat(result_rows, dim=2)


__all__ = ["needs_tiling", "tiled_decode"]
