"""What every pipeline family provides to the engine.

A pipeline is a short sequence of stages (encode → prepare latents → denoise → decode). It takes a validated
`SamplingParams` with `None`s filled from `defaults()`, and returns images (or video frames) plus timings. A family's
pipeline is named by its `ModelSpec` (registry.py); `load` builds it from the components the spec lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ditserve.accel.cache_config import CacheConfig, CacheConfigError
from ditserve.config import ConfigError, EngineArgs, SamplingParams, ring_refusal
from ditserve.registry import ModelSpec

# The prompt of `Pipeline.forward_inputs` (benchmarks time one DiT forward on it).
BENCH_PROMPT = "a photo of a red fox sitting in fresh snow, golden hour"

# Called after every denoising step with (step_index, num_steps). It may raise to abort the request.
StepCallback = Callable[[int, int], None]


@dataclass
class PipelineOutput:
    images: list[Any]  # PIL images, numpy arrays (H, W, 3) in [0, 1], or latent tensors
    timings: dict = field(default_factory=dict)
    # Video families: uint8 arrays (T, H, W, 3) by default, float arrays in [0, 1] for output_type "np", or latents.
    videos: list[Any] = field(default_factory=list)


def seeded_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Gaussian noise exactly as diffusers draws it for `generator=torch.Generator("cpu").manual_seed(seed)`.

    Drawn on the CPU, in the target dtype, then moved: the same numbers on every device.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype, device="cpu").to(device)


class Pipeline:
    # The family's components dataclass: `load` builds it from the components the spec names (fields = names).
    components_class: ClassVar[type]
    spec: ModelSpec
    c: Any  # the components
    device: torch.device
    dtype: torch.dtype
    # Set by the engine when it runs over several ranks (ditserve.parallel.groups.ParallelGroups); stages that
    # can split work across ranks (CFG branches) read it.
    parallel = None
    # Set by the engine when VAE tiles are decoded across all ranks (--vae-tiling with several ranks): every rank
    # then takes part in decode, and a follower's decode of an image that fits one tile returns nothing.
    decode_group = None
    # The sparse attention backends every DiT of this model offers (`offered_sparse_backends`; set by `load`).
    sparse_attention: tuple[str, ...] = ()
    # Whether the family hands a request's `attention` to its DiTs' forwards (`attention_request`); the others run
    # the engine's --attention-backend for every request and refuse the field rather than ignore it.
    request_attention = False

    def __init__(
        self, spec: ModelSpec, components, device: torch.device, dtype: torch.dtype, sampling_defaults: dict | None
    ):
        self.spec = spec
        self.c = components
        self.device = device
        self.dtype = dtype
        self.sampling_defaults = dict(sampling_defaults or {})  # the folder's own, over diffusers' (ditserve.json)
        self.pipeline_config: dict[str, Any] = {}  # model_index.json's settings beside the components (`load` sets)
        # TeaCache's rescale polynomial fitted for this checkpoint (the folder's ditserve.json), or None
        self.teacache_coefficients: tuple[float, ...] | None = None

    @classmethod
    def load(
        cls,
        source,
        device: torch.device,
        dtype: torch.dtype,
        load_format: str,
        seed: int = 0,
        host_components: frozenset[str] = frozenset(),
    ) -> Pipeline:
        """From a `loader.folder.ModelSource`: every component of the family's spec, weights from the folder (or
        random with load_format="dummy"); `host_components` (to be offloaded) into host memory."""
        from ditserve.loader.folder import load_components

        loaded = load_components(source, device, dtype, load_format, seed, host_components)
        components = cls.components_class(**loaded)
        pipeline = cls(source.spec, components, device, dtype, source.sampling_defaults())
        pipeline.pipeline_config = source.pipeline_config()
        pipeline.teacache_coefficients = source.teacache_coefficients()
        pipeline.sparse_attention = offered_sparse_backends(source)
        return pipeline

    @property
    def family(self) -> str:
        return self.spec.family

    # ---- what the engine applies its features to -----------------------------------------------------------------
    def transformers(self) -> dict[str, nn.Module]:
        """Our DiTs by component name (sequence parallelism, attention backend, compile, CUDA graphs, LoRA); an
        optional one the model lacks is left out."""
        models = {d.component: getattr(self.c, d.component, None) for d in self.spec.dits}
        return {name: model for name, model in models.items() if model is not None}

    @property
    def vae(self) -> nn.Module:
        return self.c.vae

    @property
    def tasks(self) -> tuple[str, ...]:
        """What this model does (the server routes requests by it): the family's tasks, unless a folder of the
        family does only some of them."""
        return self.spec.tasks

    # ---- engine options the pipeline applies itself ---------------------------------------------------------------
    @classmethod
    def check_engine_args(cls, args: EngineArgs, source) -> None:
        """Refuse, naming the flag, what the engine arguments ask of this pipeline that it cannot do (before any
        rank starts). Native families: the cache-dit library is the diffusers backend's."""
        if args.cache_dit is not None:
            raise ConfigError(
                "cache_dit", "the cache-dit library runs with the diffusers backend (--backend diffusers)"
            )

    def configure(self, args: EngineArgs, groups) -> None:
        """Engine options this pipeline applies itself, after the engine's own on `transformers()` (sequence
        parallelism, attention backend, compile, CUDA graphs): none for native families."""

    def lora_manager(self):
        """The LoRA manager of this pipeline: adapters on our DiTs' linear layers (lora.LoRAManager)."""
        from ditserve.lora import LoRAManager, lora_targets

        return LoRAManager(lora_targets(self))

    # ---- defaults and validation ---------------------------------------------------------------------------------
    @property
    def default_side(self) -> int:
        """Height and width when the request names none (diffusers' default for the family)."""
        raise NotImplementedError

    def defaults(self) -> SamplingParams:
        """diffusers' pipeline defaults (the spec's), unless the folder names its own."""
        side = self.default_side
        params = SamplingParams(height=side, width=side, **self.spec.sampling_defaults)
        return params.replace(**self.sampling_defaults)

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this."""
        raise NotImplementedError

    @property
    def max_sequence_length_limit(self) -> int:
        return self.spec.max_sequence_length

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """Validate, then fill every `None` from the model's defaults (and every option from the spec's)."""
        check_capabilities(params, self.spec)
        if params.guidance_scale_2 is not None and len(self.transformers()) < 2:
            raise ConfigError(
                "guidance_scale_2",
                f"this {self.family} model has one transformer; guidance_scale_2 is the second expert's CFG scale "
                "(models with two, switched during denoising)",
            )
        params.validate(self.spatial_multiple, self.max_sequence_length_limit)
        if params.attention is not None and not self.request_attention:
            raise ConfigError(
                "attention",
                f"this {self.family} model runs the engine's attention backend for every request "
                "(--attention-backend); a per-request backend is for the video families",
            )
        check_attention(params.attention, self.sparse_attention, "attention", self.family)
        ring = self.parallel is not None and self.parallel.config.ring_degree > 1
        refusal = ring_refusal(params.attention) if ring and params.attention is not None else None
        if refusal is not None:
            raise ConfigError("attention", f"{refusal}: this engine runs Ring attention")
        from ditserve.layers.attention import needs_fp8_tensor_cores

        if needs_fp8_tensor_cores(params.attention):
            from ditserve.accel.fp8 import FP8Unsupported, check_fp8_device

            try:
                check_fp8_device(self.device, "Ask for another attention backend.")
            except FP8Unsupported as e:
                raise ConfigError("attention", str(e)) from None
        preset_options: dict = {}
        if params.sampling_preset is not None:
            preset = dict(self.sampling_preset(params.sampling_preset))
            preset_options = preset.pop("options", {})
            if len(self.transformers()) < 2:
                preset.pop("guidance_scale_2", None)
            params = params.with_defaults(SamplingParams(**preset))
        return params.with_defaults(self.defaults()).replace(
            options={**self.spec.sampling_options, **preset_options, **(params.options or {})},
            cache=self.resolve_cache(params.cache),
        )

    def sampling_preset(self, name: str) -> dict:
        """The family's named way of sampling (`ModelSpec.sampling_presets`), or an error naming the field."""
        presets = self.spec.sampling_presets
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise ConfigError(
                "sampling_preset", f"{self.family} has no sampling preset {name!r} (its presets: {known})"
            )
        return presets[name]

    def resolve_cache(self, cache) -> CacheConfig:
        """A request's cache setting with the method's defaults filled in, checked against the DiTs' blocks."""
        try:
            config = CacheConfig.coerce(cache).resolved()
            if config.enabled:
                for name, model in self.transformers().items():
                    if getattr(model, "block_loop", None) is None:
                        raise ConfigError("cache", f"{self.family}'s {name} has no block loop to cache")
                    config.check_blocks(len(model.repeated_blocks()))
        except CacheConfigError as e:
            raise ConfigError(e.field, e.message) from None
        return config

    def __call__(self, params: SamplingParams, on_step: StepCallback | None = None) -> PipelineOutput:
        """One request: a batch of one."""
        return self.generate([params], on_step)[0]

    def generate(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """`run_batch` with the batch's DiT caching on the DiTs' block loops (the requests of a batch share their
        `cache` setting: it is part of the batch key); the outputs' timings then carry `cache`, the counts of
        block computations run and skipped."""
        config = CacheConfig.coerce(batch[0].cache)
        if not config.enabled:
            return self.run_batch(batch, on_step)
        from ditserve.accel.cache import caching

        models = list(self.transformers().values())
        steps: int = batch[0].num_inference_steps  # type: ignore[assignment]
        with caching(models, config, steps, self.parallel, self.teacache_coefficients) as session:
            outputs = self.run_batch(batch, session.wrap(on_step))
        report = {"method": config.method, **session.stats.to_dict()}
        for output in outputs:
            output.timings["cache"] = dict(report)
        return outputs

    # ---- batches of requests --------------------------------------------------------------------------------------
    def batch_key(self, params: SamplingParams) -> tuple:
        """Requests with equal keys (resolved params) can run as one batch: same shape and the same settings.

        Prompts, seeds and image counts may differ; everything that shapes the computation must not.
        """
        return (*params.computation_key(), params.output_type, tuple(sorted((params.options or {}).items())))

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Run resolved requests of one `batch_key`, returning one output per request, in order."""
        raise NotImplementedError

    # ---- benchmarks and parity checks -----------------------------------------------------------------------------
    def forward_inputs(self, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments of one forward of the (first) DiT at batch 1 and this size, for a fixed prompt; the
        same arguments run diffusers' transformer from `diffusers_pipeline()`. Video families also take
        `num_frames` (default: the model's)."""
        raise NotImplementedError

    def diffusers_forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`forward_inputs` in the form diffusers' transformer of this family takes (here: the same)."""
        return inputs

    def comparable_outputs(
        self, ours: torch.Tensor, theirs: Any, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Our DiT's output and diffusers' (its `return_dict=False` result) for the same `forward_inputs`, in one
        layout (here: ours, which is diffusers')."""
        return ours, theirs[0]

    def diffusers_pipeline(self):
        """diffusers' own pipeline for this family over our components, its transformer(s) diffusers' class holding
        our weights (no copy): the same model run by diffusers, for `ditserve bench` and parity checks."""
        raise NotImplementedError


def prompts_with_negatives(batch: list[SamplingParams]) -> tuple[list[str], list[str], list[int]]:
    """A batch's samples in diffusers' order (each prompt's images or videos together): every prompt repeated
    num_images times, the negative prompt beside each (a request's one negative for all its prompts, or one per
    prompt; "" when none), and how many samples each request has."""
    prompts: list[str] = []
    negatives: list[str] = []
    counts: list[int] = []
    for p in batch:
        own = [p.prompt] if isinstance(p.prompt, str) else list(p.prompt)
        negs = p.negative_prompt if p.negative_prompt is not None else ""
        negs = [negs] * len(own) if isinstance(negs, str) else list(negs)
        negs = negs * len(own) if len(negs) == 1 else negs
        for text, neg in zip(own, negs):
            prompts += [text] * p.num_images
            negatives += [neg] * p.num_images
        counts.append(len(own) * p.num_images)
    return prompts, negatives, counts


def diffusers_model_sharing(model_cls, config: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' `model_cls` built on the meta device from `config` and given the tensors of `state_dict` (ours,
    under diffusers' names: no memory is added)."""
    with torch.device("meta"):
        model = model_cls.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def offered_sparse_backends(source) -> tuple[str, ...]:
    """The sparse attention backends (layers/sparse_attention.py) that every DiT of a model source offers."""
    from ditserve.layers.attention import sparse_attention_backends
    from ditserve.registry import load_object

    offered = [set(sparse_attention_backends(load_object(d.model), source.config(d.component))) for d in source.dits]
    return tuple(sorted(set.intersection(*offered))) if offered else ()


def check_attention(backend: str | None, offered: tuple[str, ...], field: str, model_name: str) -> None:
    """Refuse, naming `field`, a sparse attention backend the model does not offer."""
    from ditserve.layers.attention import check_attention_backend

    try:
        check_attention_backend(backend, offered, model_name)
    except ValueError as e:
        raise ConfigError(field, str(e)) from None


def check_capabilities(params: SamplingParams, spec: ModelSpec) -> None:
    """Refuse, naming the field, what the family cannot take: frames for image models, input images for models
    that take none, options it does not have."""
    if spec.output != "video":
        for name in ("num_frames", "fps"):
            if getattr(params, name) is not None:
                raise ConfigError(name, f"{spec.family} makes images, not videos; {name} is for video models")
    unknown = sorted(set(params.options or {}) - set(spec.sampling_options))
    if unknown:
        known = ", ".join(sorted(spec.sampling_options)) or "none"
        raise ConfigError("options", f"{spec.family} has no setting {', '.join(unknown)} (its settings: {known})")
    images = params.images or []
    if images and not spec.image_inputs:
        raise ConfigError("images", f"{spec.family} takes no input images (it is a text-to-{spec.output} model)")
    if len(images) > spec.image_inputs:
        raise ConfigError("images", f"{spec.family} takes at most {spec.image_inputs} input images, got {len(images)}")
