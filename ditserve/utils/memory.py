"""Peak device memory of one request."""

from __future__ import annotations

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, in MiB; None on the CPU, where torch keeps no such count."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
