"""What the loader node reads: a single-file FLUX.1 checkpoint (BFL/ComfyUI names, bf16 or FP8) or a diffusers
folder, into our FluxTransformer, plus the facts the ComfyUI model needs (latent channels, sampling shift).

No ComfyUI import here: the same code loads for the tests and for other front ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ditserve.accel.fp8 import ScaledFP8, check_fp8_scales, prepare_fp8_dit
from ditserve.errors import LoaderError
from ditserve.kernels.fp8_quant import FP8
from ditserve.loader.weights import build_on_meta, checkpoint_files, iter_checkpoint, load_checkpoint, materialize
from ditserve.models.flux import (
    BFL_PREFIXES,
    FluxConfig,
    FluxTransformer,
    bfl_to_diffusers,
    config_from_bfl_shapes,
    is_bfl_flux,
    map_diffusers_key,
)

from .errors import NodeInputError

# diffusers' FLUX.1 VAE latents: ComfyUI's Flux latent format has these factors.
FLUX_LATENT_CHANNELS = 16
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159
# FP8 files in ComfyUI's "scaled" layout carry a per-tensor scale beside each weight and a marker tensor.
_FP8_SCALE_SUFFIX = ".scale_weight"
_IGNORED_SUFFIXES = (".scale_input", "scaled_fp8")


@dataclass
class LoadedDiT:
    """Our DiT and what ComfyUI's MODEL around it needs to know."""

    model: FluxTransformer
    source: str
    latent_channels: int
    # Sampling: a guidance-distilled FLUX.1 (dev) samples with ComfyUI's FLUX shift; otherwise a static shift.
    guidance_distilled: bool
    static_shift: float | None
    vae_scale: float = FLUX_SCALE
    vae_shift: float = FLUX_SHIFT
    vae_downscale: int = 8


def load_dit(path: str, device: torch.device, dtype: torch.dtype, fp8: bool = False) -> LoadedDiT:
    """Our FLUX.1 DiT from a single .safetensors file or a diffusers folder (its transformer/). `fp8`: the blocks'
    linears in FP8 (accel/fp8.py), an FP8 file's weights kept byte for byte with its scales, others quantised as
    they load; everything else in `dtype`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NodeInputError("model", f"{path!r} does not exist")
    if fp8:
        from ditserve.accel.fp8 import FP8Unsupported, check_fp8_device

        try:
            check_fp8_device(device)
        except FP8Unsupported as e:
            raise NodeInputError("weight_dtype", str(e)) from None
    try:
        if p.is_dir():
            return _load_folder(p, device, dtype, fp8)
        if p.suffix not in (".safetensors", ".sft"):
            raise NodeInputError("model", f"{p.name}: only .safetensors files and diffusers folders can be loaded")
        return _load_single_file(p, device, dtype, fp8)
    except LoaderError as e:
        raise NodeInputError("model", str(e)) from None


def _shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    """Names (prefix stripped) → shapes, read from the header only; and the prefix that was stripped."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (OSError, RuntimeError, ValueError) as e:
        raise NodeInputError("model", f"{path.name}: not a readable safetensors file ({e})") from None
    for prefix in ("", *BFL_PREFIXES):
        stripped = {n[len(prefix) :]: s for n, s in raw.items() if n.startswith(prefix)}
        if is_bfl_flux(set(stripped)):
            return stripped, prefix
    raise NodeInputError("model", f"{path.name}: {_describe_architecture(set(raw))}")


def _describe_architecture(names: set[str]) -> str:
    """Why a file is not FLUX.1, as far as its names tell."""
    if any("double_stream_modulation_img" in n for n in names):
        return "this is a FLUX.2 checkpoint; the ditserve loader reads FLUX.1 single files so far"
    if any("distilled_guidance_layer" in n for n in names):
        return "this is a Chroma checkpoint, which ditserve does not support"
    if any(n.startswith("transformer_blocks.") for n in names):
        return "diffusers-named weights: give the diffusers folder (with model_index.json), not the single file"
    return "not a FLUX.1 diffusion model (no double_blocks / img_in weights); supported: FLUX.1 dev/schnell"


