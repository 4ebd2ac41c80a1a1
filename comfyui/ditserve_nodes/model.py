"""Our DiT as ComfyUI's denoiser: the module ComfyUI's FLUX `BaseModel` calls, and the MODEL (ModelPatcher) around it.

ComfyUI's `model_base.Flux` takes the class of its diffusion model as an argument (`unet_model`); we pass one that
wraps our FluxTransformer, so ComfyUI's own sampling code (model sampling, CFG, conditioning, ControlNet-free
KSampler paths) runs unchanged and only the transformer forward is ours.

What ComfyUI manages and what we do: our weights sit in `DiTHandle`, which is not a registered submodule, so the
ModelPatcher sees a model of zero parameters. ComfyUI's memory manager therefore never moves, casts, offloads or
copies them, and its weight patching (LoRA patches) has nothing to patch: LoRAs go through our LoRA manager, driven
by `transformer_options["ditserve_loras"]`, which the LoRA node sets on its clone of the MODEL.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.lora.manager import LoRAManager, LoRATarget
from ditserve.models.flux import FluxTransformer, map_diffusers_key
from ditserve.pipelines.flux import latent_image_ids, pack_latents, unpack_latents

from .checkpoint import FLUX_LATENT_CHANNELS, FLUX_SCALE, FLUX_SHIFT, LoadedDiT
from .errors import NodeInputError

LORA_OPTION = "ditserve_loras"  # transformer_options key: [(nickname, path, strength), ...]


class DiTHandle:
    """Our loaded DiT, its LoRA manager and the LoRA set now active on it (shared by every clone of the MODEL)."""

    def __init__(self, loaded: LoadedDiT):
        self.loaded = loaded
        self.model: FluxTransformer = loaded.model
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        target = LoRATarget("transformer", self.model, map_diffusers_key, "flux")
        self.lora = LoRAManager({"transformer": target})
        self.active_loras: tuple = ()
        self.cuda_graphs = None  # CudaGraphs when the options node turned them on
        self._lock = threading.Lock()

    def use_loras(self, loras: tuple) -> None:
        """Make exactly these (nickname, path, strength) adapters active, if they are not already."""
        if loras == self.active_loras:
            return
        with self._lock:
            if loras:
                nicknames, paths, strengths = (list(x) for x in zip(*loras))
                self.lora.set_lora(nicknames, paths, strengths)
            else:
                self.lora.set_lora([], [], [])
            self.active_loras = loras
            if self.cuda_graphs is not None:
                self.cuda_graphs.reset()  # the graphs read the adapters' tensors


class DitserveFluxDenoiser(nn.Module):
    """ComfyUI's FLUX diffusion-model call, `(x, timestep, context, y, guidance, ...)` on [B, C, H, W] latents, run by
    our FluxTransformer on packed 2×2 tokens."""

    patch_size = 2

    def __init__(self, handle: DiTHandle, **comfy_config):
        super().__init__()
        self.handle = handle  # a plain attribute: not a submodule (see the module docstring)
        self.dtype = handle.dtype

    def __setattr__(self, name, value):
        if name == "handle":  # keep the DiT out of nn.Module's registry, and so out of ComfyUI's sight
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        ref_latents=None,
        control=None,
        transformer_options: dict | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if control is not None:
            raise NotImplementedError("ControlNet is not supported with the ditserve loader yet")
        if ref_latents is not None:
            raise NotImplementedError("reference latents (FLUX.1 Kontext) are not supported by the ditserve loader yet")
        if kwargs.get("attention_mask") is not None:
            raise NotImplementedError("attention masks are not supported by the ditserve loader yet")
        options = transformer_options or {}
        handle = self.handle
        handle.use_loras(tuple(options.get(LORA_OPTION, ())))
        device, dtype = handle.device, handle.dtype
        model = handle.model

        b, _, h, w = x.shape
        # Odd latent sizes: pad to whole 2×2 patches (wrapping around, as ComfyUI's FLUX does) and crop after.
        pad_h, pad_w = h % 2, w % 2
        latents = F.pad(x, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x
        hp, wp = latents.shape[-2:]
        tokens = pack_latents(latents.to(device, dtype))
        img_ids = latent_image_ids(hp // 2, wp // 2, device, torch.float32)
        txt = context.to(device, dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=device, dtype=torch.float32)
        pooled = y if y is not None else torch.zeros(b, model.config.pooled_projection_dim)
        if model.guidance_embedder is not None and guidance is None:
            raise NodeInputError("conditioning", "this FLUX model is guidance-distilled: the sampler gave no guidance")
        out = model(
            hidden_states=tokens,
            encoder_hidden_states=txt,
            pooled_projections=pooled[:, : model.config.pooled_projection_dim].to(device, dtype),
            timestep=timestep.to(device, torch.float32).to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None if model.guidance_embedder is None else guidance.to(device, torch.float32).to(dtype),
        )
        return unpack_latents(out, hp, wp)[:, :, :h, :w].to(x.device)


def comfy_model(handle: DiTHandle):
    """ComfyUI's MODEL (a ModelPatcher over `model_base.Flux`) whose denoiser is our DiT."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    loaded = handle.loaded
    channels = loaded.latent_channels
    unet_config = {
        "image_model": "flux",
        "guidance_embed": handle.model.guidance_embedder is not None,
        "in_channels": channels,
        "out_channels": channels,
        "patch_size": 2,
    }
    if loaded.guidance_distilled:
        model_config = comfy.supported_models.Flux(unet_config)
        model_type = comfy.model_base.ModelType.FLUX
    else:
        # A static shift s, σ' = sσ / (1 + (s − 1)σ), is ComfyUI's discrete-flow sampling (as for FLUX.1 schnell).
        model_config = comfy.supported_models.FluxSchnell(unet_config)
        model_config.sampling_settings = {"multiplier": 1.0, "shift": loaded.static_shift or 1.0}
        model_type = comfy.model_base.ModelType.FLOW
    if (channels, loaded.vae_scale, loaded.vae_shift) != (FLUX_LATENT_CHANNELS, FLUX_SCALE, FLUX_SHIFT):
        model_config.latent_format = _latent_format(comfy.latent_formats, loaded)
    model_config.unet_config["dtype"] = handle.dtype
    model_config.set_inference_dtype(handle.dtype, None)

    def denoiser(**config):
        return DitserveFluxDenoiser(handle, **config)

    base = comfy.model_base.Flux(model_config, model_type=model_type, device=handle.device, unet_model=denoiser)
    # The patcher loads to and offloads to the DiT's own device: ComfyUI has nothing of ours to move either way.
    return comfy.model_patcher.ModelPatcher(base, load_device=handle.device, offload_device=handle.device)


def _latent_format(latent_formats, loaded: LoadedDiT):
    """ComfyUI's SD3/FLUX latent scaling, (z − shift) · scale, with this model's VAE factors and channel count."""
    fmt = latent_formats.SD3()
    fmt.latent_channels = loaded.latent_channels
    fmt.scale_factor = loaded.vae_scale
    fmt.shift_factor = loaded.vae_shift
    fmt.spacial_downscale_ratio = loaded.vae_downscale
    fmt.latent_rgb_factors = None  # previews: SD3's factors are for 16 channels
    fmt.latent_rgb_factors_bias = None
    fmt.taesd_decoder_name = None
    return fmt
