"""Tiny random FLUX.1 folders in diffusers layout, made entirely in code (no downloads).

Used by the tests (ditserve and diffusers load the same folder) and as the built-in default model. Tokenizers are
built from a small vocabulary: CLIP's byte-level BPE over single bytes, T5's unigram over single characters. Their
outputs have the real structure (padding, end tokens, truncation), so the pipeline code paths are the real ones.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

TINY_FORMAT_VERSION = 1  # bump when the default tiny model changes, so caches are rebuilt


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


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def make_tiny_flux(path: str | os.PathLike, spec: TinyFluxSpec | None = None) -> Path:
    """Write a tiny FLUX.1 folder (model_index.json and every component) that diffusers' FluxPipeline loads."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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


def cache_dir() -> Path:
    root = os.environ.get("DITSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ditserve"
    )
    return Path(root)


def builtin_model_path(name: str) -> Path:
    """The folder of a built-in model, written on first use (atomically, so concurrent first uses are safe)."""
    if name != "tiny-flux":
        raise KeyError(f"unknown built-in model {name!r}")
    target = cache_dir() / f"tiny-flux-v{TINY_FORMAT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-flux-", dir=target.parent))
    try:
        make_tiny_flux(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
