"""What the `ditserve` commands share: the usage error and its parser, the engine and LoRA flags and their
conversion to engine arguments, and quieting the libraries' own output.

A leaf module: it imports none of the modules that make up the commands (`ditserve.cli`, the server's commands,
bench, the worker), so each of them imports it without importing the others back.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

from ditserve.accel.cache_config import METHODS, CacheConfig, CacheConfigError
from ditserve.config import ATTENTION_BACKENDS, BACKENDS, LOAD_FORMATS, QUANTIZATIONS


class UsageError(Exception):
    """A user error; the message is shown as is."""


class CliParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def field_to_flag(field: str) -> str:
    """The CLI flag of a request field, as errors name it: `options.flow_shift` is `--option flow_shift=...`."""
    if field == "cache" or field.startswith(("cache.", "cache_config")):
        return cache_flag(field)
    if field.startswith("options."):
        return f"--option {field.split('.', 1)[1]}"
    if field == "options":
        return "--option"
    if field == "images":
        return "--image"
    return "--" + field.replace("_", "-")


def quiet_libraries() -> None:
    """Keep the terminal to our progress bar and summary: the libraries' own bars and notices are noise here."""
    warnings.filterwarnings("ignore")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


# ---- engine flags: each named after its EngineArgs field --------------------------------------------------------
def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="diffusers model folder, preset name, or built-in: digits (the default), digits-video, tiny-flux",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="native: our DiT for the folder's family; diffusers: diffusers runs the pipeline (any diffusers folder); "
        "auto (default): native where a family serves the folder, diffusers otherwise",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS, help="dummy = random weights, real sizes")
    p.add_argument(
        "--attention-backend",
        default="auto",
        metavar="BACKEND",
        help=f"{', '.join(ATTENTION_BACKENDS)}; sparse ones (video models) optionally with an argument: "
        "sliding-tile:T,H,W (window in tiles), sla:RATIO (checkpoints fine-tuned with SLA), vsa:SPARSITY "
        "(checkpoints trained with VSA, e.g. FastWan). Default: auto",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (slow first request)")
    p.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="fp8: the DiT blocks' linears in float8 e4m3 (per-channel weight scales, per-token activations; "
        "needs FP8 tensor cores: Ada, Hopper or newer)",
    )
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode large images in overlapping tiles (as diffusers' enable_tiling); spread over the GPUs",
    )
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch's images one at a time (less memory)")
    cache = p.add_argument_group("the cache-dit library (diffusers backend; pip install cache-dit)")
    cache.add_argument("--cache-dit", action="store_true", help="cache steps with cache-dit's DBCache")
    cache.add_argument("--cache-dit-config", default=None, metavar="YAML", help="cache-dit's cache_config file")
    cache.add_argument("--cache-dit-fn", type=int, default=None, help="first blocks always computed (Fn)")
    cache.add_argument("--cache-dit-bn", type=int, default=None, help="last blocks always computed (Bn)")
    cache.add_argument(
        "--cache-dit-residual-diff-threshold", type=float, default=None, help="cache while the residual moves less"
    )
    cache.add_argument("--cache-dit-max-warmup-steps", type=int, default=None, help="steps always computed first")
    cache.add_argument("--cache-dit-max-cached-steps", type=int, default=None, help="-1: no limit")
    cache.add_argument("--cache-dit-max-continuous-cached-steps", type=int, default=None, help="-1: no limit")
    cache.add_argument("--cache-dit-taylorseer", action="store_true", help="TaylorSeer for the cached steps")
    cache.add_argument("--cache-dit-taylorseer-order", type=int, default=None)
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay the DiT forward as a CUDA graph per image size (CUDA only; on by default)",
    )
    p.add_argument(
        "--nvtx",
        action="store_true",
        help="NVTX ranges per stage, denoising step and DiT block, for Nsight Systems (nsys profile ...; CUDA only)",
    )
    mem = p.add_argument_group("memory (docs/memory.md)")
    mem.add_argument(
        "--dit-layerwise-offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the DiT's blocks in host memory, each copied to the GPU ahead of its turn (default: on for video "
        "models that would not fit the GPU with room for activations; the diffusers backend: diffusers' group "
        "offload)",
    )
    mem.add_argument(
        "--offload-prefetch-size",
        type=int,
        default=None,
        metavar="N",
        help="blocks copied ahead under --dit-layerwise-offload (default: the model's choice)",
    )
    mem.add_argument("--text-encoder-cpu-offload", action="store_true", help="text encoders on the GPU only to run")
    mem.add_argument("--image-encoder-cpu-offload", action="store_true", help="image encoder on the GPU only to run")
    mem.add_argument("--vae-cpu-offload", action="store_true", help="VAE on the GPU only to encode or decode")
    mem.add_argument(
        "--pin-cpu-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offloaded components in pinned host memory (faster copies; on by default)",
    )
    mem.add_argument(
        "--max-gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="GPU memory budget: the cheapest combination of the offloads that fits is chosen (and printed)",
    )
    par = p.add_argument_group("several GPUs (on the CPU: processes); num-gpus = ulysses × ring × cfg × tp")
    par.add_argument("--num-gpus", type=int, default=1)
    par.add_argument("--ulysses-degree", type=int, default=1, help="sequence parallel: all-to-all over heads")
    par.add_argument("--ring-degree", type=int, default=1, help="sequence parallel: K/V passed around a ring")
    par.add_argument("--cfg-parallel", action="store_true", help="true-CFG branches on two halves of the ranks")
    par.add_argument("--tp-size", type=int, default=1, help="tensor parallel: linears sharded across ranks")
    par.add_argument(
        "--tp-all-reduce",
        default="nccl",
        help="how tensor-parallel partial sums are added: nccl (default) or two-shot (symmetric memory over NVLink; "
        "a little faster on 2 GPUs at 1024²)",
    )
    par.add_argument(
        "--ulysses-exchange",
        default="auto",
        help="how Ulysses's all-to-alls move: copy-engine (symmetric memory, copied by the GPUs' copy engines, "
        "leaving every SM to the work beside it; one node), nccl, or auto (default: copy-engine on one node's GPUs "
        "with CUDA graphs, also beside Ring, tensor or CFG parallelism; else nccl)",
    )
    par.add_argument("--nnodes", type=int, default=1)
    par.add_argument("--node-rank", type=int, default=0)
    par.add_argument("--dist-init-addr", default=None, help="host:port of node 0 (several nodes)")
    add_cache_flags(p)


