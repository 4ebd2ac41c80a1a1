"""Every engine flag and every per-request setting, in one place, with validation.

`EngineArgs` says how a model is loaded and run; `SamplingParams` says what one request asks for. Both are plain
dataclasses so they can cross process boundaries as data. Validation raises `ConfigError` whose message names the
field, so the CLI and the server can show it to the user as is.

Importing this module does not import torch (the HTTP process and the CLI's parsers read these definitions); torch
is imported when an EngineArgs is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ditserve.accel.cache_config import CacheConfig, CacheConfigError
from ditserve.errors import FieldError

if TYPE_CHECKING:
    import torch

# Accepted dtype names → torch's.
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
LOAD_FORMATS = ("auto", "dummy")
BACKENDS = ("auto", "native", "diffusers")  # registry.BACKENDS (this module imports no registry)
OUTPUT_TYPES = ("pil", "np", "latent")
ATTENTION_BACKENDS = (
    "auto", "sdpa", "cudnn", "flash", "efficient", "math", "sage", "fp8", "cudnn-fp8", "sliding-tile", "sla",
    "sla-fp8", "vsa",
)  # fmt: skip
# Sparse backends (layers/sparse_attention.py) take one argument after a colon: sliding-tile's window in tiles
# (frames,rows,columns; odd counts), SLA's share of key blocks each query block attends to, VSA's share of key cubes
# each query cube leaves out.
SPARSE_ATTENTION_ARGUMENTS = {
    "sliding-tile": "T,H,W (odd tile counts, e.g. 3,3,5)",
    "sla": "a ratio in (0, 1]",
    "sla-fp8": "a ratio in (0, 1]",
    "vsa": "a sparsity in [0, 1)",
}
# What Ring attention (--ring-degree > 1) runs: its own kernel, which merges the blocks' partial results through
# their log-sum-exp, whatever dense backend is named; the others (sage, fp8, cudnn-fp8, the sparse ones) it cannot run.
RING_ATTENTIONS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math")


def ring_refusal(backend: str) -> str | None:
    """Why an engine running Ring attention cannot run `backend` (None: it can)."""
    kind = backend.partition(":")[0]
    if kind in RING_ATTENTIONS:
        return None
    return f"{kind} attention runs under Ulysses (heads split), not Ring, whose blocks go through its own kernel"


QUANTIZATIONS = ("fp8",)  # what --quantization takes (None: the model's dtype throughout)

# Bounds that keep one request from exhausting the machine; generous for real use.
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_FRAMES = 1025
MAX_FPS = 240
MAX_INPUT_IMAGES = 16


class ConfigError(FieldError):
    """A setting is invalid: `field` names the setting and `message` says what is allowed."""


def check_attention_backend_name(value, field: str) -> None:
    """An attention backend: one of ATTENTION_BACKENDS, a sparse one optionally with its argument
    (`sliding-tile:3,3,5`, `sla:0.15`, `vsa:0.9`)."""
    if not isinstance(value, str):
        raise ConfigError(field, f"must be a backend name, got {value!r}")
    kind, colon, arg = value.partition(":")
    if kind not in ATTENTION_BACKENDS:
        raise ConfigError(field, f"{value!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if not colon:
        return
    if kind not in SPARSE_ATTENTION_ARGUMENTS:
        raise ConfigError(field, f"{kind} takes no argument after ':'")
    ok = False
    if kind == "sliding-tile":
        parts = arg.split(",")
        ok = len(parts) == 3 and all(p.isdigit() and int(p) % 2 == 1 and int(p) <= 99 for p in parts)
    elif kind in ("sla", "sla-fp8", "vsa"):
        try:
            ok = 0 < float(arg) <= 1 if kind != "vsa" else 0 <= float(arg) < 1
        except ValueError:
            ok = False
    if not ok:
        raise ConfigError(field, f"{value!r}: {kind} takes {SPARSE_ATTENTION_ARGUMENTS[kind]} after ':'")


@dataclass
class CacheDiTSettings:
    """The cache-dit library's DBCache (and TaylorSeer) for the diffusers backend (accel/cache_dit.py). `None`: the
    library's own default. `config_file` is a cache-dit YAML file (its `cache_config` section); a setting given here
    as well overrides the file's."""

    config_file: str | None = None
    fn_compute_blocks: int | None = None  # first blocks always computed (DBCache's Fn)
    bn_compute_blocks: int | None = None  # last blocks always computed (Bn)
    residual_diff_threshold: float | None = None  # a step is cached while the first blocks' residual moves less
    max_warmup_steps: int | None = None  # steps always computed at the start
    max_cached_steps: int | None = None  # at most this many cached steps (-1: no limit)
    max_continuous_cached_steps: int | None = None  # at most this many cached steps in a row (-1: no limit)
    taylorseer: bool = False  # TaylorSeer: cached steps extrapolate the blocks' output instead of reusing it
    taylorseer_order: int | None = None

    @staticmethod
    def flag_field(name: str) -> str:
        """The engine flag's field of a setting (`cache_dit_fn` for fn_compute_blocks, ...)."""
        short = {"fn_compute_blocks": "fn", "bn_compute_blocks": "bn", "config_file": "config"}
        return "cache_dit_" + short.get(name, name)

    def validate(self) -> None:
        import os

        if self.config_file is not None and not os.path.isfile(self.config_file):
            raise ConfigError("cache_dit_config", f"{self.config_file!r} is not a file")
        for name in ("fn_compute_blocks", "bn_compute_blocks", "max_warmup_steps", "taylorseer_order"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(self.flag_field(name), f"must be an integer >= 0, got {value!r}")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
                raise ConfigError(self.flag_field(name), f"must be an integer >= -1 (-1: no limit), got {value!r}")
        value = self.residual_diff_threshold
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0):
            raise ConfigError("cache_dit_residual_diff_threshold", f"must be a number >= 0, got {value!r}")

    def cache_config(self) -> dict:
        """The settings given here, under cache-dit's names (its `cache_config` section)."""
        names = {
            "fn_compute_blocks": "Fn_compute_blocks",
            "bn_compute_blocks": "Bn_compute_blocks",
            "residual_diff_threshold": "residual_diff_threshold",
            "max_warmup_steps": "max_warmup_steps",
            "max_cached_steps": "max_cached_steps",
            "max_continuous_cached_steps": "max_continuous_cached_steps",
            "taylorseer_order": "taylorseer_order",
        }
        config = {theirs: getattr(self, ours) for ours, theirs in names.items() if getattr(self, ours) is not None}
        if self.taylorseer:
            config["enable_taylorseer"] = True
        return config


