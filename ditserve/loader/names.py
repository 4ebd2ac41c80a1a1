"""A DiT's parameter names in diffusers' checkpoints against ours, both ways, from one table per model.

A model states its names as data (`DiffusersNames`): its runs of blocks (diffusers' prefix, ours, and per block the
diffusers module suffix → our module and, for a part of a fused linear, the part's index), its top-level modules,
and whole names mapped as they are (embeddings without a module, pad tokens). `map` turns a checkpoint name into
(our parameter name, shard index) for `loader.weights.load_checkpoint`; `state_dict` turns a model's parameters
into diffusers' names, fused linears split back into their parts, to run diffusers on exactly our weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ditserve.parallel.state import tp_group

KeyTable = dict[str, tuple[str, int | None]]  # diffusers module → (our module, part of a fused linear or None)
_TOP_KEY = re.compile(r"^(.+)\.(weight|bias)$")
_TENSORS = ("weight", "bias")


@dataclass(frozen=True)
class BlockNames:
    theirs: str  # diffusers' prefix of the run ("transformer_blocks")
    ours: str  # our attribute holding the blocks ("double_blocks")
    keys: KeyTable


@dataclass(frozen=True)
class DiffusersNames:
    blocks: tuple[BlockNames, ...]
    top: KeyTable
    whole: dict[str, str] = field(default_factory=dict)  # diffusers name → ours, no module suffix

    def __post_init__(self) -> None:
        kinds = "|".join(re.escape(b.theirs) for b in self.blocks)
        object.__setattr__(self, "_block_key", re.compile(rf"^({kinds})\.(\d+)\.(.+)\.(weight|bias)$"))
        object.__setattr__(self, "_by_theirs", {b.theirs: b for b in self.blocks})

    def map(self, name: str) -> tuple[str, int | None] | None:
        """diffusers parameter name → (our parameter name, shard index), or None for a name this model lacks."""
        if name in self.whole:
            return self.whole[name], None
        if m := self._block_key.match(name):  # type: ignore[attr-defined]
            kind, index, suffix, tensor = m.groups()
            run = self._by_theirs[kind]  # type: ignore[attr-defined]
            if suffix not in run.keys:
                return None
            target, shard = run.keys[suffix]
            return f"{run.ours}.{index}.{target}.{tensor}", shard
        if (m := _TOP_KEY.match(name)) and m.group(1) in self.top:
            target, shard = self.top[m.group(1)]
            return f"{target}.{m.group(2)}", shard
        return None

    def state_dict(self, model: nn.Module, top: KeyTable | None = None) -> dict[str, torch.Tensor]:
        """`model`'s parameters under diffusers' names (`top`: the top-level table for this model's config, when it
        depends on it). Single rank only: a tensor-parallel shard is not diffusers' tensor."""
        if tp_group().size != 1:
            raise RuntimeError("to_diffusers_state_dict works on an unsharded model only")
        ours = dict(model.named_parameters())
        modules = dict(model.named_modules())
        out: dict[str, torch.Tensor] = {}

        def emit(theirs: str, mine: str, shard: int | None) -> None:
            tensor = ours[mine]
            if shard is not None:
                tensor = tensor.split(modules[mine.rsplit(".", 1)[0]].local_sizes, dim=0)[shard]
            out[theirs] = tensor

        for theirs, mine in self.whole.items():
            if mine in ours:
                emit(theirs, mine, None)
        for prefix, (target, shard) in (self.top if top is None else top).items():
            for t in _TENSORS:
                if f"{target}.{t}" in ours:
                    emit(f"{prefix}.{t}", f"{target}.{t}", shard)
        for run in self.blocks:
            for i in range(len(getattr(model, run.ours))):
                for suffix, (target, shard) in run.keys.items():
                    for t in _TENSORS:
                        if f"{run.ours}.{i}.{target}.{t}" in ours:
                            emit(f"{run.theirs}.{i}.{suffix}.{t}", f"{run.ours}.{i}.{target}.{t}", shard)
        return out
