"""Tiny random folders of pipelines ditserve has no native DiT for, served through the diffusers backend.

Made entirely in code with diffusers' own classes (no downloads): Stable Diffusion 3 and Sana make images,
LTX-Video and HunyuanVideo make videos. Tokenizers are the code-built ones of `ditserve.loader.tokenizers`, text
encoders tiny transformers models. Every transformer weight is drawn at `weight_std` (diffusers zero-initialises
some output layers, which would make every picture the same), so different prompts and seeds give different outputs.
Used by the tests and by `ditserve make-tiny sd3|sana|ltx-video|hunyuan-video`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TEXT_DIM = 32  # hidden size of every tiny text encoder


def _randomise(model: torch.nn.Module, seed: int, weight_std: float = 0.05) -> None:
    """Every parameter random: norm scales near 1, the rest N(0, weight_std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=gen))


def _clip_text(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, d_model: int = TEXT_DIM):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )


def _flow_scheduler(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _save(pipe, path: str | os.PathLike) -> Path:
    out = Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sd3(path: str | os.PathLike, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline: two CLIPs with projections and a T5, a 2-block SD3 transformer (patch 2), a 2× VAE."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ditserve.loader.tokenizers import clip_tokenizer, t5_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # The two CLIPs' states (2 × TEXT_DIM) are padded to T5's width, the transformer's joint attention width.
    joint_dim = 2 * TEXT_DIM
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        caption_projection_dim=16,  # = heads × head_dim
        pooled_projection_dim=2 * TEXT_DIM,
        pos_embed_max_size=32,
    )
    _randomise(transformer, seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=_clip_text(tokenizer, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer_2, projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, joint_dim),
        tokenizer_3=tokenizer_3,
    )
    return _save(pipe, path)


def make_tiny_sana(path: str | os.PathLike, seed: int = 0) -> Path:
    """SanaPipeline: a tiny Gemma2 encoder, a 2-block Sana transformer (linear attention), a 2× DC-AE."""
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from ditserve.loader.tokenizers import gemma_tokenizer

    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=TEXT_DIM,
        sample_size=16,
        patch_size=1,
    )
    _randomise(transformer, seed + 1)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=_flow_scheduler()
    )
    return _save(pipe, path)


def make_tiny_ltx_video(path: str | os.PathLike, seed: int = 0) -> Path:
    """LTXPipeline: a T5 encoder, a 1-block LTX-Video transformer, a causal video VAE compressing 2× in space and
    time."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    from ditserve.loader.tokenizers import t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    _randomise(transformer, seed + 1)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8),
        down_block_types=("LTXVideoDownBlock3D", "LTXVideoDownBlock3D"),
        decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False),
        downsample_type=("conv", "conv"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        patch_size=1,
        patch_size_t=1,
    )
    pipe = LTXPipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=_t5(tokenizer), tokenizer=tokenizer, transformer=transformer
    )
    return _save(pipe, path)


def make_tiny_hunyuan_video(path: str | os.PathLike, seed: int = 0) -> Path:
    """HunyuanVideoPipeline: a tiny Llama and a CLIP, a HunyuanVideo transformer of one dual and one single block, a
    video VAE compressing 4× in space and time."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    from ditserve.loader.tokenizers import clip_tokenizer, llama_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = llama_tokenizer(), clip_tokenizer()
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        rope_axes_dim=(2, 2, 4),
    )
    _randomise(transformer, seed + 1)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,  # the published VAE's temporal 4 needs three levels; they give 4 in space too
        temporal_compression_ratio=4,
        mid_block_add_attention=False,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=_flow_scheduler(7.0),
        text_encoder_2=_clip_text(tokenizer_2, projection=False),
        tokenizer_2=tokenizer_2,
    )
    return _save(pipe, path)
