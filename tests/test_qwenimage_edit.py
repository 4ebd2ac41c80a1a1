"""Qwen-Image-Edit-2509 (diffusers' QwenImageEditPlusPipeline) against diffusers on one tiny random folder: two
input images through the VL encoder and the VAE, true CFG; the output size from the input; bad input refused by
field. CPU, float32. The pipelines' VAE sees every input at about 1024² pixels (fixed by diffusers), which makes
each run several seconds on the CPU: one end-to-end comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.config import ConfigError, SamplingParams
from ditserve.loader.folder import resolve_model
from ditserve.pipelines.qwenimage import QwenImageEditPipeline, vl_inputs


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    from ditserve.tiny.qwenimage import make_tiny_qwenimage_edit_folder

    folder = make_tiny_qwenimage_edit_folder(tmp_path_factory.mktemp("tiny-qwenimage-edit"))
    pipe = QwenImageEditPipeline.load(resolve_model(str(folder)), torch.device("cpu"), torch.float32, "auto")
    assert pipe.family == "qwen-image-edit" and pipe.plus
    return pipe


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_two_images_with_true_cfg_match_diffusers(ours):
    images = [noise_image(64, 48, 0), noise_image(40, 40, 1)]
    kwargs = dict(prompt="make the sky red", negative_prompt=" ", height=64, width=48, num_inference_steps=2)
    got = ours(ours.resolve(SamplingParams(seed=5, images=images, **kwargs))).images[0]
    theirs = ours.diffusers_pipeline()
    expected = theirs(image=images, generator=torch.Generator("cpu").manual_seed(5), **kwargs).images[0]
    assert got.size == expected.size == (48, 64)
    assert np.asarray(got).std() > 5
    assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).mean() <= 1.0


def test_output_size_from_the_last_image_and_bad_input_refused(ours, tmp_path):
    wide, tall = noise_image(64, 32, 0), noise_image(30, 60, 1)
    params = ours.resolve(SamplingParams(prompt="x", images=[tall, wide]))
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    width, height = calculate_dimensions(1024 * 1024, 2.0)  # the last image's ratio, floored to multiples of 16
    assert (params.height, params.width) == (height // 16 * 16, width // 16 * 16) == (736, 1440)
    for images, needle in (([], "at least one"), ([wide] * 4, "at most 3"), ([str(tmp_path / "none.png")], "read")):
        with pytest.raises(ConfigError, match=needle) as info:
            ours.resolve(SamplingParams(prompt="x", images=images))
        assert info.value.field == "images"


def test_vl_inputs_expand_each_image_marker_by_its_merged_patches(ours):
    text = (
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
    )
    inputs = vl_inputs(
        ours.c.tokenizer, ours.vl_image_processor, [text], [noise_image(56, 112, 0), noise_image(56, 56, 1)]
    )
    pad = ours.c.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 4], [1, 4, 4]]  # 14-pixel patches
    assert int((inputs["input_ids"] == pad).sum()) == 8 * 4 // 4 + 4 * 4 // 4  # merged 2×2
