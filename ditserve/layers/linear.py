"""Linear layers: the unit of tensor-parallel sharding, fused projections, LoRA, and (later) FP8.

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

LoRA enters here and nowhere else (models never see it). A layer holds `LinearLoRA` adapters and either applies
them in its forward (dynamic: y = W0 x + Σ s·B(A x), restricted to the output rows of the parts an adapter targets)
or folds them into its weight (merged), keeping a copy of W0 so that unmerging restores it bit for bit.
`lora_shard` is the LoRA twin of `weight_loader`: it cuts a full-size (A, B) pair down to this rank's share, so
tensor parallelism needs nothing from the LoRA code above the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fp8_quant import QuantizedRows
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


@dataclass
class LinearLoRA:
    """One adapter on one layer, already cut to this rank: y[..., rows] += scale · B (A x)."""

    down: torch.Tensor  # A: [rank, in_per_rank]
    up: torch.Tensor  # B: [rows, rank]
    scale: float  # strength · alpha / rank
    row_offset: int = 0  # first output row (in this rank's layout) that B writes

    def delta_weight(self) -> torch.Tensor:
        """scale · B A in float32: the change this adapter makes to its rows of the weight."""
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass
class ColumnSum:
    """A row-parallel product summed over the input column pieces given so far (`RowParallelLinear.add_columns`)."""

    y: torch.Tensor  # Σ x W[:, piece]ᵀ, plus the bias
    lora_hidden: list[torch.Tensor]  # per adapter, Σ A[:, piece] x


def _backup(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of W0 for exact unmerging. A host copy of a GPU weight goes to pinned memory: copies both ways then
    run at full PCIe speed and asynchronously (measured on FLUX.1-dev: pageable copies made a merge take 15 s)."""
    if device.type == "cpu" and weight.is_cuda:
        backup = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=True)
        backup.copy_(weight, non_blocking=True)  # ordered before any later write to the weight on this stream
        return backup
    return weight.to(device, copy=True)


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
        self.lora: list[LinearLoRA] = []  # applied in forward (dynamic mode)
        self.lora_w0: torch.Tensor | None = None  # the unmerged weight, kept while a merge is in effect
        # FP8 (`quantize_fp8`): the weight is float8 e4m3 and this its float32 scale per output row; None: not FP8.
        self.weight_scale: torch.Tensor | None = None
        self.lora_scale0: torch.Tensor | None = None  # the unmerged FP8 weight's scales, beside lora_w0

    # Subclasses say which slices of a checkpoint tensor belong to this rank and where they go.
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        _check_shape("weight" if param is self.weight else "bias", param.shape, loaded.shape)
        param.data.copy_(loaded)

    def expected_shards(self) -> int:
        """How many checkpoint tensors fill each parameter of this layer (1 unless fused)."""
        return 1

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        self.check_input(x)
        return self.apply_lora(x, self.matmul(x, self.bias))

    @property
    def takes_quantized_input(self) -> bool:
        """Whether this layer's input may come quantised per row by the kernel that produces it (`QuantizedRows`:
        a norm or an activation asked for `quantize=`): an FP8 layer without dynamic LoRA adapters (those read the
        input in its own dtype). The producer then writes e4m3 and the layer skips its own quantising pass."""
        return self.weight_scale is not None and not self.lora

    def check_input(self, x: torch.Tensor | QuantizedRows) -> None:
        if isinstance(x, QuantizedRows) and not self.takes_quantized_input:
            raise TypeError(
                f"{type(self).__name__} got an input quantised for FP8 but takes it in its own dtype (not FP8, or "
                "with dynamic LoRA): its producer must ask `takes_quantized_input`"
            )

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, start: int = 0, width: int | None = None):
        """x Wᵀ (+ bias) over this rank's input columns [start, start + width) (all of them by default), in the
        weight's format: the activation dtype, or FP8 with the input quantised per token."""
        weight = self.weight if width is None else self.weight.narrow(1, start, width)
        if self.weight_scale is None:
            return F.linear(x, weight, bias)
        from ditserve.accel.fp8 import fp8_linear

        return fp8_linear(x, weight, self.weight_scale, bias)

    def row_max_over_ranks(self, amax: torch.Tensor) -> torch.Tensor:
        """The max of each output row's |W| over the ranks that hold parts of that row (here: this rank alone)."""
        return amax

    def load_row_vector(self, target: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """A vector with one value per output row of the checkpoint tensor (an FP8 weight's scales) into `target`,
        this rank's rows: the rows the weight loader keeps, at the same places."""
        self.weight_loader(nn.Parameter(target, requires_grad=False), loaded, shard_id)

    @torch.no_grad()
    def load_fp8_weight(self, loaded, shard_id: int | None = None) -> None:
        """A checkpoint weight into this FP8 layer (`accel.fp8.prepare_fp8_dit`): an FP8 one (`ScaledFP8`) keeps its
        bytes and scales; any other is quantised per row as it loads (whole rows: every rank's shard is a slice of
        the same quantised weight)."""
        from ditserve.accel.fp8 import ScaledFP8, quantize_weight

        if isinstance(loaded, ScaledFP8):
            q, scales = loaded.data, loaded.row_scales()
        else:
            q, scales = quantize_weight(loaded)
        self.weight_loader(self.weight, q, shard_id)
        self.load_row_vector(self.weight_scale, scales.to(self.weight_scale.device), shard_id)

    @torch.no_grad()
    def quantize_fp8(self) -> None:
        """Store the weight as float8 e4m3 with a scale per output row (see accel/fp8.py); the bias stays."""
        from ditserve.accel.fp8 import quantize_weight

        if self.lora_w0 is not None:
            raise RuntimeError("unmerge LoRA before quantising: the merged weight would become the base")
        q, scale = quantize_weight(self.weight.detach(), self.row_max_over_ranks)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale

    # ---- LoRA ---------------------------------------------------------------------------------------------------
    def lora_full_shape(self, first_part: int | None, num_parts: int) -> tuple[int, int]:
        """(out, in) of the full, unsharded weight rows that an adapter on these parts covers."""
        if first_part not in (None, 0) or num_parts != 1:
            raise ValueError(f"{type(self).__name__} is not fused: an adapter covers it whole")
        return self.out_features, self.in_features

    def lora_shard(
        self, down: torch.Tensor, up: torch.Tensor, first_part: int | None = None, num_parts: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Full-size (A, B) of an adapter on `num_parts` parts from `first_part` → this rank's (A, B, row offset)."""
        return down, up, 0

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for a in self.lora:
            delta = F.linear(F.linear(x, a.down), a.up) * a.scale
            if delta.shape[-1] == y.shape[-1]:
                y = y + delta
            else:  # one part of a fused projection: only its rows change
                y.narrow(-1, a.row_offset, delta.shape[-1]).add_(delta)
        return y

    @torch.no_grad()
    def merge_lora(self, adapters: list[LinearLoRA], backup_device: torch.device | str = "cpu") -> None:
        """W = W0 + Σ scale·BA, always computed from W0 (merging twice never stacks), in float32 then rounded once
        (an FP8 weight: requantised, with new scales)."""
        fp8 = self.weight_scale is not None
        if self.lora_w0 is None:
            self.lora_w0 = _backup(self.weight.detach(), torch.device(backup_device))
            if fp8:
                self.lora_scale0 = self.weight_scale.clone()
            merged = self.weight.detach().to(torch.float32, copy=True)  # W0 is still in place: no copy back
        else:
            merged = self.lora_w0.to(self.weight.device, non_blocking=True).to(torch.float32, copy=True)
        if fp8:
            merged.mul_(self.lora_scale0[:, None])
        for a in adapters:
            delta = a.delta_weight().to(merged.device)
            merged.narrow(0, a.row_offset, delta.shape[0]).add_(delta)
        if fp8:
            from ditserve.accel.fp8 import quantize_weight

            merged, scale = quantize_weight(merged, self.row_max_over_ranks)
            self.weight_scale.copy_(scale)
        self.weight.data.copy_(merged)

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Put W0 back exactly (a copy, not a subtraction, so nothing drifts in low precision; FP8: its bytes and
        its scales)."""
        if self.lora_w0 is not None:
            # From pinned memory this copy is asynchronous; torch's pinned allocator keeps the buffer alive until
            # the copy has run, so dropping our reference right away is safe.
            self.weight.data.copy_(self.lora_w0, non_blocking=True)
            self.lora_w0 = None
            if self.lora_scale0 is not None:
                self.weight_scale.copy_(self.lora_scale0)
                self.lora_scale0 = None

    def extra_repr(self) -> str:
        fp8 = ", fp8" if self.weight_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{fp8}"


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

    def lora_full_shape(self, first_part: int | None, num_parts: int) -> tuple[int, int]:
        super().lora_full_shape(first_part, num_parts)
        return self.full_out_features, self.in_features

    def lora_shard(
        self, down: torch.Tensor, up: torch.Tensor, first_part: int | None = None, num_parts: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = self.out_features
        return down, up.narrow(0, self.tp.rank * n, n), 0


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

    def lora_full_shape(self, first_part: int | None, num_parts: int) -> tuple[int, int]:
        first = first_part or 0
        if first + num_parts > len(self.output_sizes) or num_parts < 1:
            raise ValueError(f"parts {first}..{first + num_parts - 1} of a {len(self.output_sizes)}-part projection")
        return sum(self.output_sizes[first : first + num_parts]), self.in_features

    def lora_shard(
        self, down: torch.Tensor, up: torch.Tensor, first_part: int | None = None, num_parts: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        # B's rows are the full outputs of the covered parts, in order; each rank keeps its share of every part.
        first = first_part or 0
        pieces, src = [], 0
        for full, local in zip(
            self.output_sizes[first : first + num_parts], self.local_sizes[first : first + num_parts]
        ):
            pieces.append(up.narrow(0, src + self.tp.rank * local, local))
            src += full
        local_up = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return down, local_up, sum(self.local_sizes[:first])

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

    def load_row_vector(self, target: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        _check_shape("row vector", target.shape, loaded.shape)  # every rank holds every output row
        target.copy_(loaded)

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

    def lora_full_shape(self, first_part: int | None, num_parts: int) -> tuple[int, int]:
        super().lora_full_shape(first_part, num_parts)
        return self.out_features, sum(self.input_sizes)

    def lora_shard(
        self, down: torch.Tensor, up: torch.Tensor, first_part: int | None = None, num_parts: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        # A reads this rank's columns of every input part; the partial B(A x) are summed by the same all-reduce.
        cols, src = [], 0
        for full, local in zip(self.input_sizes, self.local_input_sizes):
            cols.append(down.narrow(1, src + self.tp.rank * local, local))
            src += full
        return (cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)), up, 0

    # ---- an input given in pieces of its columns -----------------------------------------------------------------
    # FLUX's single-stream proj_out reads [attention | mlp], and under Ulysses an attention output reaches its
    # projection in head groups, some local and some still on their way. Summing the product over column pieces
    # saves building the whole input, and lets each piece's product run as soon as that piece exists (beside
    # communication that brings the others).
    def row_max_over_ranks(self, amax: torch.Tensor) -> torch.Tensor:
        """Each rank holds some columns of every row: FP8 row scales come from the whole row."""
        if self.tp.size > 1:
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=self.tp.group)
        return amax

    def part_start(self, part: int) -> int:
        """This rank's first column of input part `part` (see `input_sizes`)."""
        return sum(self.local_input_sizes[:part])

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b, written where the all-reduce wants it when it has a place for it (no copy before summing)."""
        if self.weight_scale is not None:
            return self.matmul(x, self.bias)
        out = None
        # Not with LoRA: its sum is a new tensor, so the one written into the buffer would never be the one summed.
        if self.tp.size > 1 and not self.lora:
            out = self.tp.buffer_for((*x.shape[:-1], weight.shape[0]), x.dtype, x.device)
        if out is None:
            return F.linear(x, weight, self.bias)
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        if self.bias is None:
            torch.mm(x2, weight.t(), out=out2)
        else:
            torch.addmm(self.bias, x2, weight.t(), out=out2)
        return out

    def add_columns(self, x: torch.Tensor, start: int, partial: ColumnSum | None = None) -> ColumnSum:
        """Add the product of x, this rank's input columns [start, start + x.shape[-1]), to `partial` (None: start
        the sum, with the bias). `finish` completes it. The pieces may come in any order; each GEMM accumulates in
        float32 and the sum is rounded once per piece."""
        self.check_input(x)
        width = x.shape[-1]
        if start < 0 or start + width > self.in_features:
            raise ValueError(f"columns [{start}, {start + width}) outside this rank's {self.in_features} inputs")
        weight = self.weight.narrow(1, start, width)
        hidden = [F.linear(x, a.down.narrow(1, start, width)) for a in self.lora]  # A x, this piece's share
        if self.weight_scale is not None:  # FP8: each piece quantised on its own, the products summed
            piece = self.matmul(x, self.bias if partial is None else None, start, width)
            if partial is None:
                return ColumnSum(piece, hidden)
            partial.y.add_(piece)
        elif partial is None:
            return ColumnSum(self._product(x, weight), hidden)
        else:
            partial.y.view(-1, partial.y.shape[-1]).addmm_(x.reshape(-1, width), weight.t())
        for total, piece in zip(partial.lora_hidden, hidden):
            total.add_(piece)
        return partial

    def finish(self, partial: ColumnSum) -> torch.Tensor:
        """The layer's output from a sum of column pieces that covers every input column: LoRA, then the reduction
        over tensor-parallel ranks."""
        y = partial.y
        for a, hidden in zip(self.lora, partial.lora_hidden):
            y = y + F.linear(hidden, a.up) * a.scale
        return self.tp.all_reduce(y) if self.tp.size > 1 else y

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        self.check_input(x)
        y = self.apply_lora(x, self._product(x, self.weight))
        return self.tp.all_reduce(y) if self.tp.size > 1 else y


class PackedColumnParallelLinear(MergedColumnParallelLinear):
    """A merged column-parallel linear whose parts a checkpoint stores as one tensor (FLUX.2's SwiGLU `linear_in`
    holds [gate | up]; its single-stream `to_qkv_mlp_proj` holds [q | k | v | gate | up]). The one tensor is cut
    into its parts at load time, so each rank still keeps its share of every part side by side; a LoRA on the
    checkpoint's module covers every part."""

    def expected_shards(self) -> int:
        return 1

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is not None:
            raise ValueError(f"a packed linear loads from one tensor; got shard id {shard_id}")
        expected = (sum(self.output_sizes), *param.shape[1:])
        _check_shape("weight" if param.dim() == 2 else "bias", torch.Size(expected), loaded.shape)
        for part, piece in enumerate(loaded.split(self.output_sizes, dim=0)):
            super().weight_loader(param, piece, part)

    def lora_full_shape(self, first_part: int | None, num_parts: int) -> tuple[int, int]:
        if first_part is None and num_parts == 1:  # the checkpoint's one module: every part
            return sum(self.output_sizes), self.in_features
        return super().lora_full_shape(first_part, num_parts)

    def lora_shard(
        self, down: torch.Tensor, up: torch.Tensor, first_part: int | None = None, num_parts: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        if first_part is None and num_parts == 1:
            return super().lora_shard(down, up, 0, len(self.output_sizes))
        return super().lora_shard(down, up, first_part, num_parts)
