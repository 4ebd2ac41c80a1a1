"""Placing a canonical LoRA on a loaded model: which of our layers, which parts of a fused layer, which shard.

The model's own checkpoint key map (diffusers name → our parameter, part index) decides where a module lands, so a
LoRA goes wherever the checkpoint's weight went: diffusers' separate to_q/to_k/to_v become parts 0/1/2 of our fused
QKV layer, and a fused BFL `qkv` covering all three parts becomes one adapter on the whole layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ditserve.layers.linear import LinearBase, LinearLoRA
from ditserve.lora.canonical import CanonicalLoRA, LoRAError, LoRAModule

KeyMap = Callable[[str], "tuple[str, int | None] | None"]


@dataclass
class Placement:
    layer: str  # our module name
    adapter: LinearLoRA  # this rank's A and B, on the model's device and dtype; scale = alpha/rank (strength 1)


def _first(items: list[str], n: int = 4) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _locate(module: LoRAModule, key_map: KeyMap, params: set[str]) -> tuple[str, int | None, int] | None:
    """(our layer name, first part, number of parts) that the module's targets cover, or None if they don't fit."""
    mapped = [key_map(f"{t}.weight") for t in module.targets]
    if any(m is None or m[0] not in params for m in mapped):
        return None
    names = {m[0] for m in mapped}  # type: ignore[index]
    if len(names) != 1:
        return None  # a fused source module must land on one fused layer of ours
    shards = [m[1] for m in mapped]  # type: ignore[index]
    if shards[0] is None:
        return (names.pop().removesuffix(".weight"), None, 1) if len(shards) == 1 else None
    if any(s is None for s in shards) or shards != list(range(shards[0], shards[0] + len(shards))):
        return None  # parts must be consecutive and in order: B's rows are their outputs concatenated
    return names.pop().removesuffix(".weight"), shards[0], len(shards)


def place(lora: CanonicalLoRA, model: nn.Module, key_map: KeyMap, architecture: str, target: str) -> list[Placement]:
    """Every module of `lora` as this rank's adapter on `model`; LoRAError (and nothing placed) if any does not fit."""
    params = {name for name, _ in model.named_parameters()}
    layers = dict(model.named_modules())
    ref = next(model.parameters())
    unplaced: list[str] = []
    mis_shaped: list[str] = []
    out: list[Placement] = []
    for module in lora.modules:
        where = _locate(module, key_map, params)
        layer = layers.get(where[0]) if where else None
        if where is None or not isinstance(layer, LinearBase):
            unplaced.append("+".join(module.targets))
            continue
        name, first, count = where
        try:
            full_out, full_in = layer.lora_full_shape(first, count)
        except ValueError:  # parts that this layer does not have
            unplaced.append("+".join(module.targets))
            continue
        if tuple(module.up.shape)[0] != full_out or tuple(module.down.shape)[1] != full_in:
            mis_shaped.append(
                f"{'+'.join(module.targets)} (LoRA {tuple(module.up.shape)[0]}×{tuple(module.down.shape)[1]}, "
                f"layer {full_out}×{full_in})"
            )
            continue
        down, up, offset = layer.lora_shard(module.down, module.up, first, count)
        adapter = LinearLoRA(
            down=down.to(ref.device, ref.dtype, copy=True).contiguous(),
            up=up.to(ref.device, ref.dtype, copy=True).contiguous(),
            scale=module.scale,
            row_offset=offset,
        )
        out.append(Placement(name, adapter))
    if unplaced or mis_shaped:
        hint = ""
        if lora.architecture != architecture:
            hint = f" It looks like a LoRA for {lora.architecture}, not {architecture}."
        problems = []
        if unplaced:
            problems.append(f"{len(unplaced)} modules match no layer of the loaded {target}: {_first(unplaced)}")
        if mis_shaped:
            problems.append(f"{len(mis_shaped)} have the wrong shape: {_first(mis_shaped, 2)}")
        raise LoRAError("lora_path", f"the LoRA ({lora.format}) does not fit this model: " + "; ".join(problems) + hint)
    return out


def adapter_bytes(placements: list[Placement]) -> int:
    return sum(p.adapter.down.numel() * p.adapter.down.element_size() for p in placements) + sum(
        p.adapter.up.numel() * p.adapter.up.element_size() for p in placements
    )