# ---- DiT caching flags: --cache METHOD, --cache-<setting> for each CacheConfig setting, or --cache-config FILE ----
_CACHE_FLAG_TYPES = {
    "fn": int,
    "bn": int,
    "threshold": float,
    "max_warmup_steps": int,
    "max_cached_steps": int,
    "max_continuous_cached_steps": int,
    "taylorseer_order": int,
    "teacache_coefficients": str,  # comma-separated numbers
    "mask": str,
    "compute_steps": str,  # comma-separated step indices
}


def cache_flag(field: str) -> str:
    """The flag that sets a cache field ("cache.threshold" → --cache-threshold, "cache.method" → --cache)."""
    name = field.removeprefix("cache").lstrip(".")
    if field == "cache_config":
        return "--cache-config"
    return "--cache" if name in ("", "method") else "--cache-" + name.replace("_", "-")


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DiT caching (docs/caching.md): the default of every request; a request may name its own")
    g.add_argument("--cache", dest="cache_method", default=None, metavar="|".join(METHODS), help="caching method")
    g.add_argument("--cache-config", default=None, metavar="FILE", help="JSON object of cache settings")
    for name, kind in _CACHE_FLAG_TYPES.items():
        g.add_argument(cache_flag(f"cache.{name}"), dest=f"cache_{name}", default=None, type=kind, metavar="V")


