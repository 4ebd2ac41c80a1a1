"""LoRA: every common format → one canonical form; adapters on our linear layers; exact merge and unmerge."""

from ditserve.lora.canonical import CanonicalLoRA, LoRAError, LoRAModule
from ditserve.lora.formats import convert, load_canonical, read_lora_file
from ditserve.lora.manager import LoRAManager, LoRATarget
from ditserve.pipelines.base import Pipeline
from ditserve.registry import load_object


def lora_targets(pipeline: Pipeline) -> dict[str, LoRATarget]:
    """The transformers of a loaded pipeline that LoRAs can target, by the names users pass as `target` (their
    component names; none for a family without LoRA support yet: every LoRA call then says so)."""
    spec = pipeline.spec
    if spec.lora_architecture is None:
        return {}
    models = pipeline.transformers()
    return {
        d.component: LoRATarget(d.component, models[d.component], load_object(d.key_map), spec.lora_architecture)
        for d in spec.dits
        if d.component in models
    }


__all__ = [
    "CanonicalLoRA",
    "LoRAError",
    "LoRAManager",
    "LoRAModule",
    "LoRATarget",
    "convert",
    "load_canonical",
    "lora_targets",
    "read_lora_file",
]
