"""The text encoders and VAE of a diffusers FLUX.1 folder as ComfyUI's CLIP and VAE objects.

For folders whose encoders ComfyUI's own loaders cannot read (the tiny test models, the built-in digits model, any
FLUX.1 folder in diffusers layout), so that a whole workflow runs from one folder. The encoders are transformers'
and the VAE diffusers', loaded as ditserve's pipeline loads them; the text encoding is FLUX.1's (CLIP's pooled output,
T5's sequence), as in ditserve's FluxPipeline. ComfyUI manages these like its own encoders; only the DiT is ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ditserve.errors import LoaderError
from ditserve.loader.folder import library_class, load_library_model, load_tokenizer, resolve_model

from .errors import NodeInputError

DEFAULT_T5_TOKENS = 512


def _source(folder: str):
    try:
        source = resolve_model(folder)
    except LoaderError as e:
        raise NodeInputError("folder", str(e)) from None
    if source.spec.family != "flux":
        raise NodeInputError("folder", f"{folder}: a {source.spec.family} folder; this node reads FLUX.1 folders")
    return source


def _t5_tokens(source) -> int:
    """T5 sequence length: the folder's ditserve.json default (models trained short), else FLUX.1's 512."""
    return int(source.sampling_defaults().get("max_sequence_length", DEFAULT_T5_TOKENS))


class FolderTokenizer:
    """ComfyUI's tokenizer interface over the folder's texts: tokens are kept as text until encoding, because
    FLUX.1's two encoders tokenize differently (CLIP 77 tokens, T5 up to 512)."""

    def __init__(self, embedding_directory=None, tokenizer_data: dict | None = None):
        self.tokenizer_data = dict(tokenizer_data or {})

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"l": [text], "t5xxl": [text]}

    def untokenize(self, token_weight_pair):
        return token_weight_pair

    def clone(self):
        return FolderTokenizer(tokenizer_data=self.tokenizer_data)

    def state_dict(self) -> dict:
        return {}


class FolderTextEncoders(nn.Module):
    """CLIP-L (pooled) and T5 (sequence) of a FLUX.1 folder, with ComfyUI's text-encoder-model interface."""

    def __init__(self, folder: str, device=None, dtype=None, model_options=None, **_):
        super().__init__()
        source = _source(folder)
        device = torch.device(device or "cpu")
        dtype = dtype or torch.float32
        try:
            self.clip = load_library_model(
                source, "text_encoder", library_class("transformers", "CLIPTextModel"), device, dtype, "auto"
            )
            self.t5 = load_library_model(
                source, "text_encoder_2", library_class("transformers", "T5EncoderModel"), device, dtype, "auto"
            )
            self.clip_tokenizer = load_tokenizer(source, "tokenizer", library_class("transformers", "CLIPTokenizer"))
            self.t5_tokenizer = load_tokenizer(source, "tokenizer_2", library_class("transformers", "T5TokenizerFast"))
        except LoaderError as e:
            raise NodeInputError("folder", str(e)) from None
        self.t5_tokens = _t5_tokens(source)
        self.dtypes = {dtype}
        self.execution_device = None

    def reset_clip_options(self) -> None:
        self.execution_device = None

    def set_clip_options(self, options: dict) -> None:
        self.execution_device = options.get("execution_device", self.execution_device)

    @torch.no_grad()
    def encode_token_weights(self, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.clip.parameters()).device
        clip_ids = self.clip_tokenizer(
            tokens["l"],
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            tokens["t5xxl"], padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        cond = self.t5(t5_ids.to(device), output_hidden_states=False)[0]
        return cond.float(), pooled.float()

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)


class _ClipTarget:
    """What ComfyUI's CLIP constructor reads: the model class, the tokenizer class and the model's arguments."""

    def __init__(self, folder: str):
        self.clip = FolderTextEncoders
        self.tokenizer = FolderTokenizer
        self.params = {"folder": folder}


def folder_clip(folder: str):
    """ComfyUI's CLIP over the folder's text encoders."""
    import comfy.sd

    return comfy.sd.CLIP(target=_ClipTarget(folder), tokenizer_data={"folder": folder})


class _DiffusersVAE(nn.Module):
    """diffusers' AutoencoderKL with the encode/decode ComfyUI's VAE calls: images in [-1, 1] ↔ raw latents (the
    model's latent format applies the scale and shift)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def folder_vae(folder: str):
    """ComfyUI's VAE over the folder's diffusers AutoencoderKL."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    source = _source(folder)
    device, offload = mm.vae_device(), mm.vae_offload_device()
    try:
        vae = load_library_model(
            source, "vae", library_class("diffusers", "AutoencoderKL"), offload, torch.float32, "auto"
        )
    except LoaderError as e:
        raise NodeInputError("folder", str(e)) from None
    config = json.loads((Path(source.folder) / "vae" / "config.json").read_text())
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    out = comfy.sd.VAE(no_init=True)
    # The attributes ComfyUI's VAE constructor sets for an AutoencoderKL, with this VAE's factor and channels.
    out.first_stage_model = _DiffusersVAE(vae).eval()
    out.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * mm.dtype_size(dtype)
    out.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * factor * factor * mm.dtype_size(dtype)
    out.downscale_ratio = out.upscale_ratio = factor
    out.latent_channels = int(config["latent_channels"])
    out.latent_dim = 2
    out.output_channels = 3
    out.pad_channel_value = None
    out.process_input = lambda image: image * 2.0 - 1.0
    out.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
    out.working_dtypes = [torch.float32]
    out.disable_offload = False
    out.not_video = True
    out.size = None
    out.downscale_index_formula = out.upscale_index_formula = None
    out.extra_1d_channel = None
    out.crop_input = True
    out.audio_sample_rate = 44100
    out.device = device
    out.vae_dtype = torch.float32
    out.output_device = mm.intermediate_device()
    out.patcher = comfy.model_patcher.ModelPatcher(out.first_stage_model, load_device=device, offload_device=offload)
    return out
