"""Linear layers: the unit of tensor-parallel sharding, fused projections, and (later) LoRA and FP8.

Every weight in a DiT that a checkpoint stores as a `nn.Linear` lives in one of these. Each layer has a
`weight_loader(param, tensor, shard_id)` that copies a checkpoint tensor into its place: the right slice of a fused
projection, and the right shard for this tensor-parallel rank. The loader never needs to know the layout. (The
loader is a method of the layer, not an attribute of the parameter, because `to_empty` replaces parameters.)

- `ColumnParallelLinear`: output features split across ranks (QKV, MLP up-projection).
- `MergedColumnParallelLinear`: several checkpoint linears fused into one GEMM along the output features
  (to_q/to_k/to_v, or q/k/v/mlp in FLUX's single-stream blocks); `shard_id` is the index of the part.
- `RowParallelLinear`: input features split across ranks, partial results summed (attention out, MLP down).
  `input_sizes` describes an input that is itself a concatenation of column-sharded parts (FLUX's single-stream
  `proj_out` reads [attention, mlp]), so each rank takes its shard of every part.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ditserve.parallel.state import tp_group


class ShapeMismatchError(ValueError):
    pass


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def _check_shape(param_name: str, expected: torch.Size, got: torch.Size) -> None:
    if tuple(expected) != tuple(got):
        raise ShapeMismatchError(f"{param_name}: checkpoint has shape {tuple(got)}, model expects {tuple(expected)}")


class LinearBase(nn.Module):
    """y = x Wᵀ + b, with W of shape [out_per_rank, in_per_rank]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features  # on this rank
        self.out_features = out_features  # on this rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # Subclasses say which slices of a checkpoint tensor belong to this rank and where they go.
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        _check_shape("weight" if param is self.weight else "bias", param.shape, loaded.shape)
        param.data.copy_(loaded)

    def expected_shards(self) -> int:
        """How many checkpoint tensors fill each parameter of this layer (1 unless fused)."""
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank (embedders, modulation)."""


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.tp = tp_group()
        self.full_out_features = out_features
        super().__init__(in_features, _divide(out_features, self.tp.size, "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        expected = (self.full_out_features, *param.shape[1:])
        _check_shape("weight" if param.dim() == 2 else "bias", torch.Size(expected), loaded.shape)
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))


class MergedColumnParallelLinear(LinearBase):
    """Several checkpoint linears with the same input, stored as one weight: [part0 | part1 | ...] per rank."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True):
        self.tp = tp_group()
        self.output_sizes = list(output_sizes)
        self.local_sizes = [_divide(s, self.tp.size, "output features") for s in output_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias)

    def expected_shards(self) -> int:
        return len(self.output_sizes)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"fused linear needs a shard id in 0..{len(self.output_sizes) - 1}, got {shard_id}")
        expected = (self.output_sizes[shard_id], *param.shape[1:])
        _check_shape(f"part {shard_id}", torch.Size(expected), loaded.shape)
        n = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, self.tp.rank * n, n))

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split this layer's output back into its parts (this rank's share of each)."""
        return y.split(self.local_sizes, dim=-1)


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_sizes: list[int] | None = None):
        self.tp = tp_group()
        self.input_sizes = list(input_sizes) if input_sizes is not None else [in_features]
        if sum(self.input_sizes) != in_features:
            raise ValueError(f"input_sizes {self.input_sizes} do not add up to {in_features}")
        self.local_input_sizes = [_divide(s, self.tp.size, "input features") for s in self.input_sizes]
        super().__init__(sum(self.local_input_sizes), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0 only, so the all-reduce sums it once
            _check_shape("bias", param.shape, loaded.shape)
            param.data.copy_(loaded if self.tp.rank == 0 else torch.zeros_like(loaded))
            return
        _check_shape("weight", torch.Size((param.shape[0], sum(self.input_sizes))), loaded.shape)
        src, dst = 0, 0
        for full, local in zip(self.input_sizes, self.local_input_sizes):
            param.data.narrow(1, dst, local).copy_(loaded.narrow(1, src + self.tp.rank * local, local))
            src += full
            dst += local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.tp.size > 1:
            dist.all_reduce(y, group=self.tp.group)
        return y
