"""Integrated mode: nodes that put ditserve's DiT inside an unchanged ComfyUI workflow.

- "ditserve Diffusion Model Loader" takes the place of ComfyUI's "Load Diffusion Model" (UNETLoader): the same inputs
  (`unet_name` from models/diffusion_models, `weight_dtype`), a MODEL whose denoiser is ours.
- "ditserve Diffusers Folder Loader": MODEL, CLIP and VAE from one diffusers FLUX.1 folder.
- "ditserve Options": attention backend, regional torch.compile, CUDA graphs, for either loader.
- "ditserve LoRA": applies a LoRA through ditserve's LoRA manager; chain several for several at once.
"""

from __future__ import annotations

import torch

from ditserve.config import ATTENTION_BACKENDS
from ditserve.lora.canonical import LoRAError

from .checkpoint import load_dit
from .errors import NodeInputError
from .model import LORA_OPTION, DiTHandle, comfy_model

OPTIONS_TYPE = "DITSERVE_OPTIONS"
DTYPES = {"default": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# ComfyUI's name for FP8 weights: ours are the blocks' linears in e4m3 with FP8 products (accel/fp8.py), an FP8
# file's bytes kept as they are; the rest in the device's default dtype.
FP8_WEIGHTS = "fp8_e4m3fn"


def _folder_paths():
    """ComfyUI's folder registry: a top-level module in ComfyUI's own tree, under comfy.cmd in its pip package."""
    try:
        import folder_paths
    except ImportError:
        from comfy.cmd import folder_paths
    return folder_paths


def _device_and_dtype(weight_dtype: str) -> tuple[torch.device, torch.dtype]:
    import comfy.model_management as mm

    if weight_dtype not in (*DTYPES, FP8_WEIGHTS):
        raise NodeInputError("weight_dtype", f"{weight_dtype!r} is not one of {', '.join([*DTYPES, FP8_WEIGHTS])}")
    device = mm.get_torch_device()
    dtype = DTYPES.get(weight_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _apply_options(handle: DiTHandle, options: dict | None) -> None:
    from ditserve.accel.compile import compile_repeated_blocks
    from ditserve.accel.cuda_graph import enable_cuda_graphs
    from ditserve.layers.attention import set_attention_backend

    options = options or {}
    set_attention_backend(handle.model, options.get("attention_backend", "auto"), handle.device)
    if options.get("compile"):
        compile_repeated_blocks(handle.model)
    if options.get("cuda_graphs"):
        if handle.device.type != "cuda":
            raise NodeInputError("cuda_graphs", f"CUDA graphs need a CUDA device; ComfyUI runs on {handle.device}")
        handle.cuda_graphs = enable_cuda_graphs(handle.model, handle.device)


def _model(path: str, weight_dtype: str, options: dict | None):
    device, dtype = _device_and_dtype(weight_dtype)
    handle = DiTHandle(load_dit(path, device, dtype, fp8=weight_dtype == FP8_WEIGHTS))
    _apply_options(handle, options)
    return comfy_model(handle)


class DitserveDiffusionModelLoader:
    """Drop-in for "Load Diffusion Model": FLUX.1 single files (BFL/ComfyUI names, bf16/fp16/FP8) from
    models/diffusion_models."""

    CATEGORY = "ditserve"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (_folder_paths().get_filename_list("diffusion_models"),),
                "weight_dtype": ([*DTYPES, FP8_WEIGHTS],),
            },
            "optional": {"options": (OPTIONS_TYPE,)},
        }

    def load(self, unet_name: str, weight_dtype: str, options: dict | None = None):
        path = _folder_paths().get_full_path("diffusion_models", unet_name)
        if path is None:
            raise NodeInputError("unet_name", f"{unet_name!r} is not in models/diffusion_models")
        return (_model(path, weight_dtype, options),)


class DitserveFolderLoader:
    """MODEL (our DiT), CLIP and VAE from a diffusers FLUX.1 folder (with model_index.json), or "digits" for the
    built-in digits model."""

    CATEGORY = "ditserve"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "digits"}),
                "weight_dtype": ([*DTYPES, FP8_WEIGHTS],),
            },
            "optional": {"options": (OPTIONS_TYPE,)},
        }

    def load(self, folder: str, weight_dtype: str, options: dict | None = None):
        from .folder_parts import folder_clip, folder_vae

        path = _resolve_folder(folder)
        return (_model(path, weight_dtype, options), folder_clip(path), folder_vae(path))


