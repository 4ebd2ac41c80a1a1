"""Loaded LoRAs and, per target transformer, which are active, with what strengths, merged or applied on the fly.

Semantics (the same names as other diffusion servers):
- `set_lora(nicknames, paths, strengths, target)` loads what is new and makes exactly these adapters active on the
  target(s): W = W0 + Σ sᵢ·(αᵢ/rᵢ)·BᵢAᵢ. A target that is merged stays merged (re-merged from W0 with the new
  set); otherwise the adapters run in the forward pass and W0 is untouched. An empty list turns LoRA off.
- `merge_lora_weights(strength, target)` folds the active adapters, each scaled by `strength` too, into the weights.
- `unmerge_lora_weights(target)` puts W0 back bit for bit; the target then runs the base model (its adapter set is
  kept, so merge_lora_weights folds it in again, and set_lora re-activates).
Every call validates and converts everything first and changes state only once nothing can fail any more, so an
error (`LoRAError`, naming the input at fault) leaves the previous state exactly as it was.

Inputs are bounded: a strength beyond ±`max_strength` (default 10; a trained LoRA is used at about 0.5 to 1.5) and
a nickname that is long or holds anything but letters, digits, spaces and `._+-()[]` are refused.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ditserve.layers.linear import LinearBase, LinearLoRA
from ditserve.lora.canonical import CanonicalLoRA, LoRAError
from ditserve.lora.formats import load_canonical
from ditserve.lora.placement import KeyMap, Placement, adapter_bytes, place

TARGET_NAMES = ("transformer", "transformer_2")  # every target any family may have
MAX_STRENGTH = 10.0  # the default bound on |strength|
MAX_NICKNAME_CHARS = 64
_NICKNAME = re.compile(r"^[A-Za-z0-9_.+\-()\[\] ]+$")


@dataclass
class LoRATarget:
    """One transformer LoRAs can go on: the module, its checkpoint key map and its architecture name."""

    name: str
    model: nn.Module
    key_map: KeyMap
    architecture: str


@dataclass
class LoadedLoRA:
    nickname: str
    path: str
    lora: CanonicalLoRA  # kept on the CPU, to place it on a target it was not placed on yet
    placed: dict[str, list[Placement]] = field(default_factory=dict)  # target → adapters on that target's device


@dataclass
class TargetState:
    active: list[tuple[str, float]] = field(default_factory=list)  # (nickname, strength), in order
    mode: str = "off"  # "off" (base model), "dynamic" (applied in forward) or "merged" (folded into weights)
    merge_strength: float = 1.0
    touched: set[str] = field(default_factory=set)  # layers that currently hold adapters or a merge


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_strength(value, field_name: str = "strength", limit: float = MAX_STRENGTH) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise LoRAError(field_name, f"must be a finite number, got {value!r}")
    if abs(float(value)) > limit:
        raise LoRAError(field_name, f"must be between -{limit:g} and {limit:g}, got {float(value):g}")
    return float(value)


def check_nickname(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LoRAError("lora_nickname", f"must be a non-empty string or a list of them, got {value!r}"[:200])
    if len(value) > MAX_NICKNAME_CHARS:
        raise LoRAError("lora_nickname", f"is {len(value)} characters; the limit is {MAX_NICKNAME_CHARS}")
    if not _NICKNAME.match(value):
        raise LoRAError("lora_nickname", f"{value!r} may hold only letters, digits, spaces and ._+-()[] (ASCII)")
    return value


def parse_requests(lora_nickname, lora_path, strength, max_strength: float) -> list[tuple[str, str | None, float]]:
    """set_lora's inputs checked and paired: (nickname, path or None for a loaded one, strength) each."""
    nicknames = [check_nickname(n) for n in _as_list(lora_nickname)]
    if len(set(nicknames)) != len(nicknames):
        raise LoRAError("lora_nickname", f"a nickname appears twice: {nicknames}")
    paths = [None] * len(nicknames) if lora_path is None else _as_list(lora_path)
    if len(paths) != len(nicknames):
        raise LoRAError("lora_path", f"{len(paths)} paths for {len(nicknames)} nicknames; give one per nickname")
    for p in paths:
        if p is not None and not isinstance(p, (str, Path)):
            raise LoRAError("lora_path", f"must be a path string (or null for a loaded nickname), got {p!r}")
    # One number applies to every nickname; a list gives one each.
    strengths = list(strength) if isinstance(strength, (list, tuple)) else [strength] * len(nicknames)
    if len(strengths) != len(nicknames):
        raise LoRAError("strength", f"{len(strengths)} strengths for {len(nicknames)} nicknames")
    return [
        (n, None if p is None else str(p), check_strength(s, limit=max_strength))
        for n, p, s in zip(nicknames, paths, strengths)
    ]


