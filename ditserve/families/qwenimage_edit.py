"""Qwen-Image-Edit (diffusers' QwenImageEditPipeline) and Qwen-Image-Edit-2509 / -2511 (QwenImageEditPlusPipeline):
our QwenImageTransformer with the input images' latents beside the noise, and the images seen by the VL encoder.

The presets' configs are those of the published Qwen/Qwen-Image-Edit, Qwen-Image-Edit-2509 and Qwen-Image-Edit-2511
folders: Qwen-Image's components (2511's transformer with zero_cond_t: its reference tokens are modulated as at
t = 0). The folders' Qwen2-VL `processor` is not a component here: the pipeline reads its image settings from the
folder's processor/preprocessor_config.json and tokenizes with the `tokenizer` (the same files).
"""

from __future__ import annotations

from ditserve.families.qwenimage import (
    QWEN2_5_VL_7B,
    QWEN_IMAGE_SCHEDULER,
    QWEN_IMAGE_TRANSFORMER,
    QWEN_IMAGE_VAE,
)
from ditserve.registry import DiTSpec, ModelSpec, Preset

_EDIT = {
    "transformer": QWEN_IMAGE_TRANSFORMER,
    "vae": QWEN_IMAGE_VAE,
    "text_encoder": QWEN2_5_VL_7B,
    "scheduler": QWEN_IMAGE_SCHEDULER,
}
_EDIT_2511 = {**_EDIT, "transformer": {**QWEN_IMAGE_TRANSFORMER, "zero_cond_t": True}}
# A preset's model_index.json is the spec's with its pipeline config over it: the Plus presets name their class.
_PLUS = {"_class_name": "QwenImageEditPlusPipeline"}

SPEC = ModelSpec(
    family="qwen-image-edit",
    pipeline_classes=("QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
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
    pipeline="ditserve.pipelines.qwenimage:QwenImageEditPipeline",
    code_tokenizers={"tokenizer": "ditserve.loader.tokenizers:qwen2_5_vl_tokenizer"},
    lora_architecture="qwen-image",
    tasks=("image-edit",),
    image_inputs=3,  # Edit takes one (its pipeline refuses more), 2509 and 2511 one to three
    # diffusers' __call__ defaults; the size comes from the (first or last) input image.
    sampling_defaults={"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_sequence_length": 512},
    max_sequence_length=1024,
    presets=(
        Preset(name="qwen-image-edit", pipeline_class="QwenImageEditPipeline", configs=_EDIT),
        Preset("qwen-image-edit-2509", "QwenImageEditPlusPipeline", configs=_EDIT, pipeline_config=_PLUS),
        Preset("qwen-image-edit-2511", "QwenImageEditPlusPipeline", configs=_EDIT_2511, pipeline_config=_PLUS),
    ),
    make_tiny="ditserve.tiny.qwenimage:make_tiny_qwenimage_edit_folder",
    make_tiny_options={"zero_cond_t": "Edit-2511's modulation of the reference image tokens"},
)
