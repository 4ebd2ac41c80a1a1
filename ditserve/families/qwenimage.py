"""Qwen-Image (and Qwen-Image-2512): diffusers' QwenImagePipeline, our QwenImageTransformer.

The presets' configs are those of the published Qwen/Qwen-Image and Qwen/Qwen-Image-2512 folders (the same
architecture: 2512 is a retrained checkpoint): the 20B MMDiT, the Qwen2.5-VL-7B-Instruct text encoder (as the
folders' text_encoder/config.json has it), the Qwen-Image VAE (AutoencoderKLQwenImage's defaults are the published
config) and the flow-matching scheduler with exponential dynamic shift.
"""

from __future__ import annotations

from ditserve.registry import DiTSpec, ModelSpec, Preset

QWEN_IMAGE_TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}
QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_token_id": 151655,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
        "hidden_size": 1280,
        "in_channels": 3,
        "in_chans": 3,
        "intermediate_size": 3420,
        "model_type": "qwen2_5_vl",
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "vision_token_id": 151654,
    "vocab_size": 152064,
}
QWEN_IMAGE_VAE = {
    "_class_name": "AutoencoderKLQwenImage",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
    ],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}  # fmt: skip
QWEN_IMAGE_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
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
_CONFIGS = {
    "transformer": QWEN_IMAGE_TRANSFORMER,
    "vae": QWEN_IMAGE_VAE,
    "text_encoder": QWEN2_5_VL_7B,
    "scheduler": QWEN_IMAGE_SCHEDULER,
}

SPEC = ModelSpec(
    family="qwen-image",
    pipeline_classes=("QwenImagePipeline",),
    # Weight-bearing components in the order dummy weights are seeded (transformer seed, vae +1, text encoder +2).
    components={
        "transformer": ("diffusers", "QwenImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLQwenImage"),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    },
    dits=(
        DiTSpec(
            "transformer",
            "ditserve.models.qwenimage:QwenImageTransformer",
            "ditserve.models.qwenimage:map_diffusers_key",
        ),
    ),
    pipeline="ditserve.pipelines.qwenimage:QwenImagePipeline",
    code_tokenizers={"tokenizer": "ditserve.loader.tokenizers:qwen2_5_vl_tokenizer"},
    lora_architecture="qwen-image",
    # diffusers' QwenImagePipeline.__call__ defaults (1024² comes from the pipeline). true CFG runs only with a
    # negative prompt, as in diffusers (the model card's example passes negative_prompt=" ").
    sampling_defaults={"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_sequence_length": 512},
    max_sequence_length=1024,
    presets=(
        Preset(name="qwen-image", pipeline_class="QwenImagePipeline", configs=_CONFIGS),
        Preset(name="qwen-image-2512", pipeline_class="QwenImagePipeline", configs=_CONFIGS),
    ),
    make_tiny="ditserve.tiny.qwenimage:make_tiny_qwenimage_folder",
)
