"""Tiny random Z-Image folders in diffusers layout, made entirely in code (no downloads).

Used by the tests (ditserve and diffusers' ZImagePipeline load the same folder) and by `ditserve make-tiny`. The
tokenizer is the code-built Qwen3 one of `ditserve.loader.tokenizers`; the text encoder a tiny `Qwen3Model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TinyZImageSpec:
    dim: int = 64
    n_heads: int = 2
    n_layers: int = 2
    n_refiner_layers: int = 1
    axes_dims: tuple[int, int, int] = (8, 12, 12)  # add up to the head width, dim / n_heads
    axes_lens: tuple[int, int, int] = (1536, 512, 512)
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (16, 32)  # 2 levels → the VAE scales by 2
    text_dim: int = 32  # Qwen3 hidden size = cap_feat_dim
    text_layers: int = 3  # the pipeline reads hidden_states[-2], the output of the second-to-last layer
    weight_std: float = 0.05  # transformer weights; larger than a trained model's so outputs are far from zero
    shift: float = 3.0
    seed: int = 0


def make_tiny_zimage(path: str | os.PathLike, spec: TinyZImageSpec | None = None) -> Path:
    """Write a tiny Z-Image folder (model_index.json and every component) that diffusers' ZImagePipeline loads."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from ditserve.loader.tokenizers import qwen3_tokenizer

    spec = spec or TinyZImageSpec()
    out = Path(path)
    torch.manual_seed(spec.seed)
    tokenizer = qwen3_tokenizer()
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=2 * spec.text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=spec.text_dim // 4,
            max_position_embeddings=2048,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
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
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=spec.latent_channels,
        dim=spec.dim,
        n_layers=spec.n_layers,
        n_refiner_layers=spec.n_refiner_layers,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_heads,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=spec.text_dim,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=list(spec.axes_dims),
        axes_lens=list(spec.axes_lens),
    )
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and "norm" in name:  # norm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("pad_token"):  # unit-scale tokens, like the embedded ones they stand in for
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec.weight_std * torch.randn(p.shape, generator=gen))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_zimage_folder(path: str | os.PathLike) -> Path:
    """`ditserve make-tiny zimage`: a tiny Z-Image with random weights."""
    return make_tiny_zimage(path)