def _bfl_tensors(path: Path, prefix: str) -> Iterator[tuple[str, torch.Tensor | ScaledFP8]]:
    """The file's tensors under diffusers' names; FP8 weights in the blocks as `ScaledFP8` (kept as they are where
    the layer is FP8), the others' scaled back to real values."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = set(f.keys())  # noqa: SIM118
        for name in sorted(names):
            if not name.startswith(prefix):
                continue
            short = name[len(prefix) :]
            if short.endswith(_FP8_SCALE_SUFFIX) or short.endswith(_IGNORED_SUFFIXES):
                continue
            tensor = f.get_tensor(name)
            scale_name = name.rsplit(".", 1)[0] + _FP8_SCALE_SUFFIX
            scale = f.get_tensor(scale_name).float() if scale_name in names else torch.ones(())
            if tensor.dtype == FP8 and short.startswith(("double_blocks.", "single_blocks.")):
                converted = bfl_to_diffusers(short, tensor)
                if converted is not None:  # the same cuts of the bytes, each with its scale
                    yield from ((n, ScaledFP8(part, scale)) for n, part in converted)
                    continue
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                tensor = tensor.float() * scale
            converted = bfl_to_diffusers(short, tensor)
            if converted is None:
                yield short, tensor  # reported by load_checkpoint as unexpected, with the others
            else:
                yield from converted


def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype, fp8: bool = False) -> LoadedDiT:
    shapes, prefix = _shapes(path)
    return _from_bfl(shapes, _bfl_tensors(path, prefix), str(path), device, dtype, fp8)


def load_dit_from_state_dict(
    state_dict: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> LoadedDiT:
    """Our DiT from a BFL-named state dict already in memory (a benchmark's dummy weights, shared with ComfyUI)."""
    shapes = {n: tuple(t.shape) for n, t in state_dict.items()}
    if not is_bfl_flux(set(shapes)):
        raise NodeInputError("model", _describe_architecture(set(shapes)))
    tensors = (pair for n, t in state_dict.items() for pair in (bfl_to_diffusers(n, t) or [(n, t)]))
    return _from_bfl(shapes, tensors, "state dict", device, dtype)


def _from_bfl(shapes, tensors, where: str, device: torch.device, dtype: torch.dtype, fp8: bool = False) -> LoadedDiT:
    try:
        config = config_from_bfl_shapes(shapes)
    except (KeyError, ValueError) as e:
        raise NodeInputError("model", f"{where}: {e}") from None
    model = _build(config, device, dtype, fp8)
    load_checkpoint(model, tensors, map_diffusers_key, where=where)
    if fp8:
        check_fp8_scales(model)
    return LoadedDiT(
        model=model.eval(),
        source=where,
        latent_channels=config.in_channels // 4,
        guidance_distilled=config.guidance_embeds,
        static_shift=None if config.guidance_embeds else 1.0,  # schnell: no shift, as ComfyUI samples it
    )


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype, fp8: bool = False) -> LoadedDiT:
    index = _read_json(folder / "model_index.json", "a diffusers folder with model_index.json")
    if index.get("_class_name") != "FluxPipeline":
        raise NodeInputError(
            "model",
            f"{folder.name}: pipeline {index.get('_class_name')!r}; the ditserve loader node supports FluxPipeline "
            "(FLUX.1) folders so far",
        )
    config = FluxConfig.from_dict(_read_json(folder / "transformer" / "config.json", "transformer/config.json"))
    model = _build(config, device, dtype, fp8)
    files = checkpoint_files(folder / "transformer")
    load_checkpoint(model, iter_checkpoint(files), map_diffusers_key, where=str(folder / "transformer"))
    if fp8:
        check_fp8_scales(model)
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler/scheduler_config.json")
    vae = _read_json(folder / "vae" / "config.json", "vae/config.json")
    dynamic = bool(scheduler.get("use_dynamic_shifting", False))
    return LoadedDiT(
        model=model.eval(),
        source=str(folder),
        latent_channels=config.in_channels // 4,
        guidance_distilled=config.guidance_embeds or dynamic,
        static_shift=None if dynamic else float(scheduler.get("shift", 1.0)),
        vae_scale=float(vae.get("scaling_factor", FLUX_SCALE)),
        vae_shift=float(vae.get("shift_factor") or 0.0),
        vae_downscale=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
    )


def _build(config: FluxConfig, device: torch.device, dtype: torch.dtype, fp8: bool = False) -> FluxTransformer:
    model = materialize(build_on_meta(lambda: FluxTransformer(config), dtype), device)
    if fp8:
        prepare_fp8_dit(model)
    return model


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NodeInputError("model", f"{path.parent}: no {path.name} (expected {what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise NodeInputError("model", f"{path}: unreadable ({e})") from None
