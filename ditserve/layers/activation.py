"""Activations."""

from __future__ import annotations

import torch

from ditserve.kernels.gelu import gelu_tanh as _gelu_tanh_kernel


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (a Triton kernel on CUDA, see `ditserve.kernels.gelu`)."""
    return _gelu_tanh_kernel(x)
