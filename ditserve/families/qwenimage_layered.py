"""Qwen-Image-Layered (diffusers' QwenImageLayeredPipeline): one RGBA image decomposed into RGBA layers, by our
QwenImageTransformer with its 3-D RoPE over the layers and the additional timestep embedding.

The preset's configs are those of the published Qwen/Qwen-Image-Layered folder: Qwen-Image's transformer with
use_layer3d_rope and use_additional_t_cond, the Qwen-Image VAE taking four channels (RGBA), Qwen2.5-VL-7B and the
flow-matching scheduler. The folder's Qwen2-VL `processor` (diffusers captions the image with it when no prompt is
given) is not a component here: a request brings its prompt.
"""

from __future__ import annotations

from ditserve.families.qwenimage import (
    QWEN2_5_VL_7B,
    QWEN_IMAGE_SCHEDULER,
    QWEN_IMAGE_TRANSFORMER,
    QWEN_IMAGE_VAE,
)
from ditserve.registry import DiTSpec, ModelSpec, Preset

_LAYERED = {
    "transformer": {**QWEN_IMAGE_TRANSFORMER, "use_additional_t_cond": True, "use_layer3d_rope": True},
    "vae": {**QWEN_IMAGE_VAE, "input_channels": 4},
    "text_encoder": QWEN2_5_VL_7B,
    "scheduler": QWEN_IMAGE_SCHEDULER,
}

SPEC = ModelSpec(
    family="qwen-image-layered",
    pipeline_classes=("QwenImageLayeredPipeline",),
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
    pipeline="ditserve.pipelines.qwenimage:QwenImageLayeredPipeline",
    code_tokenizers={"tokenizer": "ditserve.loader.tokenizers:qwen2_5_vl_tokenizer"},
    lora_architecture="qwen-image",
    tasks=("image-edit",),  # the server's edits route: one image in, its layers out
    image_inputs=1,
    # diffusers' __call__ defaults; the size follows the input image at `resolution`.
    sampling_defaults={"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_sequence_length": 512},
    max_sequence_length=1024,
    # diffusers' QwenImageLayeredPipeline settings that SamplingParams has no field for: the layers to make, the
    # resolution bucket (640 or 1024) and whether the guided prediction is rescaled to the positive's norm.
    sampling_options={"layers": 4, "resolution": 640, "cfg_normalize": False, "use_en_prompt": False},
    presets=(Preset(name="qwen-image-layered", pipeline_class="QwenImageLayeredPipeline", configs=_LAYERED),),
    make_tiny="ditserve.tiny.qwenimage:make_tiny_qwenimage_layered_folder",
)
