"""Tiny random FLUX.1 folders in diffusers layout, made entirely in code (no downloads).

Used by the tests (ditserve and diffusers load the same folder), by `ditserve make-tiny flux` and as the built-in
`tiny-flux` model. The tokenizers are the code-built ones of `ditserve.loader.tokenizers`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TinyFluxSpec:
    guidance_embeds: bool = True  # dev-style; False = schnell-style
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (16, 32)  # 2 levels → the VAE scales by 2
    text_dim: int = 32  # CLIP hidden size and T5 d_model
    weight_std: float = 0.05  # transformer weights; larger than a trained model's so outputs are far from zero
    dynamic_shift: bool = True
    shard_transformer: bool = False  # write the transformer as several shards plus an index
    seed: int = 0
    extra: dict = field(default_factory=dict)


def make_tiny_flux(path: str | os.PathLike, spec: TinyFluxSpec | None = None) -> Path:
    """Write a tiny FLUX.1 folder (model_index.json and every component) that diffusers' FluxPipeline loads."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ditserve.loader.tokenizers import clip_tokenizer, t5_tokenizer

    spec = spec or TinyFluxSpec()
    out = Path(path)
    torch.manual_seed(spec.seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=2 * spec.text_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=spec.text_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="quick_gelu",
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=spec.text_dim,
            d_kv=8,
            d_ff=2 * spec.text_dim,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_block_out_channels),
        block_out_channels=list(spec.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_dim,
        pooled_projection_dim=spec.text_dim,
        guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=list(spec.axes_dims_rope),
    )
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and "norm" in name:  # QK-norm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec.weight_std * torch.randn(p.shape, generator=gen))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if spec.dynamic_shift else 1.0,
        use_dynamic_shifting=spec.dynamic_shift,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if spec.shard_transformer:
        shutil.rmtree(out / "transformer")
        transformer.save_pretrained(out / "transformer", safe_serialization=True, max_shard_size="100KB")
    return out


def make_tiny_flux_folder(path: str | os.PathLike, schnell: bool = False, sharded: bool = False) -> Path:
    """`ditserve make-tiny flux`: a dev-style tiny FLUX.1 (schnell-style with `schnell`)."""
    spec = TinyFluxSpec(guidance_embeds=not schnell, dynamic_shift=not schnell, shard_transformer=sharded)
    return make_tiny_flux(path, spec)
