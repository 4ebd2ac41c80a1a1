"""Timestep and conditioning embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.layers.linear import ReplicatedLinear


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[N] timesteps → [N, dim] float32 embedding, cosines first (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear → SiLU → linear: lifts a timestep embedding or a pooled text vector to the model width (FLUX.1), or
    to `out_dim` through a hidden width of its own (Z-Image: 256 → 1024 → 256); without biases for FLUX.2."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.linear_1 = ReplicatedLinear(in_dim, hidden_dim, bias=bias)
        self.linear_2 = ReplicatedLinear(hidden_dim, out_dim or hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbedding(ReplicatedLinear):
    """A convolution whose kernel equals its stride (a patch embedding, Conv3d or Conv2d in the checkpoint) as the
    linear it is: one GEMM over patch tokens of `in_channels × prod(patch)` values, channels slowest, the order of
    the convolution's flattened weight [out, C, *patch]. The checkpoint's convolution weight loads flattened."""

    def __init__(self, in_channels: int, patch: tuple[int, ...], out_features: int):
        self.patch = tuple(patch)
        super().__init__(in_channels * math.prod(self.patch), out_features)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if param is self.weight and loaded.dim() == 2 + len(self.patch):
            loaded = loaded.flatten(1)
        super().weight_loader(param, loaded, shard_id)

    def conv_weight(self) -> torch.Tensor:
        """The weight in the checkpoint's convolution shape [out, C, *patch] (a view)."""
        return self.weight.view(self.out_features, -1, *self.patch)
