"""The one form every LoRA format is converted to, and the error every LoRA problem raises.

A `LoRAModule` is one low-rank update written against the diffusers names of a model's linears. `targets` names
one module, or several whose outputs the update covers concatenated in order: a LoRA trained on a fused checkpoint
projection (BFL's `img_attn.qkv`, `linear1`) keeps its single (A, B) pair instead of being split into three or four
copies, so it stays exact and cheap, and lands on the matching fused layer of ours as one adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ditserve.errors import FieldError


class LoRAError(FieldError):
    """A LoRA request cannot be honoured. `field` names the offending input (lora_path, lora_nickname, strength,
    target) and `message` says why, so the CLI can name the flag and the server can answer 400. Nothing was changed
    when it is raised."""


@dataclass
class LoRAModule:
    targets: tuple[str, ...]  # diffusers module names (no ".weight"); B's rows are their outputs, in this order
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [sum of the targets' out_features, rank]
    alpha: float | None = None  # None: alpha = rank, i.e. no scaling (the diffusers/PEFT convention without alphas)
    rslora: bool = False  # PEFT's use_rslora: scale by alpha/sqrt(rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """The factor this format's trainer multiplies B(A x) by, before any user strength."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)


@dataclass
class CanonicalLoRA:
    format: str  # the detected source format, e.g. "diffusers", "peft", "kohya-flux", "xlabs-flux"
    architecture: str  # the model family the names are written for: "flux", "wan", "qwen-image"
    modules: list[LoRAModule] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # keys deliberately skipped (text-encoder LoRA, zero norm diffs)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})
