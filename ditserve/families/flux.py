"""FLUX.1 (dev and schnell): diffusers' FluxPipeline, our FluxTransformer."""

from __future__ import annotations

import copy

from ditserve.registry import DiTSpec, ModelSpec, Preset

_FLUX_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
_CLIP_L_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
_T5_XXL = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
_FLUX_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": None,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
_FLUX_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _flux_preset(name: str, guidance_embeds: bool, scheduler: dict) -> Preset:
    return Preset(
        name=name,
        pipeline_class="FluxPipeline",
        configs={
            "transformer": {**copy.deepcopy(_FLUX_TRANSFORMER), "guidance_embeds": guidance_embeds},
            "vae": copy.deepcopy(_FLUX_VAE),
            "text_encoder": copy.deepcopy(_CLIP_L_TEXT),
            "text_encoder_2": copy.deepcopy(_T5_XXL),
            "scheduler": scheduler,
        },
    )


SPEC = ModelSpec(
    family="flux",
    pipeline_classes=("FluxPipeline",),
    # Weight-bearing components in the order dummy weights are seeded (transformer seed, vae +1, encoders +2, +3).
    components={
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    },
    dits=(DiTSpec("transformer", "ditserve.models.flux:FluxTransformer", "ditserve.models.flux:map_diffusers_key"),),
    pipeline="ditserve.pipelines.flux:FluxPipeline",
    code_tokenizers={
        "tokenizer": "ditserve.loader.tokenizers:clip_tokenizer",
        "tokenizer_2": "ditserve.loader.tokenizers:t5_tokenizer",
    },
    lora_architecture="flux",
    # diffusers' FluxPipeline.__call__ defaults; the size is 128 latent pixels a side, from the VAE.
    sampling_defaults={
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "true_cfg_scale": 1.0,
        "max_sequence_length": 512,
    },
    max_sequence_length=512,
    presets=(
        _flux_preset("flux.1-dev", True, _FLUX_DEV_SCHEDULER),
        _flux_preset("flux.1-schnell", False, {**_FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}),
    ),
    make_tiny="ditserve.tiny.flux:make_tiny_flux_folder",
    make_tiny_options={
        "schnell": "schnell-style: no guidance embedding, no dynamic shift",
        "sharded": "write the transformer as several shards plus an index",
    },
)
