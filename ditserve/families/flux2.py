"""FLUX.2 [dev]: diffusers' Flux2Pipeline, our Flux2Transformer (FLUX.2 [klein] is `families/flux2_klein.py`).

The preset's configs are those of the published black-forest-labs/FLUX.2-dev folder as diffusers' conversion script
(scripts/convert_flux2_to_diffusers.py) writes it: the transformer, AutoencoderKLFlux2 with its default config,
FLUX.1-dev's scheduler, and Mistral Small 3.2 24B Instruct (2506) as Mistral3ForConditionalGeneration. Its text
encoder config here is mistralai/Mistral-Small-3.1-24B-Instruct-2503's published config.json: 3.2 is the same
architecture, and FLUX.2-dev's own text_encoder/config.json was not available to copy (see docs/models/flux2.md).

The tokenizer component is loaded with AutoTokenizer: the published folder holds a PixtralProcessor (tokenizer and
image processor), of which the pipelines use only the text side (diffusers' Flux2Pipeline never passes it images),
and transformers' PixtralProcessor needs torchvision, which its tokenizer does not.
"""

from __future__ import annotations

from ditserve.registry import DiTSpec, ModelSpec, Preset

FLUX2_VAE = {
    "_class_name": "AutoencoderKLFlux2",
    "act_fn": "silu",
    "batch_norm_eps": 0.0001,
    "batch_norm_momentum": 0.1,
    "block_out_channels": [128, 256, 512, 512],
    "decoder_block_out_channels": None,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 32,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "patch_size": [2, 2],
    "sample_size": 1024,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}
# FLUX.1-dev's scheduler, which FLUX.2's folders reuse; FLUX.2 pipelines pass their own empirical mu.
FLUX2_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX2_TRANSFORMER_COMMON = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "in_channels": 128,
    "mlp_ratio": 3.0,
    "out_channels": None,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
_FLUX2_DEV_TRANSFORMER = {
    **FLUX2_TRANSFORMER_COMMON,
    "guidance_embeds": True,
    "joint_attention_dim": 15360,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
}
_MISTRAL_SMALL_3 = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "image_token_index": 10,
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "attention_dropout": 0.0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "use_cache": True,
        "vocab_size": 131072,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "attention_dropout": 0.0,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "image_size": 1540,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "pixtral",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "rope_theta": 10000.0,
    },
    "vision_feature_layer": -1,
}

SPEC = ModelSpec(
    family="flux2",
    pipeline_classes=("Flux2Pipeline",),
    # Weight-bearing components in the order dummy weights are seeded (transformer seed, vae +1, text encoder +2).
    components={
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
        "text_encoder": ("transformers", "Mistral3ForConditionalGeneration"),
        "tokenizer": ("transformers", "AutoTokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    },
    dits=(DiTSpec("transformer", "ditserve.models.flux2:Flux2Transformer", "ditserve.models.flux2:map_diffusers_key"),),
    pipeline="ditserve.pipelines.flux2:Flux2Pipeline",
    code_tokenizers={"tokenizer": "ditserve.loader.tokenizers:mistral_tokenizer"},
    lora_architecture="flux2",
    tasks=("text-to-image", "image-edit"),
    # Reference images: BFL's FLUX.2 [dev] takes up to 10 (each is resized to at most 1024² and adds its tokens).
    image_inputs=10,
    # diffusers' Flux2Pipeline.__call__ defaults (1024² from its default_sample_size 128 × the VAE's 8).
    sampling_defaults={
        "num_inference_steps": 50,
        "guidance_scale": 4.0,
        "true_cfg_scale": 1.0,  # unused: FLUX.2 [dev] is guidance-distilled (guidance_scale is embedded)
        "max_sequence_length": 512,
    },
    max_sequence_length=512,
    presets=(
        Preset(
            name="flux.2-dev",
            pipeline_class="Flux2Pipeline",
            configs={
                "transformer": _FLUX2_DEV_TRANSFORMER,
                "vae": FLUX2_VAE,
                "text_encoder": _MISTRAL_SMALL_3,
                "scheduler": FLUX2_SCHEDULER,
            },
        ),
    ),
    make_tiny="ditserve.tiny.flux2:make_tiny_flux2_folder",
    make_tiny_options={"klein": "FLUX.2 [klein]: Qwen3 text encoder, no guidance embedding, true CFG"},
)