def _resolve_folder(folder: str) -> str:
    """A folder path, or a built-in model's name ("digits")."""
    from ditserve.errors import LoaderError
    from ditserve.loader.folder import resolve_model

    if not folder.strip():
        raise NodeInputError("folder", "empty: give a diffusers folder's path or 'digits'")
    try:
        source = resolve_model(folder.strip())
    except LoaderError as e:
        raise NodeInputError("folder", str(e)) from None
    if source.folder is None:
        raise NodeInputError("folder", f"{folder!r} is a preset without weights; give a downloaded folder")
    return str(source.folder)


class DitserveOptions:
    """Speed options for a ditserve loader."""

    CATEGORY = "ditserve"
    RETURN_TYPES = (OPTIONS_TYPE,)
    FUNCTION = "options"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attention_backend": (list(ATTENTION_BACKENDS),),
                "compile": ("BOOLEAN", {"default": False}),
                "cuda_graphs": ("BOOLEAN", {"default": False}),
            }
        }

    def options(self, attention_backend: str, compile: bool, cuda_graphs: bool):
        if attention_backend not in ATTENTION_BACKENDS:
            raise NodeInputError("attention_backend", f"{attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        if attention_backend == "sage":  # an optional package: refused here, with its install command
            from ditserve.layers.sage_attention import SageUnavailable, load_sageattn

            try:
                load_sageattn()
            except SageUnavailable as e:
                raise NodeInputError("attention_backend", str(e)) from None
        return ({"attention_backend": attention_backend, "compile": bool(compile), "cuda_graphs": bool(cuda_graphs)},)


class DitserveLoRA:
    """A LoRA (any format ditserve reads: diffusers/PEFT, kohya, BFL, XLabs, ...) on a ditserve MODEL, through
    ditserve's LoRA manager. The base weights are never patched: the adapter runs beside them. Chain nodes to stack
    LoRAs; each MODEL output keeps its own set."""

    CATEGORY = "ditserve"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (_folder_paths().get_filename_list("loras"),),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    def apply(self, model, lora_name: str, strength: float):
        path = _folder_paths().get_full_path("loras", lora_name)
        if path is None:
            raise NodeInputError("lora_name", f"{lora_name!r} is not in models/loras")
        return (with_lora(model, path, strength),)


def with_lora(model, path: str, strength: float, nickname: str | None = None):
    """A clone of a ditserve MODEL with one more LoRA in its set (checked now: a bad file fails at this node)."""
    from .model import DitserveFluxDenoiser

    denoiser = getattr(model.model, "diffusion_model", None)
    if not isinstance(denoiser, DitserveFluxDenoiser):
        raise NodeInputError(
            "model", "not a ditserve model: connect a ditserve loader (ComfyUI's own MODEL takes ComfyUI's LoRA loader)"
        )
    current = tuple(model.model_options.get("transformer_options", {}).get(LORA_OPTION, ()))
    nickname = nickname or f"{len(current)}:{path.rsplit('/', 1)[-1]}"[:64]
    nickname = "".join(c if c.isalnum() or c in "._+-()[] " else "_" for c in nickname)
    handle = denoiser.handle
    try:  # load (and convert) now, so a file that is not a LoRA of this model fails here, naming the input
        handle.use_loras((*current, (nickname, path, float(strength))))
    except LoRAError as e:
        raise NodeInputError("lora_name", str(e)) from None
    clone = model.clone()
    # A new dict: the clone's options may share their inner dicts with the original's.
    options = dict(clone.model_options.get("transformer_options", {}))
    options[LORA_OPTION] = (*current, (nickname, path, float(strength)))
    clone.model_options["transformer_options"] = options
    return clone


NODE_CLASS_MAPPINGS = {
    "DitserveDiffusionModelLoader": DitserveDiffusionModelLoader,
    "DitserveFolderLoader": DitserveFolderLoader,
    "DitserveOptions": DitserveOptions,
    "DitserveLoRA": DitserveLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DitserveDiffusionModelLoader": "ditserve Diffusion Model Loader",
    "DitserveFolderLoader": "ditserve Diffusers Folder Loader",
    "DitserveOptions": "ditserve Options",
    "DitserveLoRA": "ditserve LoRA",
}
