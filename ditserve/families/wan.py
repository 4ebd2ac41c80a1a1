"""Wan (2.1; 2.2's two-expert A14B and TI2V-5B): diffusers' WanPipeline, our WanTransformer (one, or two switched at
the folder's boundary_ratio).

The presets' configs are those of the published Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan2.1-T2V-14B-Diffusers
folders: the transformer, the UMT5-XXL encoder (google/umt5-xxl, as the folders' text_encoder/config.json has it),
the Wan2.1 VAE and the UniPC scheduler with flow sigmas and a shift of 3 (both folders; diffusers' docs suggest 5 at
720p, which a request cannot change: put another scheduler config in a folder for that).
"""

from __future__ import annotations

import copy

from ditserve.registry import DiTSpec, ModelSpec, Preset

_WAN21_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
_WAN21_T2V_1_3B = {**_WAN21_TRANSFORMER, "ffn_dim": 8960, "num_attention_heads": 12, "num_layers": 30}
_WAN21_T2V_14B = {**_WAN21_TRANSFORMER, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40}
_UMT5_XXL = {
    "architectures": ["UMT5EncoderModel"],
    "classifier_dropout": 0.0,
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
    "model_type": "umt5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "scalable_attention": True,
    "tie_word_embeddings": False,
    "tokenizer_class": "T5Tokenizer",
    "use_cache": True,
    "vocab_size": 256384,
}
_WAN21_VAE = {
    "_class_name": "AutoencoderKLWan",
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
_WAN_UNIPC = {
    "_class_name": "UniPCMultistepScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


# Wan2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers): its own DiT width and 48-channel VAE (residual blocks, 2×2 pixel
# patches in 12 channels: 16× spatial compression), per-token timesteps (expand_timesteps), a shift of 5.
_WAN22_TI2V_5B = {
    **_WAN21_TRANSFORMER,
    "ffn_dim": 14336,
    "in_channels": 48,
    "num_attention_heads": 24,
    "num_layers": 30,
    "out_channels": 48,
    "pos_embed_seq_len": None,
}
_WAN22_VAE = {
    "_class_name": "AutoencoderKLWan",
    "attn_scales": [],
    "base_dim": 160,
    "clip_output": False,
    "decoder_base_dim": 256,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "in_channels": 12,
    "is_residual": True,
    "latents_mean": [
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    "latents_std": [
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
    "num_res_blocks": 2,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True],
    "z_dim": 48,
}  # fmt: skip


# Image to video (WanImageToVideoPipeline): Wan2.1 I2V-14B (480P and 720P share the architecture) reads the image's
# latents and mask beside the noise (36 channels) and CLIP ViT-H/14's penultimate states through image k/v in every
# cross-attention; Wan2.2 I2V-A14B takes the 36 channels without CLIP, in two experts from t < 900.
_WAN21_I2V_14B = {**_WAN21_T2V_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
_WAN22_I2V_A14B = {**_WAN21_T2V_14B, "in_channels": 36}
_CLIP_VIT_H_14 = {
    "architectures": ["CLIPVisionModel"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "projection_dim": 1024,
}
_CLIP_IMAGE_PROCESSOR = {  # its preprocessor_config.json: OpenAI CLIP's (built in code for the preset)
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}


def _i2v_preset(name: str, transformer: dict, clip: bool, boundary_ratio: float | None = None) -> Preset:
    preset = _t2v_preset(name, transformer, boundary_ratio=boundary_ratio)
    preset.pipeline_class = "WanImageToVideoPipeline"
    if clip:
        preset.configs["image_encoder"] = copy.deepcopy(_CLIP_VIT_H_14)
        preset.configs["image_processor"] = copy.deepcopy(_CLIP_IMAGE_PROCESSOR)
    return preset


def _t2v_preset(
    name: str,
    transformer: dict,
    boundary_ratio: float | None = None,
    vae: dict = _WAN21_VAE,
    flow_shift: float = 3.0,
    expand_timesteps: bool = False,
) -> Preset:
    configs = {
        "transformer": copy.deepcopy(transformer),
        "vae": copy.deepcopy(vae),
        "text_encoder": copy.deepcopy(_UMT5_XXL),
        "scheduler": {**copy.deepcopy(_WAN_UNIPC), "flow_shift": flow_shift},
    }
    if boundary_ratio is not None:  # two experts of the same architecture
        configs["transformer_2"] = copy.deepcopy(transformer)
    return Preset(
        name=name,
        pipeline_class="WanPipeline",
        configs=configs,
        pipeline_config={"boundary_ratio": boundary_ratio, "expand_timesteps": expand_timesteps},
    )


SPEC = ModelSpec(
    family="wan",
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline"),
    # Weight-bearing components in the order dummy weights are seeded (transformer seed, transformer_2 (if any) +1,
    # then the VAE and the text encoder).
    components={
        "transformer": ("diffusers", "WanTransformer3DModel"),
        "transformer_2": ("diffusers", "WanTransformer3DModel"),  # Wan2.2 A14B's low-noise expert
        "vae": ("diffusers", "AutoencoderKLWan"),
        "text_encoder": ("transformers", "UMT5EncoderModel"),
        "tokenizer": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "UniPCMultistepScheduler"),
        "image_encoder": ("transformers", "CLIPVisionModel"),  # Wan2.1 I2V
        "image_processor": ("transformers", "CLIPImageProcessor"),  # Wan2.1 I2V
    },
    dits=(
        DiTSpec("transformer", "ditserve.models.wan:WanTransformer", "ditserve.models.wan:map_diffusers_key"),
        DiTSpec("transformer_2", "ditserve.models.wan:WanTransformer", "ditserve.models.wan:map_diffusers_key"),
    ),
    optional_components=("transformer_2", "image_encoder", "image_processor"),
    pipeline="ditserve.pipelines.wan:WanPipeline",
    code_tokenizers={
        "tokenizer": "ditserve.loader.tokenizers:t5_tokenizer",
        "image_processor": "ditserve.loader.tokenizers:clip_image_processor",
    },
    lora_architecture="wan",
    output="video",
    # Image to video: I2V folders (WanImageToVideoPipeline) need the image, TI2V folders take one or none, the pipeline
    # refuses it for text-to-video folders.
    tasks=("text-to-video", "image-to-video"),
    image_inputs=1,
    # diffusers' WanPipeline.__call__ defaults (480 × 832 comes from the pipeline); 16 fps is what its examples
    # export at (the frame rate Wan was trained on).
    sampling_defaults={
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "true_cfg_scale": 1.0,  # unused: Wan's one CFG scale is guidance_scale
        "max_sequence_length": 512,
        "num_frames": 81,
        "fps": 16,
    },
    max_sequence_length=512,
    # The sampler of a request: diffusers' UniPC (the folders' scheduler) or flow-matching Euler, the folder's shift
    # or another, and optionally the timesteps a distillation was trained at (before the shift, comma-separated,
    # one per step; Euler only).
    sampling_options={"sampler": "unipc", "flow_shift": None, "denoising_steps": None},
    sampling_presets={
        # The 4-step distillation LoRAs of LightX2V for Wan2.1 and Wan2.2 (lightx2v/Wan2.1-Distill-Loras,
        # lightx2v/Wan2.2-Distill-Loras; also guidance-distilled): Euler at shift 5 over timesteps 1000, 750,
        # 500, 250, no CFG (LightX2V's own settings: sample_shift 5, denoising_step_list, guide scale 1).
        "lightx2v-4step": {
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
            "guidance_scale_2": 1.0,
            "options": {"sampler": "euler", "flow_shift": 5.0, "denoising_steps": "1000,750,500,250"},
        },
    },
    presets=(
        _t2v_preset("wan2.1-t2v-1.3b", _WAN21_T2V_1_3B),
        _t2v_preset("wan2.1-t2v-14b", _WAN21_T2V_14B),
        # Wan2.2 T2V-A14B: two experts of Wan2.1 14B's architecture, the second from t < 875 (diffusers' conversion
        # of Wan-AI/Wan2.2-T2V-A14B), the same VAE, encoder and scheduler (shift 3).
        _t2v_preset("wan2.2-t2v-a14b", _WAN21_T2V_14B, boundary_ratio=0.875),
        _t2v_preset("wan2.2-ti2v-5b", _WAN22_TI2V_5B, vae=_WAN22_VAE, flow_shift=5.0, expand_timesteps=True),
        _i2v_preset("wan2.1-i2v-14b", _WAN21_I2V_14B, clip=True),
        _i2v_preset("wan2.2-i2v-a14b", _WAN22_I2V_A14B, clip=False, boundary_ratio=0.9),
    ),
    make_tiny="ditserve.tiny.wan:make_tiny_wan_folder",
    make_tiny_options={
        "two_experts": "Wan2.2 A14B-style: a second transformer switched at boundary_ratio 0.875",
        "ti2v": "Wan2.2 TI2V-5B-style: its VAE (16x spatial, 2x2 pixel patches) and per-token timesteps",
        "i2v": "image to video: Wan2.1 I2V-style (tiny CLIP), or with --two-experts Wan2.2 I2V-A14B-style",
    },
)
