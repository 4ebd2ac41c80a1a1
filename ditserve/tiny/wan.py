"""Tiny random Wan folders in diffusers layout, made entirely in code (no downloads).

Used by the tests (ditserve and diffusers' WanPipeline load the same folder) and by `ditserve make-tiny wan`. The
tokenizer is the code-built T5 one of `ditserve.loader.tokenizers` (UMT5's structure: `<pad>` 0, `</s>` 1, `<unk>`
2); the text encoder a tiny `UMT5EncoderModel`, the VAE a tiny `AutoencoderKLWan` with Wan's 4× temporal and 8×
spatial compression (Wan2.2 TI2V's: 16×), the scheduler Wan's UniPC with flow sigmas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# The first channels' statistics of the published Wan2.1 VAE (its config holds 16 of each).
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]


@dataclass
class TinyWanSpec:
    heads: int = 2
    head_dim: int = 24  # RoPE splits it 8 (frames) + 8 (rows) + 8 (columns)
    layers: int = 2
    ffn_dim: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)  # latent frames, rows, columns per DiT token
    latent_channels: int = 4  # the VAE's z_dim
    vae_base_dim: int = 8
    # Channel multipliers of the VAE's levels: each level after the first halves the sides, and the last two also
    # halve the frames (Wan's 4× temporal compression). Four levels are Wan2.1's 8× spatial compression, three 4×.
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    text_dim: int = 32  # UMT5 d_model = the transformer's text_dim
    text_layers: int = 2
    weight_std: float = 0.05  # transformer weights; larger than a trained model's so outputs are far from zero
    flow_shift: float = 3.0
    two_experts: bool = False  # Wan2.2 A14B-style: a second transformer for the steps after the boundary
    boundary_ratio: float = 0.875
    # Wan2.2 TI2V-5B-style: its VAE (residual blocks, 2×2 pixel patches in 12 channels, 16× spatial compression)
    # and expand_timesteps (per-token timesteps, the first frame's clean when an image is given)
    ti2v: bool = False
    # Image to video (WanImageToVideoPipeline): the DiT reads the image's latents and mask beside the noisy latents;
    # alone Wan2.1 I2V's layout (a tiny CLIP image encoder, image k/v in the cross-attention), with two_experts
    # Wan2.2 I2V-A14B's (no CLIP, boundary_ratio 0.9)
    i2v: bool = False
    clip_dim: int = 16
    # TurboWan-style: SLA's proj_l in every block (written in the original Wan repository's names, as TurboDiffusion
    # publishes its checkpoints: a .pth state dict) and rCM as the folder's sampler
    turbowan: bool = False
    # FastWan-style (trained with VSA): VSA's gate projection in every block, as FastVideo's diffusers folders store it
    # (`blocks.N.to_gate_compress`, the config unchanged)
    vsa: bool = False
    seed: int = 0


def tiny_transformer(spec: TinyWanSpec, seed: int):
    """A tiny WanTransformer3DModel with every parameter random (also those diffusers initialises to 0 or 1)."""
    from diffusers import WanTransformer3DModel

    clip = spec.i2v and not spec.two_experts
    transformer = WanTransformer3DModel(
        patch_size=tuple(spec.patch_size),
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim,
        in_channels=2 * spec.latent_channels + 4 if spec.i2v else spec.latent_channels,
        out_channels=spec.latent_channels,
        image_dim=spec.clip_dim if clip else None,
        added_kv_proj_dim=spec.heads * spec.head_dim if clip else None,
        text_dim=spec.text_dim,
        freq_dim=32,
        ffn_dim=spec.ffn_dim,
        num_layers=spec.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):  # norm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "scale_shift_table" in name:  # as diffusers initialises it: unit variance over the width
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(spec.weight_std * torch.randn(p.shape, generator=gen))
    return transformer


def tiny_clip(spec: TinyWanSpec):
    """A tiny CLIPVisionModel (28-pixel images in 14-pixel patches: 5 tokens) and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=spec.clip_dim,
            intermediate_size=2 * spec.clip_dim,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-2]
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=spec.clip_dim,
        )
    )
    return encoder, CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def make_tiny_wan(path: str | os.PathLike, spec: TinyWanSpec | None = None) -> Path:
    """Write a tiny Wan folder (model_index.json and every component) that diffusers' WanPipeline (with `spec.i2v`:
    WanImageToVideoPipeline) loads: Wan2.1's layout, with `spec.two_experts` Wan2.2 A14B's (transformer_2 and
    boundary_ratio), with `spec.ti2v` Wan2.2 TI2V's."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from ditserve.loader.tokenizers import t5_tokenizer

    spec = spec or TinyWanSpec()
    out = Path(path)
    torch.manual_seed(spec.seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=spec.text_dim,
            d_kv=spec.text_dim // 4,
            d_ff=2 * spec.text_dim,
            num_layers=spec.text_layers,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    z = spec.latent_channels
    downsamplings = len(spec.vae_dim_mult) - 1
    if downsamplings < 2:
        raise ValueError("vae_dim_mult needs at least three levels (two temporal halvings: 4× fewer frames)")
    wan22_vae = (
        dict(decoder_base_dim=2 * spec.vae_base_dim, is_residual=True, in_channels=12, out_channels=12, patch_size=2)
        if spec.ti2v
        else {}
    )
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim,
        z_dim=z,
        dim_mult=list(spec.vae_dim_mult),
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False] * (downsamplings - 2) + [True, True],
        latents_mean=_LATENTS_MEAN[:z],
        latents_std=_LATENTS_STD[:z],
        scale_factor_spatial=2**downsamplings * (2 if spec.ti2v else 1),
        **wan22_vae,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.flow_shift, num_train_timesteps=1000
    )
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=tiny_transformer(spec, spec.seed + 1),
        transformer_2=tiny_transformer(spec, spec.seed + 2) if spec.two_experts else None,
        boundary_ratio=spec.boundary_ratio if spec.two_experts else None,
        expand_timesteps=spec.ti2v,
    )
    if not spec.i2v:
        pipe = WanPipeline(**parts)
    elif spec.two_experts:
        pipe = WanImageToVideoPipeline(**parts)
    else:
        image_encoder, image_processor = tiny_clip(spec)
        pipe = WanImageToVideoPipeline(**parts, image_encoder=image_encoder, image_processor=image_processor)
    pipe.save_pretrained(out, safe_serialization=True)
    if spec.turbowan:
        _as_turbowan(out, spec)
    if spec.vsa:
        _with_vsa_gates(out, spec)
    return out


def _with_vsa_gates(out: Path, spec: TinyWanSpec) -> None:
    """A random to_gate_compress (dim → dim, with bias) in every block of the folder's transformer(s)."""
    from safetensors.torch import load_file, save_file

    dim = spec.heads * spec.head_dim
    gen = torch.Generator().manual_seed(spec.seed + 11)
    for weights in sorted(out.glob("transformer*/diffusion_pytorch_model.safetensors")):
        state = load_file(weights)
        for i in range(spec.layers):
            state[f"blocks.{i}.to_gate_compress.weight"] = 0.2 * torch.randn(dim, dim, generator=gen)
            state[f"blocks.{i}.to_gate_compress.bias"] = 0.1 * torch.randn(dim, generator=gen)
        save_file(state, weights)