def cache_config_from(ns: argparse.Namespace) -> CacheConfig:
    """The CacheConfig the cache flags describe (the file's settings, the flags over them); a bad setting is a usage
    error naming its flag."""
    try:
        values = CacheConfig.from_file(ns.cache_config).to_dict() if getattr(ns, "cache_config", None) else {}
        if getattr(ns, "cache_method", None) is not None:
            values["method"] = ns.cache_method
        for name in _CACHE_FLAG_TYPES:
            value = getattr(ns, f"cache_{name}", None)
            if value is None:
                continue
            if name in ("teacache_coefficients", "compute_steps"):
                kind = float if name == "teacache_coefficients" else int
                try:
                    value = tuple(kind(v) for v in value.split(","))
                except ValueError:
                    raise CacheConfigError(f"cache.{name}", f"must be comma-separated numbers, got {value!r}") from None
            values[name] = value
        if values and "method" not in values:
            raise CacheConfigError("cache.method", "name the method (--cache) for these cache settings")
        return CacheConfig.from_dict(values)
    except CacheConfigError as e:
        raise UsageError(f"ditserve: {cache_flag(e.field)}: {e.message}") from None


def engine_args_from(ns: argparse.Namespace):
    """The EngineArgs the parsed engine flags describe (validated); fields with no flag keep their default."""
    import dataclasses

    from ditserve.config import EngineArgs

    names = [f.name for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name) and f.name != "cache_dit"]
    values = {name: getattr(ns, name) for name in names}
    if hasattr(ns, "cache_method"):
        values["cache"] = cache_config_from(ns)
    cache_dit = cache_dit_settings(ns)
    if cache_dit is not None:
        values["cache_dit"] = cache_dit
    return EngineArgs(**values)


# --cache-dit-* flag → CacheDiTSettings field
CACHE_DIT_FLAGS = {
    "cache_dit_config": "config_file",
    "cache_dit_fn": "fn_compute_blocks",
    "cache_dit_bn": "bn_compute_blocks",
    "cache_dit_residual_diff_threshold": "residual_diff_threshold",
    "cache_dit_max_warmup_steps": "max_warmup_steps",
    "cache_dit_max_cached_steps": "max_cached_steps",
    "cache_dit_max_continuous_cached_steps": "max_continuous_cached_steps",
    "cache_dit_taylorseer": "taylorseer",
    "cache_dit_taylorseer_order": "taylorseer_order",
}


def cache_dit_settings(ns: argparse.Namespace):
    """--cache-dit and its settings as `CacheDiTSettings` (None without --cache-dit; a setting without it is an
    error naming the flag)."""
    from ditserve.config import CacheDiTSettings

    given = {flag: getattr(ns, flag) for flag in CACHE_DIT_FLAGS if getattr(ns, flag, None) not in (None, False)}
    if not getattr(ns, "cache_dit", False):
        if given:
            raise UsageError(f"ditserve: {field_to_flag(next(iter(given)))}: give --cache-dit too")
        return None
    return CacheDiTSettings(**{CACHE_DIT_FLAGS[flag]: value for flag, value in given.items()})


# ---- profiling flags (generate and bench; docs/profiling.md) -----------------------------------------------------
PROFILE_FLAGS = {"stages": "--profile-stages", "steps": "--profile-steps", "profile": "--profile"}


def add_profile_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("profiling (docs/profiling.md)")
    g.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="write torch.profiler traces (Chrome/Perfetto JSON, one per window) of the run to DIR",
    )
    g.add_argument(
        "--profile-stages",
        default=None,
        metavar="STAGES",
        help="which stages to trace, comma-separated: encode, prepare, denoise, decode (default: all)",
    )
    g.add_argument(
        "--profile-steps",
        default=None,
        metavar="START:STOP",
        help="trace only these denoising steps (0-based, STOP excluded: 2:4 is steps 2 and 3)",
    )
    g.add_argument(
        "--profile-record-shapes", action="store_true", help="record the operators' input shapes in the trace"
    )


