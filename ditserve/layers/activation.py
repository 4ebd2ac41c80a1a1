"""Activations."""

from __future__ import annotations

import torch

from ditserve.kernels.fp8_quant import QuantizedRows
from ditserve.kernels.gelu import gelu_tanh as _gelu_tanh_kernel
from ditserve.kernels.swiglu import silu_and_mul as _silu_and_mul_kernel


def gelu_tanh(x: torch.Tensor, quantize: bool = False) -> torch.Tensor | QuantizedRows:
    """GELU with the tanh approximation (a Triton kernel on CUDA, see `ditserve.kernels.gelu`); `quantize`: its rows
    quantised for the FP8 linear that reads them (`LinearBase.takes_quantized_input`)."""
    return _gelu_tanh_kernel(x, quantize)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation silu(gate) · up, on x = [gate | up] as one merged GEMM makes it (Z-Image's feed-forward:
    w2(silu(w1 x) · w3 x)); a Triton kernel on CUDA, see `ditserve.kernels.swiglu`."""
    return _silu_and_mul_kernel(x)
