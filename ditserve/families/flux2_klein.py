"""FLUX.2 [klein]: diffusers' Flux2KleinPipeline, our Flux2Transformer (the same DiT as FLUX.2 [dev], smaller, without
a guidance embedding; true CFG instead unless the folder is step-distilled).

The preset is the published black-forest-labs/FLUX.2-klein-4B folder: its transformer config (as diffusers'
conversion script writes it for klein-4b), AutoencoderKLFlux2 and the scheduler of FLUX.2 [dev], Qwen3-4B as
Qwen3ForCausalLM, and model_index.json's is_distilled = true (4 steps without CFG; klein-base folders say false).
"""

from __future__ import annotations

from ditserve.families.flux2 import FLUX2_SCHEDULER, FLUX2_TRANSFORMER_COMMON, FLUX2_VAE
from ditserve.registry import DiTSpec, ModelSpec, Preset

_KLEIN_4B_TRANSFORMER = {
    **FLUX2_TRANSFORMER_COMMON,
    "guidance_embeds": False,
    "joint_attention_dim": 7680,
    "num_attention_heads": 24,
    "num_layers": 5,
    "num_single_layers": 20,
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

SPEC = ModelSpec(
    family="flux2-klein",
    pipeline_classes=("Flux2KleinPipeline",),
    # Weight-bearing components in the order dummy weights are seeded (transformer seed, vae +1, text encoder +2).
    components={
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
        "text_encoder": ("transformers", "Qwen3ForCausalLM"),
        "tokenizer": ("transformers", "Qwen2TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    },
    dits=(DiTSpec("transformer", "ditserve.models.flux2:Flux2Transformer", "ditserve.models.flux2:map_diffusers_key"),),
    pipeline="ditserve.pipelines.flux2:Flux2KleinPipeline",
    code_tokenizers={"tokenizer": "ditserve.loader.tokenizers:qwen3_tokenizer"},
    lora_architecture="flux2",
    tasks=("text-to-image", "image-edit"),
    # Reference images: BFL's FLUX.2 [klein] takes up to 4.
    image_inputs=4,
    # diffusers' Flux2KleinPipeline.__call__ defaults. The distilled klein folders' model cards ask for 4 steps and
    # guidance_scale 1.0: pass them, or put them in the folder's ditserve.json.
    sampling_defaults={
        "num_inference_steps": 50,
        "guidance_scale": 4.0,
        "true_cfg_scale": 1.0,  # unused: klein's CFG scale is guidance_scale
        "max_sequence_length": 512,
    },
    max_sequence_length=512,
    presets=(
        Preset(
            name="flux.2-klein-4b",
            pipeline_class="Flux2KleinPipeline",
            configs={
                "transformer": _KLEIN_4B_TRANSFORMER,
                "vae": FLUX2_VAE,
                "text_encoder": _QWEN3_4B,
                "scheduler": FLUX2_SCHEDULER,
            },
            pipeline_config={"is_distilled": True},
        ),
    ),
)
