"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU with the tanh approximation; with `out`, written into that (possibly strided) tensor."""
    if out is None:
        return F.gelu(x, approximate="tanh")
    # dynamo does not trace aten out= calls (Inductor fuses the copy anyway), and autograd does not differentiate
    # them (training, e.g. ditserve.digits.train): both take the plain copy.
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        return out.copy_(F.gelu(x, approximate="tanh"))
    return torch.ops.aten.gelu.out(x, approximate="tanh", out=out)