def _as_turbowan(out: Path, spec: TinyWanSpec) -> None:
    """The transformer as TurboDiffusion publishes it: one .pth state dict in the original Wan names with a random
    proj_l per block, the config marked `sparse_linear_attention`, rCM named as the folder's sampler."""
    import json

    from safetensors.torch import load_file

    from ditserve.models.wan import diffusers_to_original_key

    folder = out / "transformer"
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {diffusers_to_original_key(k): v for k, v in load_file(weights).items()}
    gen = torch.Generator().manual_seed(spec.seed + 7)
    for i in range(spec.layers):
        prefix = f"blocks.{i}.self_attn.attn_op.local_attn.proj_l"
        state[f"{prefix}.weight"] = 0.2 * torch.randn(spec.head_dim, spec.head_dim, generator=gen)
        state[f"{prefix}.bias"] = 0.05 * torch.randn(spec.head_dim, generator=gen)
    weights.unlink()
    torch.save(state, folder / "turbowan.pth")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sparse_linear_attention": True}, indent=2))
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "sampler": "rcm"}, indent=2))


def make_tiny_wan_folder(
    path: str | os.PathLike,
    two_experts: bool = False,
    ti2v: bool = False,
    i2v: bool = False,
    turbowan: bool = False,
    vsa: bool = False,
) -> Path:
    """`ditserve make-tiny wan [--two-experts] [--ti2v | --i2v]`: a tiny Wan model with random weights."""
    if ti2v and (two_experts or i2v):
        raise ValueError("--ti2v is a model of its own (it takes an image or none); leave out --two-experts and --i2v")
    spec = TinyWanSpec(
        two_experts=two_experts, ti2v=ti2v, i2v=i2v, turbowan=turbowan, vsa=vsa, flow_shift=5.0 if ti2v else 3.0
    )
    if turbowan or vsa:
        spec.head_dim = 32  # a power of two: the block-sparse Triton kernel's (on CUDA) head widths
    if two_experts and i2v:
        spec.boundary_ratio = 0.9  # Wan2.2 I2V-A14B's
    return make_tiny_wan(path, spec)
