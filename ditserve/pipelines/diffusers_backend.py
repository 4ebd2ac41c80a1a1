"""The diffusers backend: any diffusers pipeline, run by diffusers itself behind our `Pipeline` seam.

Folders whose `_class_name` no native family serves (Stable Diffusion 3, Sana, PixArt, CogView4, HunyuanVideo,
LTX-Video, ...) load with `DiffusionPipeline.from_pretrained` in the engine's dtype on its device (a preset or
`--load-format dummy`: our loader's components with random weights, handed to the pipeline class), and everything
around the model is ours: the CLI, the Python API, the server, batching, LoRA, memory reporting, progress and
cancellation. `--backend diffusers` runs a natively served folder (FLUX.1) this way too.

What a pipeline can take is read from its `__call__`'s signature, never listed per class:
- each `SamplingParams` field goes to the parameter named in `FIELD_PARAMETERS` (the seed as a CPU generator, as
  diffusers' examples seed, so the same seed gives the same picture as calling diffusers directly); a field set on a
  request whose parameter the pipeline lacks is refused naming the field;
- the defaults are the signature's (steps, guidance, frames, sequence length); the size is the signature's, or the
  transformer's sample size times the VAE's factor when the pipeline computes it;
- the other scalar parameters with defaults (Sana's `use_resolution_binning`, LTX's `decode_timestep`, SD3's
  skip-layer guidance, ...) are the request's `options`, typed by their defaults;
- a pipeline with `num_frames` makes videos (uint8 `Video`s at the request's fps, passed on as `frame_rate` where
  the pipeline conditions on it), one with `image` takes an input image.

Requests of one batch key run as one pipeline call (a list of prompts, one generator each) when each asks for one
sample, brings no image and the pipeline takes lists; otherwise one call each, so each request's samples are drawn
exactly as diffusers draws them alone. Steps are reported through `callback_on_step_end` (progress and
cancellation); the stages are split at the denoiser's first forward and the last step's end.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ditserve.config import ConfigError, EngineArgs, SamplingParams
from ditserve.errors import LoaderError
from ditserve.pipelines.base import Pipeline, PipelineOutput, StepCallback, check_capabilities
from ditserve.registry import ModelSpec
from ditserve.utils.timing import StageTimer, synchronize
from ditserve.utils.video import Video

PIPELINE = "ditserve.pipelines.diffusers_backend:DiffusersBackendPipeline"
VIDEO_FPS = 16  # the clip's frame rate for a video pipeline whose __call__ has no frame_rate
SIDE_MULTIPLE = 16  # sides divide by 16 at least (what most diffusers pipelines check), and by the latent patch

# SamplingParams fields → the __call__ parameters that take them (the first the pipeline has).
FIELD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "negative_prompt": ("negative_prompt",),
    "height": ("height",),
    "width": ("width",),
    "num_frames": ("num_frames",),
    "num_inference_steps": ("num_inference_steps",),
    "guidance_scale": ("guidance_scale",),
    "guidance_scale_2": ("guidance_scale_2",),
    "true_cfg_scale": ("true_cfg_scale",),
    "seed": ("generator",),
    "num_images": ("num_images_per_prompt", "num_videos_per_prompt"),
    "max_sequence_length": ("max_sequence_length",),
    "images": ("image",),
    "fps": ("frame_rate",),
}
# Parameters the backend sets itself or that only make sense in Python (tensors, callables): never options.
_NOT_OPTIONS = {
    "self",
    "generator",
    "latents",
    "output_type",
    "return_dict",
    "callback",
    "callback_steps",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
}
# Our --attention-backend names → diffusers' attention dispatcher's.
ATTENTION_BACKENDS = {
    "sdpa": "native",
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
}


# ---- the registration, built per pipeline class -------------------------------------------------------------------
def pipeline_class(class_name: str):
    """diffusers' pipeline class of that name; LoaderError when diffusers has none."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise LoaderError(f"pipeline class {class_name!r} is not a pipeline of diffusers {diffusers.__version__}")
    return cls


def call_parameters(cls) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__call__).parameters.items() if name != "self"}


def _parameter_for(field: str, parameters: dict) -> str | None:
    return next((name for name in FIELD_PARAMETERS[field] if name in parameters), None)


