"""Where the Triton kernels run: on CUDA tensors, or anywhere under Triton's CPU interpreter (TRITON_INTERPRET=1,
the CPU tests), and not where Triton is missing, disabled (DITSERVE_DISABLE_TRITON=1) or under torch.compile
(Inductor fuses the torch references itself)."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # CPU-only installs: the torch references serve
    triton = None


def use_triton(x: torch.Tensor) -> bool:
    if triton is None or os.environ.get("DITSERVE_DISABLE_TRITON") == "1":
        return False
    if torch.compiler.is_compiling():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
