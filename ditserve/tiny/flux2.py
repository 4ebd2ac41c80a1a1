"""Tiny random FLUX.2 folders ([dev] and [klein]) in diffusers layout, made entirely in code (no downloads).

Used by the tests (ditserve and diffusers' Flux2Pipeline / Flux2KleinPipeline run the same folder) and by `ditserve
make-tiny flux2 [--klein]`. The text encoders are transformers' own classes at a tiny width but with enough layers
for the hidden states the pipelines read ([dev]: layers 10, 20, 30 of Mistral3ForConditionalGeneration; [klein]: 9,
18, 27 of Qwen3ForCausalLM); the tokenizers are the code-built ones of `ditserve.loader.tokenizers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TinyFlux2Spec:
    klein: bool = False  # Flux2KleinPipeline: Qwen3 text encoder, no guidance embedding
    distilled: bool = False  # klein only: model_index.json's is_distilled (no CFG)
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int, int] = (4, 4, 4, 4)
    latent_channels: int = 4  # the DiT sees 4× as many (2×2 patches)
    vae_block_out_channels: tuple[int, ...] = (8, 16, 16)  # 3 levels → the VAE scales by 4
    text_dim: int = 16  # the text encoder's hidden size; the DiT reads 3 of its layers side by side
    text_layers: int = 30  # enough for the deepest layer the pipeline reads
    weight_std: float = 0.1  # transformer weights; larger than a trained model's so outputs are far from zero
    seed: int = 0


def _mistral3(tokenizer, spec: TinyFlux2Spec):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=2 * spec.text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=spec.text_dim // 2,
            max_position_embeddings=2048,
            rope_theta=1000000000.0,
            rms_norm_eps=1e-5,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            image_size=32,
            patch_size=4,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config)


def _qwen3(tokenizer, spec: TinyFlux2Spec):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=2 * spec.text_dim,
            num_hidden_layers=spec.text_layers - 3,  # layers 9, 18, 27
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=spec.text_dim // 2,
            max_position_embeddings=2048,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def make_tiny_flux2(path: str | os.PathLike, spec: TinyFlux2Spec | None = None) -> Path:
    """Write a tiny FLUX.2 folder (model_index.json and every component) that diffusers' pipeline loads."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    from ditserve.loader.tokenizers import mistral_tokenizer, qwen3_tokenizer

    spec = spec or TinyFlux2Spec()
    out = Path(path)
    torch.manual_seed(spec.seed)
    tokenizer = qwen3_tokenizer() if spec.klein else mistral_tokenizer()
    text_encoder = _qwen3(tokenizer, spec) if spec.klein else _mistral3(tokenizer, spec)
    with torch.no_grad():  # unit-scale token embeddings, so that prompts (and CFG's negative) visibly differ
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    levels = len(spec.vae_block_out_channels)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(spec.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so the pipelines' (de)normalisation matters
        vae.bn.running_mean.normal_(0.0, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=3 * spec.text_dim,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=spec.axes_dims_rope,
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=not spec.klein,
    )
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and "norm" in name:  # norm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec.weight_std * torch.randn(p.shape, generator=gen))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if spec.klein:
        pipe = Flux2KleinPipeline(**parts, is_distilled=spec.distilled)
    else:
        pipe = Flux2Pipeline(**parts)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_flux2_folder(path: str | os.PathLike, klein: bool = False) -> Path:
    """`ditserve make-tiny flux2 [--klein]`: a tiny FLUX.2 [dev] (or [klein], with true CFG) with random weights."""
    return make_tiny_flux2(path, TinyFlux2Spec(klein=klein))
