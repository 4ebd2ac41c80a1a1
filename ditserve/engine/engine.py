"""Engine: loads a pipeline once and serves generation requests in this process.

`Engine.from_pretrained(...)` resolves the model (folder, preset or built-in), loads it, and `generate(...)`
validates a request, fills the model's defaults, runs the pipeline and returns images with timings and peak memory.
"""

from __future__ import annotations

import copy
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.accel.compile import compile_repeated_blocks
from ditserve.config import EngineArgs, SamplingParams
from ditserve.layers.attention import set_attention_backend
from ditserve.loader.folder import resolve_model
from ditserve.lora import LoRAManager, lora_targets
from ditserve.pipelines import Pipeline, pipeline_class
from ditserve.pipelines.base import StepCallback
from ditserve.utils.memory import peak_mb, reset_peak


@dataclass
class GenerationResult:
    images: list[Any]
    seed: int
    params: SamplingParams  # the request as run, every default filled in
    timings: dict = field(default_factory=dict)  # seconds: encode, prepare, denoise, decode, total; steps: [...]
    peak_memory_mb: float | None = None  # peak device memory during this request (None on the CPU)


class Engine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.device = args.resolved_device()
        self.dtype = args.resolved_dtype()
        self.source = resolve_model(args.model, args.load_format)
        cls = pipeline_class(self.source.family)
        self.pipeline: Pipeline = cls.load(  # type: ignore[attr-defined]
            self.source, self.device, self.dtype, args.load_format, args.seed_for_dummy_weights
        )
        transformer = self.pipeline.c.transformer  # type: ignore[attr-defined]
        set_attention_backend(transformer, args.attention_backend, self.device)
        if args.compile:
            compile_repeated_blocks(transformer)
        # One request at a time per engine: the pipeline's modules are shared state. LoRA changes take the same
        # lock, so they land between requests and a request never sees half of one LoRA state and half of another.
        self._lock = threading.Lock()
        self.lora = LoRAManager(lora_targets(self.pipeline))

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        load_format: str = "auto",
        **engine_args: Any,
    ) -> Engine:
        return cls(EngineArgs(model=path_or_preset, device=device, dtype=dtype, load_format=load_format, **engine_args))

    @property
    def model_name(self) -> str:
        return self.source.name

    def defaults(self) -> SamplingParams:
        return self.pipeline.defaults()

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        params = SamplingParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale,
            seed=seed,
            num_images=num_images,
            max_sequence_length=max_sequence_length,
            output_type=output_type,
        )
        return self.run(params, on_step)

    def run(self, params: SamplingParams, on_step: StepCallback | None = None) -> GenerationResult:
        resolved = self.pipeline.resolve(params)
        if resolved.seed is None:
            # A drawn seed is reported back, so any image can be made again.
            resolved = resolved.replace(seed=secrets.randbits(63))
        with self._lock:
            reset_peak(self.device)
            out = self.pipeline(resolved, on_step)
            peak = peak_mb(self.device)
        return GenerationResult(
            images=out.images, seed=resolved.seed, params=resolved, timings=out.timings, peak_memory_mb=peak
        )

    # ---- LoRA (inputs and outputs are plain data, so the HTTP routes can pass them through) --------------------------
    def set_lora(
        self,
        lora_nickname: str | list[str],
        lora_path: str | list[str | None] | None = None,
        strength: float | list[float] = 1.0,
        target: str | list[str] = "all",
    ) -> dict:
        """Load (if new) and activate these adapters with these strengths on the target(s); `[]` turns LoRA off.

        Raises `LoRAError` (a ValueError with `.field`) on any bad input, leaving the previous state unchanged.
        Returns `list_loras()`.
        """
        with self._lock:
            return self.lora.set_lora(lora_nickname, lora_path, strength, target)

    def merge_lora_weights(self, strength: float = 1.0, target: str | list[str] = "all") -> dict:
        """Fold the active adapters (times `strength`) into the weights, keeping W0 for an exact unmerge."""
        with self._lock:
            return self.lora.merge_lora_weights(strength, target)

    def unmerge_lora_weights(self, target: str | list[str] = "all") -> dict:
        """Restore W0 bit for bit; the target runs the base model until set_lora or merge_lora_weights."""
        with self._lock:
            return self.lora.unmerge_lora_weights(target)

    def list_loras(self) -> dict:
        """Loaded adapters and, per target, the active ones with strengths and the mode (off, dynamic, merged).

        Answered without waiting for a running request: it is the state as of the last completed LoRA change,
        which is the state every request from now on runs with."""
        return copy.deepcopy(self.lora.published)
