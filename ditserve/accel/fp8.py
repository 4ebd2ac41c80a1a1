"""FP8 DiT linears: weights in float8 e4m3 with a scale per output channel, activations quantised per token on the
fly, products through `torch._scaled_mm` with rowwise scales (Hopper/Ada tensor cores: about 1.7× bf16's GEMM rate
on an H200, PERF-FACTS).

`quantize_dit(model)` converts the linears of a DiT's repeated blocks (`LinearBase.quantize_fp8`): q/k/v, attention
outputs, MLPs and the fused projections, each on this rank's shard under tensor parallelism. Modules outside the
blocks (embedders, the final layer) stay in the activation dtype, and so do the blocks' `ReplicatedLinear`s (the
per-block modulation of families that have one): they are a small share of the FLOPs, and their outputs scale and
gate every token, so their error would spread through the whole block.

On the CPU the product runs as the float32 reference (`scaled_mm_reference`): slow, but the same arithmetic, so
tests check the mechanism (merge/unmerge, tensor parallelism, LoRA) without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditserve.kernels.fp8_quant import FP8, QuantizedRows, fp8_scale, quantize_rows, to_fp8


class FP8Unsupported(ValueError):
    """FP8 products need a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell)."""


FP8_CAPABILITY = (8, 9)  # the first CUDA compute capability with FP8 tensor cores (Ada)

# `_scaled_mm`'s use_fast_accum: Hopper's FP8 tensor cores then accumulate the whole K loop at their own precision
# (about 22 mantissa bits) instead of promoting to float32 every few steps. Measured on an H200 at Wan 720p and FLUX
# 1024² shapes (docs/fp8.md): 5-12% faster GEMMs, error against the float32 product of the same FP8 values 2.0-3.4e-3
# instead of 1.7e-3, both far below e4m3's own rounding of the inputs (about 3e-2).
FAST_ACCUMULATION = True


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` is a GPU with FP8 tensor cores."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def check_fp8_device(device: torch.device, instead: str = "Run without --quantization.") -> None:
    """Refuse GPUs without FP8 tensor cores, by name, saying what to do `instead`; the CPU runs the float32
    reference (for tests)."""
    if device.type != "cuda" or has_fp8_tensor_cores(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise FP8Unsupported(
        f"FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: L4/L40/RTX 40xx, H100/H200, "
        f"B200); {torch.cuda.get_device_name(device)} has {major}.{minor}. {instead}"
    )


def quantize_weight(weight: torch.Tensor, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] → (e4m3 [N, K], float32 scale per output channel [N]) with W ≈ q · scale[:, None].

    `reduce_max` (a max over tensor-parallel ranks that each hold some of the columns) makes each row's scale the
    whole row's, so every rank's shard is the slice of the unsharded quantised weight."""
    w = weight.float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    if reduce_max is not None:
        amax = reduce_max(amax)
    scale = fp8_scale(amax)
    return to_fp8(w, scale), scale.squeeze(1)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def scaled_mm_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(xq · x_scale) (wq · w_scale)ᵀ + bias in float32, rounded once: what `torch._scaled_mm` computes."""
    y = (xq.float() * x_scale) @ (wq.float() * w_scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_linear(
    x: torch.Tensor | QuantizedRows, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x Wᵀ + b for an e4m3 W [N, K] (possibly a column slice of a wider one) with per-row scales w_scale [N]; x
    is quantised per token here unless the kernel that produced it did (`QuantizedRows`)."""
    shape = x.shape
    if isinstance(x, QuantizedRows):
        xq, x_scale = x.data.view(-1, shape[-1]), x.scale
    else:
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xq, x_scale = quantize_rows(x2)
    if xq.is_cuda:
        b = wq.t()  # [K, N], column-major: what _scaled_mm wants as its second operand
        if b.stride(0) != 1 or b.data_ptr() % 16:
            b = wq.contiguous().t()
        y = torch._scaled_mm(
            xq,
            b,
            scale_a=x_scale,
            scale_b=w_scale.view(1, -1),
            bias=None if bias is None else bias.to(x.dtype),
            out_dtype=x.dtype,
            use_fast_accum=FAST_ACCUMULATION,
        )
    else:
        y = scaled_mm_reference(xq, x_scale, wq, w_scale, bias, x.dtype)
    return y.view(*shape[:-1], wq.shape[0])


def fp8_linears(model: nn.Module) -> list[nn.Module]:
    """The linears FP8 applies to: those of `model.repeated_blocks()` but ReplicatedLinear, not yet FP8."""
    from ditserve.layers.linear import LinearBase, ReplicatedLinear

    return [
        module
        for block in model.repeated_blocks()
        for module in block.modules()
        # _scaled_mm needs both GEMM widths divisible by 16 (every real DiT's are; tiny test models may not be)
        if isinstance(module, LinearBase)
        and not isinstance(module, ReplicatedLinear)
        and module.weight_scale is None
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]


def quantize_dit(model: nn.Module) -> int:
    """Quantise the linears of `model.repeated_blocks()` (all but ReplicatedLinear) to FP8; returns how many."""
    linears = fp8_linears(model)
    for module in linears:
        module.quantize_fp8()
    return len(linears)


# ---- checkpoints that are FP8 already --------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaledFP8:
    """A checkpoint's FP8 weight and its scale: W = data · scale, the scale one number for the tensor (ComfyUI's
    `scale_weight`; 1 for plain e4m3 files) or one per row. Loading keeps `data`'s bytes where the layer is FP8
    (`prepare_fp8_dit`) and multiplies it out elsewhere."""

    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.data.dtype != FP8:
            raise ValueError(f"FP8 weights are float8 e4m3 here, not {self.data.dtype}")
        if self.scale.numel() not in (1, self.data.shape[0]):
            raise ValueError(f"a scale of {self.scale.numel()} values for a weight of {self.data.shape[0]} rows")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def row_scales(self) -> torch.Tensor:
        return self.scale.float().reshape(-1).expand(self.data.shape[0]).contiguous()

    def dequantize(self) -> torch.Tensor:
        scale = self.scale.float().reshape(-1, *([1] * (self.data.dim() - 1)))
        return self.data.float() * scale


def prepare_fp8_dit(model: nn.Module) -> int:
    """Before loading: make the linears `quantize_dit` would quantise FP8 already (float8 storage, scales to fill),
    so the checkpoint's FP8 bytes load as they are and other weights are quantised as they load, never held in
    the activation dtype. Returns how many."""
    linears = fp8_linears(model)
    for module in linears:
        weight = module.weight
        module.weight = nn.Parameter(torch.empty(weight.shape, dtype=FP8, device=weight.device), requires_grad=False)
        module.weight_scale = torch.full((weight.shape[0],), float("nan"), device=weight.device)
    return len(linears)


def check_fp8_scales(model: nn.Module) -> None:
    """After loading into prepared layers: every row got its scale (a row that none did is a loader bug)."""
    from ditserve.layers.linear import LinearBase

    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and module.weight_scale is not None and module.weight_scale.isnan().any():
            raise RuntimeError(f"{name}: FP8 rows without a scale after loading")


__all__ = [
    "FP8",
    "FP8Unsupported",
    "ScaledFP8",
    "check_fp8_scales",
    "fp8_linears",
    "prepare_fp8_dit",
    "check_fp8_device",
    "has_fp8_tensor_cores",
    "dequantize_weight",
    "fp8_linear",
    "quantize_dit",
    "quantize_weight",
    "scaled_mm_reference",
]
