"""Attention: the one place models reach scaled-dot-product attention.

`attention(q, k, v, backend)` takes and returns [batch, seq, heads, head_dim]. Models hold an `Attention` module,
so the engine can choose the backend per model, and sequence parallelism (Ulysses all-to-all, Ring K/V passing)
can wrap the module without touching model code.

Backends are PyTorch SDPA kernels chosen explicitly: on Hopper the cuDNN kernel runs about twice as fast as the
flash kernel at DiT shapes (shared/PERF-FACTS.md), but SDPA's own default order does not pick it, so `auto`
asks for cuDNN on CUDA and lets SDPA fall back when cuDNN cannot take the inputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_BACKENDS: dict[str, list[SDPBackend]] = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
# For `auto` on CUDA: try cuDNN first, then the others in SDPA's usual order.
_AUTO_CUDA = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q kᵀ / √d) v in float32, [B, S, H, D]; what every backend is tested against."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    return (weights @ vf).transpose(1, 2).to(q.dtype)


def _kernel_context(backend: str, device: torch.device):
    if backend == "sdpa" or (backend == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if backend == "auto":
        return sdpa_kernel(_AUTO_CUDA, set_priority=True)
    return sdpa_kernel(_SDPA_BACKENDS[backend])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal attention without mask; q, k, v and the result are [B, S, H, D]."""
    if backend == "reference":
        return attention_reference(q, k, v)
    with _kernel_context(backend, q.device):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Holds the backend choice; sequence-parallel wrappers replace `forward` on these modules."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def set_attention_backend(model: nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
