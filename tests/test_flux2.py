"""FLUX.2 [dev] and [klein] against diffusers on tiny random folders: text encoding, the DiT, the whole pipeline,
reference images (multi-reference editing), the key map, bad input refused by name, and the LoRA namings. CPU,
float32; each folder and its pipelines are made once per module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.config import ConfigError, SamplingParams
from ditserve.loader.folder import resolve_model
from ditserve.pipelines.flux2 import Flux2KleinPipeline, Flux2Pipeline
from ditserve.registry import load_object
from ditserve.tiny.flux2 import TinyFlux2Spec, make_tiny_flux2

REQUEST = dict(prompt="a red fox in the snow", height=32, width=48, num_inference_steps=3, max_sequence_length=24)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return make_tiny_flux2(tmp_path_factory.mktemp("tiny-flux2"), TinyFlux2Spec(seed=3))


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    return make_tiny_flux2(tmp_path_factory.mktemp("tiny-flux2-klein"), TinyFlux2Spec(klein=True, seed=4))


def load(folder):
    source = resolve_model(str(folder))
    return load_object(source.spec.pipeline).load(source, torch.device("cpu"), torch.float32, "auto")


@pytest.fixture(scope="module")
def dev(dev_folder):
    pipe = load(dev_folder)
    assert type(pipe) is Flux2Pipeline and pipe.family == "flux2"
    return pipe


@pytest.fixture(scope="module")
def klein(klein_folder):
    pipe = load(klein_folder)
    assert type(pipe) is Flux2KleinPipeline and pipe.family == "flux2-klein"
    return pipe


def mean_level_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def ours_and_theirs(pipe, seed: int = 5, **kwargs):
    ours = pipe(pipe.resolve(SamplingParams(seed=seed, **kwargs))).images
    images = kwargs.pop("images", None)
    if images is not None:  # diffusers takes PIL images only
        images = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    num = kwargs.pop("num_images", 1)
    theirs = pipe.diffusers_pipeline()(
        image=images, num_images_per_prompt=num, generator=torch.Generator("cpu").manual_seed(seed), **kwargs
    ).images
    return ours, theirs


def reference_images() -> list:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)),  # cropped to 72 × 96 (multiples of 8)
        rng.integers(0, 256, (64, 68, 3), dtype=np.uint8),  # an array; cropped to 64 × 64
    ]


# ---- text encoding and the DiT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_text_embeddings_match_diffusers(variant, request):
    pipe = request.getfixturevalue(variant)
    prompts = ["a red fox", "a much longer prompt about [IMG] a red fox", "a red fox"]
    ours = pipe.encode_prompt(prompts, 24)
    with torch.no_grad():
        theirs = pipe.diffusers_pipeline().encode_prompt(
            prompts, device="cpu", max_sequence_length=24, text_encoder_out_layers=pipe.text_encoder_out_layers
        )[0]
    assert ours.shape == (3, 24, pipe.c.transformer.config.joint_attention_dim)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_dit_matches_diffusers_and_key_map_round_trips(dev, dev_folder):
    from safetensors.torch import load_file

    from ditserve.models.flux2 import to_diffusers_state_dict

    inputs = dev.forward_inputs(32, 48)
    with torch.no_grad():
        ours = dev.c.transformer(**inputs)
        theirs = dev.diffusers_pipeline().transformer(**dev.diffusers_forward_inputs(inputs), return_dict=False)[0]
    assert ours.shape == (1, 24, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    saved = load_file(str(dev_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    mapped = to_diffusers_state_dict(dev.c.transformer)
    assert set(mapped) == set(saved)
    assert all(torch.equal(mapped[k], saved[k]) for k in saved)


# ---- whole pipelines -------------------------------------------------------------------------------------------
def test_dev_pipeline_matches_diffusers(dev):
    ours, theirs = ours_and_theirs(dev, guidance_scale=3.0, num_images=2, **REQUEST)
    assert len(ours) == 2 and ours[0].size == theirs[0].size == (48, 32)
    assert np.asarray(ours[0]).std() > 10  # a picture, not a flat field
    assert max(mean_level_difference(a, b) for a, b in zip(ours, theirs)) <= 1


def test_klein_true_cfg_matches_diffusers(klein):
    ours, theirs = ours_and_theirs(klein, guidance_scale=4.0, **REQUEST)
    assert mean_level_difference(ours[0], theirs[0]) <= 1
    latents = {
        scale: klein(klein.resolve(SamplingParams(seed=5, guidance_scale=scale, output_type="latent", **REQUEST)))
        for scale in (1.0, 4.0)
    }
    assert (latents[1.0].images[0] - latents[4.0].images[0]).abs().max() > 1e-2  # CFG is on at 4.0


@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_reference_images_match_diffusers(variant, request):
    """Two reference images (a PIL image and an array); no size given: the output takes the first one's."""
    pipe = request.getfixturevalue(variant)
    images = reference_images()
    kwargs = {k: v for k, v in REQUEST.items() if k not in ("height", "width")}
    ours, theirs = ours_and_theirs(pipe, images=images, **kwargs)
    assert ours[0].size == theirs[0].size == (96, 72)
    assert mean_level_difference(ours[0], theirs[0]) <= 1
    plain = pipe(pipe.resolve(SamplingParams(seed=5, height=72, width=96, output_type="latent", **kwargs)))
    edited = pipe(pipe.resolve(SamplingParams(seed=5, images=images, output_type="latent", **kwargs)))
    assert (plain.images[0] - edited.images[0]).abs().max() > 1e-2  # the references change the picture


