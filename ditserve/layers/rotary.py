"""Rotary position embeddings over several position axes (FLUX: 3 axes of (t, h, w) ids)."""

from __future__ import annotations

import torch


def multi_axis_rope(
    ids: torch.Tensor, axes_dim: list[int], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq, sum(axes_dim)] in float32, each frequency repeated for its pair.

    ids: [seq, n_axes] positions. Frequencies are computed in float64 (as the reference implementation does)
    because positions reach thousands and float32 angles would drift.
    """
    pos = ids.to(torch.float64)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device)[: dim // 2] / dim))
        angles = torch.outer(pos[:, axis], inv_freq)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [B, S, H, D] by the angles in cos/sin [S, D].

    Computed in float32 and cast back, as the reference does, so bf16 results match it.
    """
    x_pairs = x.unflatten(-1, (-1, 2))
    x_real, x_imag = x_pairs.unbind(-1)
    rotated = torch.stack((-x_imag, x_real), dim=-1).flatten(-2)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
