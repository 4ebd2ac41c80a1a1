"""Qwen-Image-Layered (diffusers' QwenImageLayeredPipeline) against diffusers on one tiny random folder: an RGBA
image decomposed into two RGBA layers with true CFG; its settings and bad input refused by field. CPU, float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.config import ConfigError, SamplingParams
from ditserve.loader.folder import resolve_model
from ditserve.pipelines.qwenimage import QwenImageLayeredPipeline
from ditserve.utils.media import encode_image


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    from ditserve.tiny.qwenimage import make_tiny_qwenimage_layered_folder

    folder = make_tiny_qwenimage_layered_folder(tmp_path_factory.mktemp("tiny-qwenimage-layered"))
    pipe = QwenImageLayeredPipeline.load(resolve_model(str(folder)), torch.device("cpu"), torch.float32, "auto")
    assert pipe.family == "qwen-image-layered"
    return pipe


def rgba_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA")


def test_layers_match_diffusers(ours):
    image = rgba_image()
    kwargs = dict(prompt="a cat on a sofa", negative_prompt=" ", num_inference_steps=2)
    params = ours.resolve(SamplingParams(seed=3, images=[image], options={"layers": 2}, **kwargs))
    assert (params.height, params.width) == (544, 768)  # about 640² at the input's 7:5
    got = ours(params).images
    expected = ours.diffusers_pipeline()(image=image, layers=2, generator=torch.Generator().manual_seed(3), **kwargs)
    expected = expected.images[0]
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert a.mode == b.mode == "RGBA" and a.size == b.size == (768, 544)
        assert np.asarray(a).std() > 5
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() <= 1.0
    assert encode_image(got[0], "png")[:4] == b"\x89PNG" and encode_image(got[0], "jpeg")[:2] == b"\xff\xd8"


def test_without_a_prompt_the_image_is_captioned_as_diffusers_does(ours, monkeypatch):
    """No prompt: the VL encoder captions the resized image with the model's captioning prompt (Chinese by
    default, English with options.use_en_prompt), and the layers are diffusers' for the same empty prompt."""
    from ditserve.pipelines.qwenimage import CAPTION_PROMPTS

    image = rgba_image(1)
    theirs = ours.diffusers_pipeline()  # on our components: one text encoder, one generation config
    # The random encoder ends its answer at once; a few words first make the caption something to compare.
    monkeypatch.setattr(ours.c.text_encoder.generation_config, "min_new_tokens", 8)
    assert {"cn": theirs.image_caption_prompt_cn, "en": theirs.image_caption_prompt_en} == CAPTION_PROMPTS
    params = ours.resolve(SamplingParams(seed=4, images=[image], num_inference_steps=2, options={"layers": 1}))
    resized = theirs.image_processor.resize(image, 544, 768)
    assert params.prompt == theirs.get_image_caption(resized, use_en_prompt=False, device="cpu") != ""
    english = ours.resolve(
        SamplingParams(prompt="", seed=4, images=[image], num_inference_steps=2, options={"use_en_prompt": True})
    )
    assert english.prompt == theirs.get_image_caption(resized, use_en_prompt=True, device="cpu")
    got = ours(params).images
    expected = theirs(
        image=image, prompt="", layers=1, num_inference_steps=2, generator=torch.Generator().manual_seed(4)
    )
    (a,), (b,) = got, expected.images[0]
    assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() <= 1.0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(prompt=["a cat", " "]), "prompt"),
        (dict(options={"use_en_prompt": 1}), "options.use_en_prompt"),
        (dict(height=512), "height"),
        (dict(images=[]), "images"),
        (dict(options={"resolution": 800}), "options.resolution"),
        (dict(options={"layers": 0}), "options.layers"),
        (dict(options={"cfg_normalize": "yes"}), "options.cfg_normalize"),
    ],
)
def test_bad_settings_are_refused_by_field(ours, changes, field):
    request = {"prompt": "a cat", "images": [rgba_image()], **changes}
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(**request))
    assert info.value.field == field