def parse_dtype(value: str | torch.dtype | None, field_name: str = "dtype") -> torch.dtype | None:
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return getattr(torch, DTYPES[value.lower()])
    except KeyError:
        raise ConfigError(field_name, f"unknown dtype {value!r}; use one of float32, bfloat16, float16") from None


@dataclass
class EngineArgs:
    """How a model is loaded and run. `None` means: pick what suits the device."""

    model: str | None = None  # folder in diffusers layout, or a preset name; None = the built-in default
    # "native": our family's pipeline and DiT; "diffusers": diffusers runs the model (any diffusers pipeline folder);
    # "auto": native where a family serves the folder's pipeline class, diffusers otherwise.
    backend: str = "auto"
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None = cuda if available
    dtype: str | torch.dtype | None = None  # None = bfloat16 on cuda, float32 on cpu
    load_format: str = "auto"  # "auto": weights from the folder; "dummy": real architecture, random weights
    attention_backend: str = "auto"
    compile: bool = False  # torch.compile each repeated DiT block (first request pays the compile time)
    # Decode large images in overlapping tiles (diffusers' vae.enable_tiling(): less memory, and the tiles are
    # shared out over the ranks when there are several); off by default, as in diffusers.
    vae_tiling: bool = False
    vae_slicing: bool = False  # decode a batch's images one at a time (diffusers' vae.enable_slicing())
    cache_dit: CacheDiTSettings | dict | None = None  # the cache-dit library (diffusers backend); None: off
    cuda_graphs: bool = True  # replay the DiT forward as a CUDA graph per input shape (CUDA only; see accel/cuda_graph)
    # NVTX ranges per stage, step and block for Nsight Systems (utils/profiling.py); CUDA builds only.
    nvtx: bool = False
    # "fp8": the DiT blocks' linears in float8 e4m3 with per-channel scales, activations per token (accel/fp8.py).
    quantization: str | None = None
    seed_for_dummy_weights: int = 0
    # Several GPUs (on the CPU: several processes); num_gpus = ulysses · ring · (2 if cfg_parallel) · tp_size.
    num_gpus: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel: bool = False
    tp_size: int = 1
    # How tensor-parallel partial sums are added: "nccl" or "two-shot" (see parallel/reduce.py).
    tp_all_reduce: str = "nccl"
    # How Ulysses's all-to-alls move: "auto", "nccl" or "copy-engine" (see parallel/exchange.py).
    ulysses_exchange: str = "auto"
    # Several machines: each runs the same command with its node rank; rank 0's address is the rendezvous.
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of node 0
    # DiT caching for requests that name none (a CacheConfig, its dict, or a method name; None: off).
    cache: CacheConfig | dict | str | None = None
    # Memory (accel/offload.py, accel/memory_plan.py). Layerwise DiT offload: the DiT's blocks in pinned host memory,
    # each copied to the device ahead of its turn, `offload_prefetch_size` blocks ahead (None: the model's choice).
    # None: on for video models that would not fit the device with room for activations, off otherwise. (The
    # diffusers backend: diffusers' group offload, one block at a time, prefetched on a side stream on CUDA.)
    dit_layerwise_offload: bool | None = None
    offload_prefetch_size: int | None = None
    # Components kept in host memory, on the device only while they run.
    text_encoder_cpu_offload: bool = False
    image_encoder_cpu_offload: bool = False
    vae_cpu_offload: bool = False
    pin_cpu_memory: bool = True  # host copies of offloaded components in pinned memory (faster, asynchronous copies)
    # A device memory budget in GiB: the cheapest combination of the offloads above that fits is chosen (refused,
    # naming the budget, when none does).
    max_gpu_memory: float | None = None

    def __post_init__(self) -> None:
        import torch

        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        if isinstance(self.cache_dit, dict):
            try:
                self.cache_dit = CacheDiTSettings(**self.cache_dit)
            except TypeError as e:
                raise ConfigError("cache_dit", f"unknown setting ({e})") from None
        if self.cache_dit is not None:
            self.cache_dit.validate()
        self.cache = CacheConfig.coerce(self.cache)

        self._check_memory_settings()
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError("load_format", f"{self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
        check_attention_backend_name(self.attention_backend, "attention_backend")
        refusal = ring_refusal(self.attention_backend) if self.ring_degree > 1 else None
        if refusal is not None:
            raise ConfigError("attention_backend", f"{refusal}: use --ring-degree 1")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                "quantization", f"{self.quantization!r} is not one of {', '.join(QUANTIZATIONS)} (or none)"
            )
        self.dtype = parse_dtype(self.dtype)
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError("device", f"cannot parse device {self.device!r}; use cpu or cuda[:N]") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("device", "cuda was asked for but no CUDA device is available")
            if dev.type not in ("cpu", "cuda"):
                raise ConfigError("device", f"unsupported device type {dev.type!r}; use cpu or cuda")
        from ditserve.parallel.groups import ParallelConfigError

        try:
            self.parallel_config().validate()
        except ParallelConfigError as e:
            raise ConfigError(e.field, e.message) from None
        if self.tp_all_reduce == "two-shot" and self.resolved_device().type != "cuda":
            raise ConfigError("tp_all_reduce", f"{self.tp_all_reduce} goes through GPU memory: it needs CUDA GPUs")
        if self.ulysses_exchange == "copy-engine" and self.resolved_device().type != "cuda":
            raise ConfigError("ulysses_exchange", "copy-engine goes through GPU memory: it needs CUDA GPUs")
        if self.ulysses_exchange == "copy-engine" and self.nnodes > 1:
            raise ConfigError("ulysses_exchange", "copy-engine maps the peers' memory: it needs every rank on one node")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError("node_rank", f"must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.num_gpus % self.nnodes:
            raise ConfigError("nnodes", f"{self.num_gpus} ranks cannot be spread evenly over {self.nnodes} nodes")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("dist_init_addr", "several nodes need the host:port of node 0")
        if self.num_gpus > 1 and self.resolved_device().type == "cuda":
            local = self.num_gpus // self.nnodes
            if local > torch.cuda.device_count():
                raise ConfigError("num_gpus", f"{local} ranks per node but {torch.cuda.device_count()} CUDA devices")

    def _check_memory_settings(self) -> None:
        for name in ("text_encoder_cpu_offload", "image_encoder_cpu_offload", "vae_cpu_offload", "pin_cpu_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.dit_layerwise_offload is not None and not isinstance(self.dit_layerwise_offload, bool):
            raise ConfigError(
                "dit_layerwise_offload", f"must be true, false or null, got {self.dit_layerwise_offload!r}"
            )
        n = self.offload_prefetch_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64):
            raise ConfigError("offload_prefetch_size", f"must be a number of blocks from 1 to 64, got {n!r}")
        budget = self.max_gpu_memory
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget < 1e5
        ):
            raise ConfigError("max_gpu_memory", f"must be a positive number of GiB, got {budget!r}")

    def parallel_config(self):
        from ditserve.parallel.groups import ParallelConfig

        return ParallelConfig(
            num_gpus=self.num_gpus,
            ulysses_degree=self.ulysses_degree,
            ring_degree=self.ring_degree,
            cfg_parallel=self.cfg_parallel,
            tp_size=self.tp_size,
            tp_all_reduce=self.tp_all_reduce,
            ulysses_exchange=self.ulysses_exchange,
        )

    def to_dict(self) -> dict:
        """Plain data (dtype as its name), for sending to other processes."""
        import torch

        data = dataclasses.asdict(self)
        if isinstance(self.dtype, torch.dtype):
            data["dtype"] = str(self.dtype).replace("torch.", "")
        return data

    def resolved_device(self) -> torch.device:
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype is not None:
            return self.dtype  # type: ignore[return-value]
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32


