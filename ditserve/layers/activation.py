"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditserve.kernels.gelu import gelu_tanh as _gelu_tanh_kernel


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (a Triton kernel on CUDA, see `ditserve.kernels.gelu`)."""
    return _gelu_tanh_kernel(x)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation, silu(gate) · up (Z-Image's feed-forward: w2(silu(w1 x) · w3 x))."""
    return F.silu(gate) * up
