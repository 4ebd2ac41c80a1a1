"""LoRA: every common format → one canonical form; adapters on our linear layers; exact merge and unmerge."""

from ditserve.lora.canonical import CanonicalLoRA, LoRAError, LoRAModule
from ditserve.lora.formats import convert, load_canonical, read_lora_file
from ditserve.lora.manager import LoRAManager, LoRATarget
from ditserve.pipelines.base import Pipeline


def lora_targets(pipeline: Pipeline) -> dict[str, LoRATarget]:
    """The transformers of a loaded pipeline that LoRAs can target, by the names users pass as `target` (none for a
    family without LoRA support yet: every LoRA call then says so)."""
    if pipeline.family == "flux":
        from ditserve.models.flux import map_diffusers_key

        return {"transformer": LoRATarget("transformer", pipeline.c.transformer, map_diffusers_key, "flux")}  # type: ignore[attr-defined]
    return {}


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
