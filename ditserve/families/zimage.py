"""Z-Image (Turbo): diffusers' ZImagePipeline, our ZImageTransformer.

The preset's configs are those of the published Tongyi-MAI/Z-Image-Turbo folder: the transformer, the Qwen3-4B text
encoder (as its config.json has it: written from Qwen3ForCausalLM, loaded as Qwen3Model), FLUX.1's VAE and a
scheduler with a fixed shift of 3.
"""

from __future__ import annotations

from ditserve.registry import DiTSpec, ModelSpec, Preset

_ZIMAGE_TURBO_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
_QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
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
_ZIMAGE_TURBO_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}

SPEC = ModelSpec(
    family="zimage",
    pipeline_classes=("ZImagePipeline",),
    # Weight-bearing components in the order dummy weights are seeded (transformer seed, vae +1, text encoder +2).
    components={
        "transformer": ("diffusers", "ZImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "Qwen3Model"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    },
    dits=(
        DiTSpec("transformer", "ditserve.models.zimage:ZImageTransformer", "ditserve.models.zimage:map_diffusers_key"),
    ),
    pipeline="ditserve.pipelines.zimage:ZImagePipeline",
    code_tokenizers={"tokenizer": "ditserve.loader.tokenizers:qwen3_tokenizer"},
    lora_architecture="zimage",
    # diffusers' ZImagePipeline.__call__ defaults (1024² comes from the pipeline). Z-Image-Turbo's model card asks
    # for 9 steps and guidance_scale 0: pass them, or put them in the folder's ditserve.json.
    sampling_defaults={
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "true_cfg_scale": 1.0,  # unused: Z-Image's one CFG scale is guidance_scale
        "max_sequence_length": 512,
    },
    # Caption positions must stay inside the first RoPE axis (axes_lens[0] = 1536 positions): captions up to 1504
    # tokens; the pipeline computes this from the loaded config.
    max_sequence_length=1504,
    # diffusers' ZImagePipeline call settings that SamplingParams has no field for: cfg_normalization caps each
    # sample's guided norm at that multiple of the positive's (true = 1; false/null: off); cfg_truncation turns CFG
    # off once (1000 − t) / 1000 exceeds it (null: never).
    sampling_options={"cfg_normalization": False, "cfg_truncation": 1.0},
    presets=(
        Preset(
            name="z-image-turbo",
            pipeline_class="ZImagePipeline",
            configs={
                "transformer": _ZIMAGE_TURBO_TRANSFORMER,
                "vae": _FLUX_VAE,
                "text_encoder": _QWEN3_4B,
                "scheduler": _ZIMAGE_TURBO_SCHEDULER,
            },
        ),
    ),
    make_tiny="ditserve.tiny.zimage:make_tiny_zimage_folder",
)