def _option_defaults(parameters: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """The pipeline's own scalar settings with defaults: what a request may set in `options`."""
    taken = {name for names in FIELD_PARAMETERS.values() for name in names} | _NOT_OPTIONS
    return {
        name: p.default
        for name, p in parameters.items()
        if name not in taken and isinstance(p.default, bool | int | float | str)
    }


def backend_spec(
    class_name: str,
    components: dict[str, tuple[str, str]],
    optional_components: tuple[str, ...] = (),
    code_tokenizers: dict[str, str] | None = None,
) -> ModelSpec:
    """The diffusers backend's registration for one pipeline class (its `family` is the class name): what its
    `__call__` takes decides the output, the tasks, the input images, the defaults and the options."""
    parameters = call_parameters(pipeline_class(class_name))
    video = "num_frames" in parameters
    output = "video" if video else "image"
    tasks: tuple[str, ...] = (f"text-to-{output}",)
    if "image" in parameters:
        tasks += ("image-to-video",) if video else ("image-edit",)
    defaults: dict[str, Any] = {}
    for field in ("num_inference_steps", "guidance_scale", "true_cfg_scale", "max_sequence_length", "num_frames"):
        name = _parameter_for(field, parameters)
        value = parameters[name].default if name else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        defaults[field] = float(value) if "scale" in field else value
    negative = parameters.get("negative_prompt")
    if negative is not None and isinstance(negative.default, str):
        defaults["negative_prompt"] = negative.default
    if video:
        frame_rate = parameters.get("frame_rate")
        defaults["fps"] = (
            frame_rate.default if frame_rate is not None and isinstance(frame_rate.default, int) else VIDEO_FPS
        )
    return ModelSpec(
        family=class_name,
        pipeline_classes=(class_name,),
        components=dict(components),
        dits=(),
        pipeline=PIPELINE,
        optional_components=tuple(optional_components),
        code_tokenizers=dict(code_tokenizers or {}),
        output=output,
        tasks=tasks,
        image_inputs=1 if "image" in parameters else 0,
        sampling_defaults=defaults,
        max_sequence_length=max(512, defaults.get("max_sequence_length", 0)),
        sampling_options=_option_defaults(parameters),
    )


# ---- the pipeline -------------------------------------------------------------------------------------------------
class DiffusersBackendPipeline(Pipeline):
    c: Any  # the diffusers pipeline itself (its components are its attributes: c.vae, c.transformer, ...)

    def __init__(self, spec: ModelSpec, pipe, device: torch.device, dtype: torch.dtype, sampling_defaults=None):
        super().__init__(spec, pipe, device, dtype, sampling_defaults)
        self.pipe = pipe
        self.parameters = call_parameters(type(pipe))
        pipe.set_progress_bar_config(disable=True)

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
        """A folder: `DiffusionPipeline.from_pretrained` in `dtype`, moved to `device`. A preset, or any model with
        load_format="dummy": our loader's components (random weights at the real sizes) given to the class. Diffusers
        places its own components (its group offload, `configure`), so the engine never asks for host components."""
        if host_components:
            raise ValueError(f"the diffusers backend places its own components; asked for {sorted(host_components)}")
        import diffusers

        pipeline_cls = pipeline_class(source.spec.family)
        if load_format == "dummy" or source.folder is None:
            from ditserve.loader.folder import load_components

            components = load_components(source, device, dtype, "dummy", seed)
            accepted = inspect.signature(pipeline_cls.__init__).parameters
            pipe = pipeline_cls(**{name: value for name, value in components.items() if name in accepted})
        else:
            try:
                pipe = diffusers.DiffusionPipeline.from_pretrained(source.folder, dtype=dtype)
            except (OSError, ValueError, TypeError) as e:
                raise LoaderError(f"{source.folder}: diffusers cannot load it ({type(e).__name__}: {e})") from None
            pipe.to(device)
        pipeline = cls(source.spec, pipe, device, dtype, source.sampling_defaults())
        pipeline.pipeline_config = source.pipeline_config()
        return pipeline

    # ---- what it is made of ----------------------------------------------------------------------------------
    def denoisers(self) -> dict[str, nn.Module]:
        """The pipeline's denoising models by component name (transformer, transformer_2, or a UNet)."""
        found = {name: getattr(self.pipe, name, None) for name in ("transformer", "transformer_2", "unet", "prior")}
        return {name: model for name, model in found.items() if isinstance(model, nn.Module)}

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel a side (the VAE's spatial compression)."""
        for name in ("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_scale_factor"):
            value = getattr(self.pipe, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 8

    @property
    def latent_patch(self) -> int:
        models = self.denoisers()
        patch = getattr(next(iter(models.values())).config, "patch_size", 1) if models else 1
        if isinstance(patch, list | tuple):
            patch = max(patch[-2:])
        return patch if isinstance(patch, int) and patch > 0 else 1

    @property
    def spatial_multiple(self) -> int:
        return math.lcm(SIDE_MULTIPLE, self.spatial_factor * self.latent_patch)

    @property
    def vae_scale_temporal(self) -> int:
        """Frames per latent frame (a video VAE's temporal compression; 1 for images)."""
        for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"):
            value = getattr(self.pipe, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1

    def default_size(self) -> tuple[int, int]:
        """(height, width) a request naming none gets: the signature's defaults, else what the pipeline computes
        (its default sample size, or its transformer's, times the VAE's factor), else 1024²."""
        height, width = self.parameters.get("height"), self.parameters.get("width")
        if height is not None and width is not None and isinstance(height.default, int) and height.default:
            return height.default, width.default
        sample = getattr(self.pipe, "default_sample_size", None)
        if not isinstance(sample, int):
            models = self.denoisers()
            sample = getattr(next(iter(models.values())).config, "sample_size", None) if models else None
        if isinstance(sample, list | tuple):
            sample = sample[-1]
        side = sample * self.spatial_factor if isinstance(sample, int) else 1024
        return side, side

    @property
    def default_side(self) -> int:
        return self.default_size()[0]

    def defaults(self) -> SamplingParams:
        height, width = self.default_size()
        params = SamplingParams(height=height, width=width, **self.spec.sampling_defaults)
        return params.replace(**self.sampling_defaults)

    # ---- validation ---------------------------------------------------------------------------------------------
    def check_supported(self, params: SamplingParams) -> None:
        """Refuse, naming the field, what this pipeline's __call__ cannot take."""
        name = self.spec.family
        for field in FIELD_PARAMETERS:
            if field in ("prompt", "seed", "fps"):  # every pipeline has a prompt and a generator; fps is the clip's
                continue
            value = getattr(params, field)
            unset = value is None or (field == "num_images" and value == 1) or (field == "images" and not value)
            if unset or _parameter_for(field, self.parameters) is not None:
                continue
            wanted = " or ".join(FIELD_PARAMETERS[field])
            raise ConfigError(field, f"{name} cannot take {field}: its __call__ has no {wanted} parameter")
        if not isinstance(params.prompt, str) and len(params.prompt) > 1 and not self.takes_lists:
            raise ConfigError("prompt", f"{name} takes one prompt per request, not a list")
        for option, value in (params.options or {}).items():
            default = self.spec.sampling_options.get(option)
            if default is None or value is None:
                continue  # unknown names are refused by check_capabilities
            kind = bool if isinstance(default, bool) else str if isinstance(default, str) else (int, float)
            if isinstance(default, int) and not isinstance(default, bool):
                kind = int
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
                raise ConfigError(
                    f"options.{option}", f"must be like its default {default!r} ({type(default).__name__})"
                )

    @property
    def takes_lists(self) -> bool:
        """Whether the pipeline's prompt takes a list (then requests batch into one call)."""
        prompt = self.parameters.get("prompt")
        annotation = str(prompt.annotation).lower() if prompt is not None else ""
        return "list" in annotation

    def resolve(self, params: SamplingParams) -> SamplingParams:
        check_capabilities(params, self.spec)
        self.check_supported(params)
        params.validate(self.spatial_multiple, self.max_sequence_length_limit)
        resolved = params.with_defaults(self.defaults()).replace(
            options={**self.spec.sampling_options, **(params.options or {})}
        )
        if resolved.images:
            from ditserve.pipelines.input_images import as_data_uri

            resolved = resolved.replace(images=[as_data_uri(image) for image in resolved.images])
        return resolved

    # ---- running ----------------------------------------------------------------------------------------------
    def _samples(self, params: SamplingParams) -> int:
        prompts = 1 if isinstance(params.prompt, str) else len(params.prompt)
        return prompts * params.num_images

    def _calls(self, batch: list[SamplingParams]) -> list[list[int]]:
        """The batch's requests grouped into pipeline calls (indices): all in one where each has one sample and no
        image and the pipeline takes lists (and the negatives are all given or all not); else one call each."""
        together = (
            len(batch) > 1
            and self.takes_lists
            and all(self._samples(p) == 1 and not p.images for p in batch)
            and len({p.negative_prompt is None for p in batch}) == 1
        )
        return [list(range(len(batch)))] if together else [[i] for i in range(len(batch))]

    def _call_kwargs(self, requests: list[SamplingParams]) -> dict[str, Any]:
        first = requests[0]
        has = self.parameters
        kwargs: dict[str, Any] = {}
        if len(requests) == 1:
            kwargs["prompt"] = first.prompt
            if first.negative_prompt is not None:
                kwargs["negative_prompt"] = first.negative_prompt
            generator: Any = torch.Generator("cpu").manual_seed(first.seed)  # type: ignore[arg-type]
            if first.num_images != 1:
                kwargs[_parameter_for("num_images", has)] = first.num_images  # type: ignore[index]
        else:  # one sample each: a list of prompts, one generator per sample
            kwargs["prompt"] = [p.prompt if isinstance(p.prompt, str) else p.prompt[0] for p in requests]
            if first.negative_prompt is not None:
                kwargs["negative_prompt"] = [
                    p.negative_prompt if isinstance(p.negative_prompt, str) else p.negative_prompt[0]  # type: ignore[index]
                    for p in requests
                ]
            generator = [torch.Generator("cpu").manual_seed(p.seed) for p in requests]  # type: ignore[arg-type]
        kwargs["generator"] = generator
        for field in (
            "height",
            "width",
            "num_frames",
            "num_inference_steps",
            "guidance_scale",
            "guidance_scale_2",
            "true_cfg_scale",
            "max_sequence_length",
            "fps",
        ):
            name, value = _parameter_for(field, has), getattr(first, field)
            if name is not None and value is not None:
                kwargs[name] = value
        if first.images:
            from ditserve.pipelines.input_images import load_image

            kwargs["image"] = load_image(first.images[0])
        kwargs.update(first.options or {})
        video = self.spec.output == "video"
        kwargs["output_type"] = "np" if video and first.output_type == "pil" else first.output_type
        kwargs["return_dict"] = False
        return kwargs

    def _outputs(self, result, params: SamplingParams) -> list:
        """One entry per sample: PIL images, float arrays in [0, 1], latents, or uint8 `Video`s at the fps."""
        items = list(result)  # a list of PIL images, or an array or tensor with the samples first
        if self.spec.output == "video" and params.output_type == "pil":
            return [Video((np.asarray(frames) * 255).astype(np.uint8), fps=params.fps) for frames in items]  # type: ignore[arg-type]
        return items

    def run_batch(self, batch: list[SamplingParams], on_step: StepCallback | None = None) -> list[PipelineOutput]:
        """Resolved requests of one batch_key, as few pipeline calls as give each request exactly what it gets alone."""
        if len({self.batch_key(p) for p in batch}) != 1:
            raise ValueError("run_batch: the requests differ in shape or settings; group them by batch_key first")
        outputs: list[PipelineOutput | None] = [None] * len(batch)
        for indices in self._calls(batch):
            requests = [batch[i] for i in indices]
            samples, timings = self._run_call(requests, on_step)
            timings["batch_size"] = len(batch)
            start = 0
            for i, request in zip(indices, requests):
                n = self._samples(request)
                mine = samples[start : start + n]
                start += n
                if self.spec.output == "video":
                    outputs[i] = PipelineOutput(images=[], videos=mine, timings=dict(timings))
                else:
                    outputs[i] = PipelineOutput(images=mine, timings=dict(timings))
        return outputs  # type: ignore[return-value]

    def _run_call(self, requests: list[SamplingParams], on_step: StepCallback | None) -> tuple[list, dict]:
        """One pipeline call, timed: encode until the denoiser's first forward, denoise until the last step ends,
        decode after; per-step times from the step callback."""
        kwargs = self._call_kwargs(requests)
        timer = StageTimer(self.device)
        marks: dict[str, float] = {}
        steps = {"open": False}

        def before_forward(_module, _args) -> None:
            if not steps["open"]:
                if "first" not in marks:
                    synchronize(self.device)
                    marks["first"] = time.perf_counter()
                timer.step_begin()
                steps["open"] = True

        def on_step_end(pipe, i: int, _t, callback_kwargs: dict) -> dict:
            total = getattr(pipe, "num_timesteps", None) or requests[0].num_inference_steps
            if steps["open"]:
                timer.step_end()
                steps["open"] = False
            if i + 1 == total:
                synchronize(self.device)
                marks["last"] = time.perf_counter()
            if on_step is not None:
                on_step(i, total)
            return callback_kwargs

        if "callback_on_step_end" in self.parameters:
            kwargs["callback_on_step_end"] = on_step_end
        hooks = [model.register_forward_pre_hook(before_forward) for model in self.denoisers().values()]
        synchronize(self.device)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                result = self.pipe(**kwargs)[0]
        finally:
            for hook in hooks:
                hook.remove()
        synchronize(self.device)
        end = time.perf_counter()
        timings = timer.summary()
        timings["total"] = end - start
        if "first" in marks:
            last = marks.get("last", end)
            timings.update(encode=marks["first"] - start, denoise=last - marks["first"], decode=end - last)
        return self._outputs(result, requests[0]), timings

    # ---- engine features, through diffusers' own ------------------------------------------------------------
    @classmethod
    def check_engine_args(cls, args: EngineArgs, source) -> None:
        """Refuse, naming the flag, what the diffusers backend cannot do with this model, before anything starts."""
        if args.cache is not None and args.cache.enabled:
            raise ConfigError("cache", "ditserve's DiT caching is for native families; the backend has --cache-dit")
        for flag in ("max_gpu_memory", "text_encoder_cpu_offload", "image_encoder_cpu_offload", "vae_cpu_offload"):
            if getattr(args, flag):
                raise ConfigError(
                    flag, "native families only; the diffusers backend offloads with --dit-layerwise-offload"
                )
        if args.quantization is not None:
            raise ConfigError(
                "quantization", "FP8 quantisation is for native families' DiTs; the diffusers backend runs bf16"
            )
        if args.attention_backend != "auto" and args.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                "attention_backend",
                f"the diffusers backend takes {', '.join(ATTENTION_BACKENDS)} (diffusers' attention dispatcher); "
                f"{args.attention_backend} is for native families",
            )
        if args.tp_size > 1:
            raise ConfigError("tp_size", "the diffusers backend has no tensor parallelism; use --backend native")
        if args.cfg_parallel:
            raise ConfigError("cfg_parallel", "the diffusers backend has no CFG parallelism; use --backend native")
        if args.ulysses_degree * args.ring_degree > 1:
            if args.resolved_device().type != "cuda":
                raise ConfigError(
                    "ulysses_degree", "diffusers' context parallelism needs CUDA GPUs (on the CPU: --backend native)"
                )
            denoiser = source.spec.components.get("transformer")
            model_cls = None
            if denoiser is not None and denoiser[0] == "diffusers":
                import diffusers

                model_cls = getattr(diffusers, denoiser[1], None)
            if model_cls is None or not getattr(model_cls, "_cp_plan", None):
                name = denoiser[1] if denoiser is not None else "this pipeline's denoiser"
                raise ConfigError(
                    "ulysses_degree" if args.ulysses_degree > 1 else "ring_degree",
                    f"{name} has no context-parallel plan in diffusers: it cannot split its sequence over GPUs",
                )

    def configure(self, args: EngineArgs, groups) -> None:
        """The engine's speed options through diffusers: its attention dispatcher, context parallelism, group
        offload, the cache-dit library and regional compilation (in that order: parallelism needs the attention
        backend set, compilation comes last)."""
        models = self.denoisers()
        if args.attention_backend != "auto":
            for model in models.values():
                model.set_attention_backend(ATTENTION_BACKENDS[args.attention_backend])
        if groups is not None and args.ulysses_degree * args.ring_degree > 1:
            from diffusers import ContextParallelConfig

            config = ContextParallelConfig(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
            for model in models.values():
                model.enable_parallelism(config=config)
        if args.dit_layerwise_offload:
            cuda = self.device.type == "cuda"
            for model in models.values():
                model.enable_group_offload(
                    onload_device=self.device,
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=cuda,
                    non_blocking=cuda,
                )
        if args.cache_dit is not None:
            from ditserve.accel.cache_dit import enable_cache_dit

            enable_cache_dit(self.pipe, args.cache_dit)  # type: ignore[arg-type]
        if args.compile:
            for model in models.values():
                if getattr(model, "_repeated_blocks", None):
                    model.compile_repeated_blocks(fullgraph=True)
                else:  # no regional plan: the whole denoiser
                    model.compile()

    def lora_manager(self):
        from ditserve.lora.diffusers_adapters import DiffusersLoRAManager

        return DiffusersLoRAManager(self.pipe, list(self.denoisers()))
