"""Device memory of a request: peaks per stage and per rank, the allocator's counts, and out-of-memory handling.

torch counts allocations on CUDA only: on the CPU every figure is None.
"""

from __future__ import annotations

import gc

import torch

MIB = 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, in MiB; None on the CPU, where torch keeps no such count."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return None


def device_stats(device: torch.device) -> dict:
    """Allocated, reserved (held by the caching allocator) and peak allocated memory now, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return {"device": str(device), "allocated_mb": None, "reserved_mb": None, "peak_allocated_mb": None}
    return {
        "device": f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}",
        "allocated_mb": round(torch.cuda.memory_allocated(device) / MIB, 1),
        "reserved_mb": round(torch.cuda.memory_reserved(device) / MIB, 1),
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
    }


class DeviceOutOfMemory(torch.OutOfMemoryError):
    """A request needed more device memory than was free. What it had allocated is freed; the engine serves on."""


def out_of_memory(error: str, device: torch.device) -> DeviceOutOfMemory:
    """Free what a failed request left (call it once the exception is handled, when its tensors are unreachable)
    and say what happened, naming memory and what helps; `error` is the allocator's message."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    first_line = error.splitlines()[0] if error else "no details"
    return DeviceOutOfMemory(
        f"out of device memory: the request needed more than {device} had free ({first_line}). "
        "Try a smaller size, fewer frames, images or steps, or offload (--dit-layerwise-offload, "
        "--text-encoder-cpu-offload, --vae-cpu-offload, --max-gpu-memory GIB)"
    )


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError)