class LoRAManager:
    def __init__(
        self,
        targets: dict[str, LoRATarget],
        backup_device: str | torch.device = "cpu",
        max_strength: float = MAX_STRENGTH,
    ):
        self.targets = targets
        self.max_strength = max_strength  # |strength| above this is refused (set_lora's and merge's)
        # Where the unmerged weights are kept during a merge: "cpu" costs host memory equal to the merged layers'
        # weights; the model's device is faster to restore but costs as much device memory.
        self.backup_device = backup_device
        self.loaded: dict[str, LoadedLoRA] = {}
        self.state: dict[str, TargetState] = {name: TargetState() for name in targets}
        self.published = self.list_loras()  # the state as of the last completed change (see Engine.list_loras)

    # ---- input checking -----------------------------------------------------------------------------------------
    def resolve_targets(self, target: str | Sequence[str]) -> list[str]:
        if not self.targets:
            raise LoRAError("target", "LoRA is not supported for this model family yet")
        names = _as_list(target)
        if not names or not all(isinstance(t, str) for t in names):
            raise LoRAError("target", f"must be 'all', a target name or a list of them, got {target!r}")
        if "all" in names:
            return list(self.targets)
        out = []
        for t in names:
            if t not in self.targets:
                have = ", ".join(self.targets)
                if t in TARGET_NAMES:
                    raise LoRAError("target", f"this model has no {t}; its targets: {have} (or 'all')")
                raise LoRAError("target", f"unknown target {t!r}; use 'all' or one of: {have}")
            if t not in out:
                out.append(t)
        return out

    def _requests(self, lora_nickname, lora_path, strength) -> list[tuple[str, str | None, float]]:
        return parse_requests(lora_nickname, lora_path, strength, self.max_strength)

    # ---- the API ------------------------------------------------------------------------------------------------
    def set_lora(
        self,
        lora_nickname: str | list[str],
        lora_path: str | list[str | None] | None = None,
        strength: float | list[float] = 1.0,
        target: str | list[str] = "all",
    ) -> dict:
        requests = self._requests(lora_nickname, lora_path, strength)
        targets = self.resolve_targets(target)

        # 1. Read and convert new files; nothing is stored yet.
        new: dict[str, LoadedLoRA] = {}
        for nickname, path, _ in requests:
            known = self.loaded.get(nickname)
            if path is None:
                if known is None:
                    have = ", ".join(self.loaded) or "none"
                    raise LoRAError(
                        "lora_nickname", f"{nickname!r} is not loaded (loaded: {have}); pass lora_path to load it"
                    )
            elif known is not None:
                if Path(path).expanduser().resolve() != Path(known.path).expanduser().resolve():
                    raise LoRAError(
                        "lora_nickname",
                        f"{nickname!r} is already loaded from {known.path}; choose another nickname for {path}",
                    )
            else:
                prefer = self.targets[targets[0]].architecture if targets else None
                new[nickname] = LoadedLoRA(nickname, path, load_canonical(path, prefer))

        # 2. Place every requested adapter on every requested target (new tensors only, on the side).
        placements: dict[tuple[str, str], list[Placement]] = {}
        for nickname, _, _ in requests:
            entry = new.get(nickname) or self.loaded[nickname]
            for t in targets:
                if t not in entry.placed:
                    tgt = self.targets[t]
                    placements[(nickname, t)] = place(entry.lora, tgt.model, tgt.key_map, tgt.architecture, t)

        # 3. Commit: from here on nothing can fail on bad input.
        self.loaded.update(new)
        for (nickname, t), placed in placements.items():
            self.loaded[nickname].placed[t] = placed
        for t in targets:
            state = self.state[t]
            state.active = [(n, s) for n, _, s in requests]
            if not state.active:
                state.mode = "off"
            elif state.mode == "off":
                state.mode = "dynamic"
            self._apply(t)
        return self._publish()

    def merge_lora_weights(self, strength: float = 1.0, target: str | list[str] = "all") -> dict:
        strength = check_strength(strength, limit=self.max_strength)
        targets = self.resolve_targets(target)
        for t in targets:
            if not self.state[t].active:
                raise LoRAError("target", f"no LoRA is set on {t}; call set_lora first")
        for t in targets:
            self.state[t].mode = "merged"
            self.state[t].merge_strength = strength
            self._apply(t)
        return self._publish()

    def unmerge_lora_weights(self, target: str | list[str] = "all") -> dict:
        targets = self.resolve_targets(target)
        for t in targets:
            if self.state[t].mode == "merged":
                self.state[t].mode = "off"
                self._apply(t)
        return self._publish()

    def _publish(self) -> dict:
        self.published = self.list_loras()
        return copy.deepcopy(self.published)

    def list_loras(self) -> dict:
        """Plain data (JSON-ready): what is loaded, and per target what is active, with strengths, and the mode."""
        loaded = [
            {
                "nickname": e.nickname,
                "path": e.path,
                "format": e.lora.format,
                "architecture": e.lora.architecture,
                "ranks": e.lora.ranks,
                "num_modules": len(e.lora.modules),
                "ignored_keys": len(e.lora.ignored),
                "device_bytes": {t: adapter_bytes(p) for t, p in e.placed.items()},
            }
            for e in self.loaded.values()
        ]
        targets = {
            t: {
                "active": [{"nickname": n, "strength": s} for n, s in st.active],
                "mode": st.mode,
                "merged": st.mode == "merged",
                "merge_strength": st.merge_strength if st.mode == "merged" else None,
            }
            for t, st in self.state.items()
        }
        return {"loaded": loaded, "targets": targets}

    # ---- applying a target's state to its layers --------------------------------------------------------------------
    def _apply(self, target: str) -> None:
        state, model = self.state[target], self.targets[target].model
        layers = dict(model.named_modules())
        per_layer: dict[str, list[LinearLoRA]] = {}
        if state.mode != "off":
            extra = state.merge_strength if state.mode == "merged" else 1.0
            for nickname, strength in state.active:
                for p in self.loaded[nickname].placed[target]:
                    scaled = replace(p.adapter, scale=p.adapter.scale * strength * extra)
                    per_layer.setdefault(p.layer, []).append(scaled)
        for name in state.touched | set(per_layer):
            layer: LinearBase = layers[name]  # type: ignore[assignment]
            layer.lora = []
            if state.mode == "merged" and name in per_layer:
                layer.merge_lora(per_layer[name], self.backup_device)  # from the kept W0: no restore round trip
            else:
                layer.unmerge_lora()
                layer.lora = per_layer.get(name, [])
        state.touched = set(per_layer)
