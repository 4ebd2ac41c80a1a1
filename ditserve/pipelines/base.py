"""What every pipeline family provides to the engine.

A pipeline is a short sequence of stages (encode → prepare latents → denoise → decode). It takes a validated
`SamplingParams` with `None`s filled from `defaults()`, and returns images plus timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.config import SamplingParams

# Called after every denoising step with (step_index, num_steps). It may raise to abort the request.
StepCallback = Callable[[int, int], None]


@dataclass
class PipelineOutput:
    images: list[Any]  # PIL images, numpy arrays (H, W, 3) in [0, 1], or latent tensors
    timings: dict = field(default_factory=dict)


def seeded_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Gaussian noise exactly as diffusers draws it for `generator=torch.Generator("cpu").manual_seed(seed)`.

    Drawn on the CPU, in the target dtype, then moved: the same numbers on every device.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype, device="cpu").to(device)


class Pipeline:
    family: str = ""
    device: torch.device
    dtype: torch.dtype
    # Set by the engine when it runs over several ranks (ditserve.parallel.groups.ParallelGroups); stages that
    # can split work across ranks (CFG branches) read it.
    parallel = None
    # Set by the engine when VAE tiles are decoded across all ranks (--vae-tiling with several ranks): every rank
    # then takes part in decode, and a follower's decode of an image that fits one tile returns nothing.
    decode_group = None

    def defaults(self) -> SamplingParams:
        raise NotImplementedError

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this."""
        raise NotImplementedError

    @property
    def max_sequence_length_limit(self) -> int:
        raise NotImplementedError

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """Validate, then fill every `None` from the model's defaults."""
        params.validate(self.spatial_multiple, self.max_sequence_length_limit)
        return params.with_defaults(self.defaults())

    def __call__(self, params: SamplingParams, on_step: StepCallback | None = None) -> PipelineOutput:
        raise NotImplementedError

    # ---- batches of requests --------------------------------------------------------------------------------------
    def batch_key(self, params: SamplingParams) -> tuple:
        """Requests with equal keys (resolved params) can run as one batch: same shape and the same settings.

        Prompts, seeds and image counts may differ; everything that shapes the computation must not.
        """
        return (*params.computation_key(), params.output_type)

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Run resolved requests of one `batch_key`, returning one output per request, in order.

        This default runs them one after another; families that can, override it with one batched forward.
        """
        return [self(params, on_step) for params in batch]