@dataclass
class SamplingParams:
    """What one request asks for. `None` means the model's default (the diffusers pipeline's default)."""

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None
    # Video families: frames and frame rate of the clip (image families refuse both).
    num_frames: int | None = None
    fps: int | None = None
    # Edit and image-to-video families: input images (PIL images, H×W×3 uint8 arrays, or file paths).
    images: list | None = None
    # Settings of the model family's own, beyond the fields above (ModelSpec.sampling_options names them with their
    # defaults; any other name is refused). Plain JSON values, so they travel to the worker.
    options: dict | None = None
    num_images: int = 1
    max_sequence_length: int | None = None
    output_type: str = "pil"
    # Models with two experts (one for the noisy steps, one for the rest): the second's CFG scale; None: guidance_scale.
    guidance_scale_2: float | None = None
    # A named way of sampling of the model's family (ModelSpec.sampling_presets): it fills the fields left unset.
    sampling_preset: str | None = None
    # DiT caching (accel/cache_config.py): a CacheConfig or its dict; None: the engine's default; method "none": off.
    cache: CacheConfig | dict | None = None
    # The attention backend of this request (ATTENTION_BACKENDS, sparse ones with their argument); None: the engine's.
    attention: str | None = None

    def validate(self, spatial_multiple: int = 16, max_sequence_length_limit: int | None = None) -> None:
        """Check every field. `spatial_multiple` is what height and width must divide by for this model."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompt", "must be a string or a non-empty list of strings")
        if self.negative_prompt is not None:
            negs = [self.negative_prompt] if isinstance(self.negative_prompt, str) else self.negative_prompt
            if not isinstance(negs, list) or not all(isinstance(p, str) for p in negs):
                raise ConfigError("negative_prompt", "must be a string or a list of strings")
            if len(negs) not in (1, len(prompts)):
                raise ConfigError("negative_prompt", f"has {len(negs)} entries for {len(prompts)} prompts")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(name, f"must be an integer, got {value!r}")
            if not spatial_multiple <= value <= MAX_SIDE:
                raise ConfigError(name, f"must be between {spatial_multiple} and {MAX_SIDE}, got {value}")
            if value % spatial_multiple:
                raise ConfigError(name, f"must be a multiple of {spatial_multiple}, got {value}")
        steps = self.num_inference_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
            raise ConfigError("num_inference_steps", f"must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        for name in ("guidance_scale", "guidance_scale_2", "true_cfg_scale"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) > 1e4:
                raise ConfigError(name, f"must be a finite number, got {value!r}")
        if self.true_cfg_scale is not None and self.true_cfg_scale < 0:
            raise ConfigError("true_cfg_scale", f"must be >= 0, got {self.true_cfg_scale}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise ConfigError("seed", f"must be an integer from 0 to 2**63-1, got {self.seed!r}")
        for name, limit in (("num_frames", MAX_FRAMES), ("fps", MAX_FPS)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
                raise ConfigError(name, f"must be an integer from 1 to {limit}, got {value!r}")
        if self.images is not None:
            if not isinstance(self.images, list) or len(self.images) > MAX_INPUT_IMAGES:
                raise ConfigError("images", f"must be a list of at most {MAX_INPUT_IMAGES} images")
            for image in self.images:
                if not _is_image_like(image):
                    raise ConfigError("images", f"{type(image).__name__} is not an image (PIL image, array or path)")
        if self.options is not None:
            if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
                raise ConfigError("options", "must be an object of setting names to values")
            for name, value in self.options.items():
                if value is not None and not isinstance(value, bool | int | float | str):
                    raise ConfigError(
                        f"options.{name}", f"must be a number, a string, true/false or null, got {value!r}"
                    )
        if self.attention is not None:
            check_attention_backend_name(self.attention, "attention")
        if self.sampling_preset is not None and not isinstance(self.sampling_preset, str):
            raise ConfigError("sampling_preset", f"must be a preset's name, got {self.sampling_preset!r}")
        n = self.num_images
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            raise ConfigError("num_images", f"must be an integer from 1 to {MAX_IMAGES}, got {n!r}")
        msl = self.max_sequence_length
        if msl is not None:
            limit = max_sequence_length_limit or 512
            if isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= limit:
                raise ConfigError("max_sequence_length", f"must be an integer from 1 to {limit}, got {msl!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise ConfigError("output_type", f"{self.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if self.cache is not None:
            if not isinstance(self.cache, CacheConfig | dict):
                raise ConfigError("cache", f"must be an object of cache settings, got {type(self.cache).__name__}")
            try:
                CacheConfig.coerce(self.cache)
            except CacheConfigError as e:
                raise ConfigError(e.field, e.message) from None

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def with_defaults(self, defaults: SamplingParams) -> SamplingParams:
        """Every unset model-defaulted field (DEFAULTED_FIELDS) taken from `defaults`; a 0 max_sequence_length
        counts as unset too."""
        filled = {name: getattr(defaults, name) for name in DEFAULTED_FIELDS if getattr(self, name) is None}
        if not self.max_sequence_length:
            filled["max_sequence_length"] = defaults.max_sequence_length
        return self.replace(**filled)

    def computation_key(self) -> tuple:
        """What shapes the computation of resolved params: requests with equal keys can run as one batch (prompts,
        seeds and image counts may differ)."""
        uses_negative = self.negative_prompt is not None and (self.true_cfg_scale or 0) > 1
        return (
            self.num_frames,
            self.height,
            self.width,
            self.num_inference_steps,
            self.guidance_scale,
            self.guidance_scale_2,
            self.true_cfg_scale,
            self.max_sequence_length,
            uses_negative,
            CacheConfig.coerce(self.cache).key() if self.cache is not None else None,
            self.attention,
        )


def _is_image_like(value) -> bool:
    import os

    if isinstance(value, str | os.PathLike):
        return True
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy array or tensor
        return len(value.shape) == 3
    return type(value).__module__.startswith("PIL.")


# The sampling settings a model has defaults for (its pipeline's, or its folder's ditserve.json).
DEFAULTED_FIELDS = (
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_2",
    "true_cfg_scale",
    "negative_prompt",
    "max_sequence_length",
    "num_frames",
    "fps",
)
