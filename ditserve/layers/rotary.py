"""Rotary position embeddings over several position axes (FLUX.1 and Z-Image: 3 axes of position ids)."""

from __future__ import annotations

import torch


def multi_axis_rope(
    ids: torch.Tensor, axes_dim: list[int], theta: float = 10000.0, float32_angles: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq, sum(axes_dim)] in float32, each frequency repeated for its pair.

    ids: [seq, n_axes] positions. Angles (position × frequency) are computed in float64, as both references do,
    because positions reach thousands. FLUX.1's reference takes cos and sin of the float64 angles; Z-Image's
    (`RopeEmbedder`: `torch.polar` of angles cast to float32 first) rounds the angles to float32 before them, which
    `float32_angles=True` reproduces (the two differ by up to ~1e-4 at positions near 1,500).
    """
    pos = ids.to(torch.float64)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device)[: dim // 2] / dim))
        angles = torch.outer(pos[:, axis], inv_freq)
        if float32_angles:  # the same op as Z-Image's reference, so the tables match it bit for bit
            unit = torch.polar(torch.ones_like(angles.float()), angles.float())
            cos, sin = unit.real, unit.imag
        else:
            cos, sin = angles.cos().float(), angles.sin().float()
        cos_parts.append(cos.repeat_interleave(2, dim=1))
        sin_parts.append(sin.repeat_interleave(2, dim=1))
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