# ---- bad input, refused naming the field -------------------------------------------------------------------------
def test_bad_reference_images_are_refused_by_name(dev, klein, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    small = np.zeros((32, 80, 3), dtype=np.uint8)
    narrow = np.zeros((64, 600, 3), dtype=np.uint8)
    for images, words in (
        ([str(broken)], "cannot read"),
        ([small], "at least 64"),
        ([narrow], "aspect ratio"),
        ([np.zeros((64, 64, 3), dtype=np.uint8)] * 5, "at most 4"),
    ):
        with pytest.raises(ConfigError, match=words) as info:
            klein.resolve(SamplingParams(prompt="x", images=images))
        assert info.value.field == "images"
    with pytest.raises(ConfigError) as info:
        dev.resolve(SamplingParams(prompt="x", negative_prompt="blur"))
    assert info.value.field == "negative_prompt"
    with pytest.raises(ConfigError) as info:
        klein.resolve(SamplingParams(prompt="x", true_cfg_scale=3.0))
    assert info.value.field == "true_cfg_scale"
    with pytest.raises(ConfigError) as info:
        dev.resolve(SamplingParams(prompt="x", height=8192))
    assert info.value.field == "height"


# ---- LoRA namings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["diffusion_model.", "lora_unet_"])
def test_bfl_names_convert_to_diffusers_modules(prefix):
    """BFL's FLUX.2 names (ComfyUI's `diffusion_model.`, kohya's flattened `lora_unet_`): a fused qkv covers to_q,
    to_k, to_v; linear1 is the single block's whole projection; the final modulation's halves swap."""
    from ditserve.lora import convert

    def pair(module: str, out: int, inp: int) -> dict:
        name = module.replace(".", "_") if prefix == "lora_unet_" else module
        return {f"{prefix}{name}.lora_down.weight": torch.randn(4, inp), f"{prefix}{name}.lora_up.weight": up(out)}

    def up(out: int) -> torch.Tensor:
        return torch.arange(out * 4, dtype=torch.float32).reshape(out, 4)

    tensors = {
        **pair("double_blocks.1.txt_attn.qkv", 96, 32),
        **pair("double_blocks.0.img_mlp.0", 192, 32),
        **pair("single_blocks.1.linear1", 288, 32),
        **pair("double_stream_modulation_img.lin", 192, 32),
        **pair("final_layer.adaLN_modulation.1", 64, 32),
    }
    lora = convert(tensors, prefer_architecture="flux2")
    assert lora.architecture == "flux2"
    by_target = {m.targets: m for m in lora.modules}
    assert set(by_target) == {
        tuple(f"transformer_blocks.1.attn.add_{x}_proj" for x in "qkv"),
        ("transformer_blocks.0.ff.linear_in",),
        ("single_transformer_blocks.1.attn.to_qkv_mlp_proj",),
        ("double_stream_modulation_img.linear",),
        ("norm_out.linear",),
    }
    swapped = by_target[("norm_out.linear",)].up
    assert torch.equal(swapped, torch.cat([up(64)[32:], up(64)[:32]]))


def test_fp8_linears_take_their_inputs_quantised_by_norms(dev):
    from fp8_wiring import check_producers_quantize_for_fp8_linears

    consumers = [f"double_blocks.0.{name}" for name in ("img_attn.qkv", "txt_attn.qkv", "img_mlp.w13", "txt_mlp.w13")]
    check_producers_quantize_for_fp8_linears(
        dev.c.transformer, dev.forward_inputs(32, 48), [*consumers, "single_blocks.0.qkv_mlp"]
    )


def test_qk_norms_write_q_and_k_in_fp8_for_cudnn_fp8(dev):
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads

    dit = dev.c.transformer
    check_norms_write_fp8_heads(
        dit, dev.forward_inputs(32, 48), [FP8_HEADS] * (len(dit.double_blocks) + len(dit.single_blocks))
    )


@pytest.mark.gpu
def test_qk_norms_hand_cudnn_fp8_e4m3_on_the_gpu(dev):
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads_on_cuda

    dit = dev.c.transformer
    check_norms_write_fp8_heads_on_cuda(
        dit, dev.forward_inputs(32, 48), [FP8_HEADS] * (len(dit.double_blocks) + len(dit.single_blocks))
    )