def profile_request(ns: argparse.Namespace) -> dict | None:
    """The profiling flags as `Engine.start_profile` keyword arguments (checked before the model load); None without
    --profile. A bad value is a usage error naming its flag."""
    from ditserve.utils.profiling import ProfileConfig, ProfileConfigError

    stages, steps = getattr(ns, "profile_stages", None), getattr(ns, "profile_steps", None)
    if getattr(ns, "profile", None) is None:
        if stages is not None or steps is not None or getattr(ns, "profile_record_shapes", False):
            raise UsageError("ditserve: --profile-stages/--profile-steps/--profile-record-shapes: give --profile DIR")
        return None
    if Path(ns.profile).exists() and not Path(ns.profile).is_dir():
        raise UsageError(f"ditserve: --profile: {ns.profile!r} is a file, not a folder")
    settings = {"stages": stages, "steps": steps, "record_shapes": ns.profile_record_shapes}
    try:
        ProfileConfig.coerce(settings)
    except ProfileConfigError as e:
        raise UsageError(f"ditserve: {PROFILE_FLAGS.get(e.field, '--profile')}: {e.message}") from None
    return {"out_dir": ns.profile, **settings}


# ---- LoRA flags (generate and serve) ----------------------------------------------------------------------------
# LoRAError's fields → the flags that set them.
LORA_FLAGS = {"lora_path": "--lora-path", "lora_nickname": "--lora-nickname", "strength": "--lora-scale"}


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora-path",
        action="append",
        default=[],
        metavar="PATH",
        help="LoRA .safetensors file or PEFT folder (repeatable: several adapters at once)",
    )
    p.add_argument(
        "--lora-nickname",
        action="append",
        default=[],
        metavar="NAME",
        help="name for each --lora-path, in order (default: the file name without extension)",
    )
    p.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="strength of each LoRA, in order; one value applies to all (default 1.0)",
    )


def lora_request(ns: argparse.Namespace) -> dict | None:
    """The flags as `Engine.set_lora` keyword arguments, checked before the (slow) model load; None without LoRA."""
    paths, names, scales = list(ns.lora_path), list(ns.lora_nickname), list(ns.lora_scale)
    if not paths:
        if names or scales:
            raise UsageError("ditserve: --lora-nickname/--lora-scale: give --lora-path for each LoRA")
        return None
    for p in paths:
        if not Path(p).expanduser().exists():
            raise UsageError(f"ditserve: --lora-path: {p}: no such file or folder")
    if names and len(names) != len(paths):
        raise UsageError(f"ditserve: --lora-nickname: {len(names)} nicknames for {len(paths)} --lora-path values")
    if not names:
        names = [Path(p).name.removesuffix(".safetensors") for p in paths]
        if len(set(names)) != len(names):
            raise UsageError("ditserve: --lora-nickname: two LoRA files have the same name; give each a nickname")
    if len(scales) > 1 and len(scales) != len(paths):
        raise UsageError(f"ditserve: --lora-scale: {len(scales)} values for {len(paths)} --lora-path values")
    if any(not math.isfinite(s) for s in scales):
        raise UsageError("ditserve: --lora-scale: must be a finite number")
    strength = scales if len(scales) > 1 else (scales[0] if scales else 1.0)
    return {"lora_nickname": names, "lora_path": paths, "strength": strength}


def apply_lora_flags(engine, ns: argparse.Namespace) -> dict | None:
    """Load and activate the flags' LoRAs on `engine`; a LoRA problem becomes a one-line usage error naming the
    flag. Returns the engine's list_loras() state, or None when no LoRA was asked for."""
    from ditserve.lora import LoRAError

    request = lora_request(ns)
    if request is None:
        return None
    try:
        return engine.set_lora(**request)
    except LoRAError as e:
        flag = LORA_FLAGS.get(e.field, field_to_flag(e.field))
        raise UsageError(f"ditserve: {flag}: {e.message}") from None
