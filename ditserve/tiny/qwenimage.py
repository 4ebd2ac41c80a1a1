"""Tiny random Qwen-Image folders in diffusers layout, made entirely in code (no downloads).

Used by the tests (ditserve and diffusers' Qwen-Image pipelines load the same folder) and by `ditserve make-tiny`.
The tokenizer is the code-built Qwen2.5-VL one of `ditserve.loader.tokenizers`; the text encoder a tiny
`Qwen2_5_VLForConditionalGeneration` (with its vision tower, which the edit pipelines use), built with transformers'
own class; the VAE a tiny `AutoencoderKLQwenImage`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# The published folders' scheduler (Qwen/Qwen-Image/scheduler/scheduler_config.json).
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


@dataclass
class TinyQwenImageSpec:
    heads: int = 2
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # add up to head_dim
    num_layers: int = 2
    latent_channels: int = 4  # the VAE's z_dim; the transformer takes 2×2 patches of them
    vae_base_dim: int = 16
    vae_levels: int = 1  # spatial halvings of the VAE (the edit pipelines encode ~1024² inputs: use 3 there)
    text_dim: int = 32  # Qwen2.5-VL hidden size = joint_attention_dim
    text_layers: int = 2
    vision_dim: int = 32
    weight_std: float = 0.05  # transformer weights; larger than a trained model's so outputs are far from zero
    zero_cond_t: bool = False  # Qwen-Image-Edit-2511's modulation of the reference image tokens
    layered: bool = False  # Qwen-Image-Layered: an RGBA VAE, 3-D RoPE over the layers, the additional t embedding
    pipeline_class: str = "QwenImagePipeline"
    seed: int = 0


def tiny_text_encoder(tokenizer, spec: TinyQwenImageSpec):
    """A tiny Qwen2.5-VL (language model and vision tower), its special token ids from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 4
    half_head = spec.text_dim // heads // 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=2 * spec.text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "default", "mrope_section": [half_head // 4, half_head // 4, half_head // 2]},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=spec.vision_dim,
            intermediate_size=2 * spec.vision_dim,
            num_heads=2,
            out_hidden_size=spec.text_dim,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_tiny_qwenimage(path: str | os.PathLike, spec: TinyQwenImageSpec | None = None) -> Path:
    """Write a tiny Qwen-Image folder (model_index.json and every component) that diffusers' pipeline loads."""
    import diffusers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from ditserve.loader.tokenizers import qwen2_5_vl_tokenizer

    spec = spec or TinyQwenImageSpec()
    out = Path(path)
    torch.manual_seed(spec.seed)
    tokenizer = qwen2_5_vl_tokenizer()
    text_encoder = tiny_text_encoder(tokenizer, spec)
    vae = AutoencoderKLQwenImage(
        base_dim=spec.vae_base_dim,
        z_dim=spec.latent_channels,
        dim_mult=[1] * (spec.vae_levels + 1),
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False] + [True] * (spec.vae_levels - 1),  # the VAE scales by 2 ** vae_levels
        latents_mean=[0.1 * i - 0.15 for i in range(spec.latent_channels)],
        latents_std=[1.0 + 0.25 * i for i in range(spec.latent_channels)],
        input_channels=4 if spec.layered else 3,
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * spec.latent_channels,
        out_channels=spec.latent_channels,
        num_layers=spec.num_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.text_dim,
        axes_dims_rope=spec.axes_dims_rope,
        zero_cond_t=spec.zero_cond_t,
        use_additional_t_cond=spec.layered,
        use_layer3d_rope=spec.layered,
    )
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and "norm" in name:  # norm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec.weight_std * torch.randn(p.shape, generator=gen))
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    diffusers.QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    ).save_pretrained(out, safe_serialization=True)
    if spec.pipeline_class != "QwenImagePipeline":
        # The edit pipelines' folders add the Qwen2-VL processor (its tokenizer and image processor settings),
        # written by parts: transformers' processor class needs torchvision to be built.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer.save_pretrained(out / "processor")
        Qwen2VLImageProcessorPil().save_pretrained(out / "processor")
        index = json.loads((out / "model_index.json").read_text())
        index.update(_class_name=spec.pipeline_class, processor=["transformers", "Qwen2VLProcessor"])
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def make_tiny_qwenimage_folder(path: str | os.PathLike) -> Path:
    """`ditserve make-tiny qwen-image`: a tiny Qwen-Image with random weights."""
    return make_tiny_qwenimage(path)


def make_tiny_qwenimage_edit_folder(path: str | os.PathLike, zero_cond_t: bool = False) -> Path:
    """`ditserve make-tiny qwen-image-edit`: a tiny Qwen-Image-Edit-2509 (--zero-cond-t: -2511) with random
    weights."""
    spec = TinyQwenImageSpec(
        pipeline_class="QwenImageEditPlusPipeline", vae_levels=3, vae_base_dim=4, zero_cond_t=zero_cond_t
    )
    return make_tiny_qwenimage(path, spec)


def make_tiny_qwenimage_layered_folder(path: str | os.PathLike) -> Path:
    """`ditserve make-tiny qwen-image-layered`: a tiny Qwen-Image-Layered with random weights."""
    # 8 latent channels, not 4: diffusers takes an input with as many channels as the latents (RGBA: 4) for latents.
    spec = TinyQwenImageSpec(
        pipeline_class="QwenImageLayeredPipeline", vae_levels=3, vae_base_dim=4, latent_channels=8, layered=True
    )
    return make_tiny_qwenimage(path, spec)
