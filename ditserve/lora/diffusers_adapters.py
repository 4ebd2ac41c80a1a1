"""LoRA for the diffusers backend: `LoRAManager`'s interface and semantics over diffusers' own adapters (PEFT).

- `set_lora` loads new files with the pipeline's `load_lora_weights` (each under its nickname as the adapter name)
  and activates exactly the requested adapters with their strengths (`set_adapters`); `[]` turns LoRA off.
- `merge_lora_weights(strength)` folds the active adapters into the weights (`fuse_lora` with `lora_scale`),
  `unmerge_lora_weights` takes them out again (`unfuse_lora`), and then puts back the weights as they were before
  the merge, bit for bit (a fused weight minus its delta is only close to the original); the adapters stay loaded
  and inactive, as with native models.
- The inputs are checked as `LoRAManager` checks them (nicknames, paths, strengths, safetensors only, finite
  tensors) before anything changes; a file diffusers cannot load, or one that matches no module of the model, is
  removed again and the previous state re-applied, so an error leaves the model as it was.

diffusers applies a LoRA to every component its file covers (the denoiser, and text encoders where the file holds
them) at once: the targets are the pipeline's denoisers, and a call names all of them (`"all"`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ditserve.lora.canonical import LoRAError
from ditserve.lora.formats import read_lora_file
from ditserve.lora.manager import MAX_STRENGTH, TargetState, check_strength, parse_requests


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class DiffusersLoRAManager:
    """What the engine calls on a LoRA manager (set_lora, merge_lora_weights, unmerge_lora_weights, list_loras,
    `published`, `max_strength`), for a diffusers pipeline."""

    def __init__(self, pipe, targets: list[str], max_strength: float = MAX_STRENGTH):
        self.pipe = pipe
        self.supported = callable(getattr(pipe, "load_lora_weights", None))
        self.targets: dict[str, nn.Module] = {t: getattr(pipe, t) for t in targets} if self.supported else {}
        self.max_strength = max_strength
        self.loaded: dict[str, dict] = {}  # nickname → {"path": ..., "file": the safetensors file}
        self.state = TargetState()  # one state for every target: diffusers sets adapters pipeline-wide
        self._backup: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}  # weights before a merge
        self.published = self.list_loras()

    # ---- input checking ---------------------------------------------------------------------------------------
    def resolve_targets(self, target) -> list[str]:
        if not self.targets:
            raise LoRAError("target", f"{type(self.pipe).__name__} has no LoRA support in diffusers")
        names = _as_list(target)
        if not names or not all(isinstance(t, str) for t in names):
            raise LoRAError("target", f"must be 'all', a target name or a list of them, got {target!r}")
        have = ", ".join(self.targets)
        for t in names:
            if t != "all" and t not in self.targets:
                raise LoRAError("target", f"unknown target {t!r}; use 'all' or one of: {have}")
        if "all" not in names and set(names) != set(self.targets):
            raise LoRAError("target", f"the diffusers backend sets LoRAs on all of {have} at once; use 'all'")
        return list(self.targets)

    def _lora_file(self, path: str) -> Path:
        """The safetensors file a path names (a file, or a folder holding one), read and checked as native LoRAs
        are: readable, not empty, every tensor finite."""
        tensors, _ = read_lora_file(path)
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise LoRAError("lora_path", f"{path}: tensor {name} holds NaN or infinite values")
        p = Path(path).expanduser()
        if p.is_dir():
            peft = p / "adapter_model.safetensors"
            return peft if peft.is_file() else sorted(p.glob("*.safetensors"))[0]
        return p

    # ---- the API ------------------------------------------------------------------------------------------------
    def set_lora(self, lora_nickname, lora_path=None, strength=1.0, target="all") -> dict:
        requests = parse_requests(lora_nickname, lora_path, strength, self.max_strength)
        self.resolve_targets(target)
        new: dict[str, dict] = {}
        for nickname, path, _ in requests:
            known = self.loaded.get(nickname)
            if path is None:
                if known is None:
                    have = ", ".join(self.loaded) or "none"
                    raise LoRAError(
                        "lora_nickname", f"{nickname!r} is not loaded (loaded: {have}); pass lora_path to load it"
                    )
            elif known is not None:
                if Path(path).expanduser().resolve() != Path(known["path"]).expanduser().resolve():
                    raise LoRAError(
                        "lora_nickname",
                        f"{nickname!r} is already loaded from {known['path']}; choose another nickname for {path}",
                    )
            else:
                new[nickname] = {"path": path, "file": self._lora_file(path)}
        previous = copy.deepcopy(self.state)
        try:
            for nickname, entry in new.items():
                self._load(nickname, entry)
                self.loaded[nickname] = entry
            self.state.active = [(n, s) for n, _, s in requests]
            if not self.state.active:
                self.state.mode = "off"
            elif self.state.mode == "off":
                self.state.mode = "dynamic"
            self._apply()
        except BaseException:
            for nickname in new:
                self._forget(nickname)
            self.state = previous
            self._apply()
            raise
        return self._publish()

    def merge_lora_weights(self, strength: float = 1.0, target="all") -> dict:
        strength = check_strength(strength, limit=self.max_strength)
        targets = self.resolve_targets(target)
        if not self.state.active:
            raise LoRAError("target", f"no LoRA is set on {targets[0]}; call set_lora first")
        self.state.mode = "merged"
        self.state.merge_strength = strength
        self._apply()
        return self._publish()

    def unmerge_lora_weights(self, target="all") -> dict:
        self.resolve_targets(target)
        if self.state.mode == "merged":
            self.state.mode = "off"
            self._apply()
        return self._publish()

    def _publish(self) -> dict:
        self.published = self.list_loras()
        return copy.deepcopy(self.published)

    def list_loras(self) -> dict:
        """As `LoRAManager.list_loras`: what is loaded, and per target what is active, with strengths, and the mode."""
        loaded = []
        for nickname, entry in self.loaded.items():
            ranks, modules, device_bytes = set(), 0, {}
            for t, model in self.targets.items():
                count, size, model_ranks = _adapter_footprint(model, nickname)
                modules += count
                ranks |= model_ranks
                device_bytes[t] = size
            loaded.append(
                {
                    "nickname": nickname,
                    "path": entry["path"],
                    "format": "diffusers",
                    "architecture": type(self.pipe).__name__,
                    "ranks": sorted(ranks),
                    "num_modules": modules,
                    "ignored_keys": 0,
                    "device_bytes": device_bytes,
                }
            )
        st = self.state
        per_target = {
            "active": [{"nickname": n, "strength": s} for n, s in st.active],
            "mode": st.mode,
            "merged": st.mode == "merged",
            "merge_strength": st.merge_strength if st.mode == "merged" else None,
        }
        return {"loaded": loaded, "targets": {t: copy.deepcopy(per_target) for t in self.targets}}

    # ---- diffusers' adapters -----------------------------------------------------------------------------------
    def _adapters(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def _load(self, nickname: str, entry: dict) -> None:
        file: Path = entry["file"]
        try:
            self.pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=nickname)
        except Exception as e:  # noqa: BLE001 - diffusers raises several types for a file it cannot map
            raise LoRAError(
                "lora_path", f"{entry['path']}: diffusers cannot load it into {type(self.pipe).__name__} ({e})"
            ) from None
        if nickname not in self._adapters():
            raise LoRAError(
                "lora_path", f"{entry['path']}: the LoRA matches no module of this {type(self.pipe).__name__}"
            )

    def _forget(self, nickname: str) -> None:
        if nickname in self._adapters():
            self.pipe.delete_adapters([nickname])
        self.loaded.pop(nickname, None)

    def _apply(self) -> None:
        """Make diffusers' adapters match `state`: unfused (and the weights restored) first, then the active set
        with its strengths, then fused when merged."""
        self._unfuse()
        if not self._adapters():
            return
        names = [n for n, _ in self.state.active]
        if self.state.mode == "off" or not names:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[s for _, s in self.state.active])
        if self.state.mode == "merged":
            self._backup = _base_weights(self.pipe)
            self.pipe.fuse_lora(
                components=list(self.pipe._lora_loadable_modules),
                lora_scale=self.state.merge_strength,
                adapter_names=names,
            )

    def _unfuse(self) -> None:
        if not self._backup:
            return
        self.pipe.unfuse_lora(components=list(self.pipe._lora_loadable_modules))
        with torch.no_grad():
            for layer, saved in self._backup.values():
                for name, tensor in saved.items():
                    getattr(layer, name).copy_(tensor)
        self._backup = {}


def _peft_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _base_weights(pipe) -> dict[int, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """A copy (on the CPU) of the weight and bias of every layer holding adapters, to restore after an unmerge."""
    saved = {}
    for component in pipe._lora_loadable_modules:
        model = getattr(pipe, component, None)
        if not isinstance(model, nn.Module):
            continue
        for layer in _peft_layers(model):
            base = layer.get_base_layer()
            tensors = {n: p.detach().to("cpu", copy=True) for n, p in base.named_parameters(recurse=False)}
            saved[id(base)] = (base, tensors)
    return saved


def _adapter_footprint(model: nn.Module, adapter: str) -> tuple[int, int, set[int]]:
    """(layers holding the adapter, bytes of its A and B matrices, its ranks) in `model`."""
    count, size, ranks = 0, 0, set()
    for layer in _peft_layers(model):
        down = getattr(layer, "lora_A", {})
        if adapter not in down:
            continue
        count += 1
        ranks.add(int(layer.r[adapter]))
        for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
            size += sum(p.numel() * p.element_size() for p in part.parameters())
    return count, size, ranks
