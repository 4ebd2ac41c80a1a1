"""Qwen-Image against diffusers on one tiny random folder: text encoding, the DiT (with a masked text), the whole
pipeline with and without true CFG, batching of prompts of different lengths, the key map and the presets. CPU,
float32; the folder and both pipelines are made once per session."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline
from diffusers import QwenImageTransformer2DModel

from ditserve.config import ConfigError, SamplingParams
from ditserve.layers.attention import attention, attention_reference
from ditserve.loader.folder import resolve_model
from ditserve.loader.weights import build_on_meta, load_checkpoint, materialize
from ditserve.models.qwenimage import QwenImageConfig, QwenImageTransformer, map_diffusers_key, to_diffusers_state_dict
from ditserve.pipelines.qwenimage import (
    PROMPT_TEMPLATE,
    TEMPLATE_TOKENS,
    QwenImagePipeline,
    TextBatch,
    diffusers_forward_inputs,
)


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory):
    from ditserve.tiny.qwenimage import make_tiny_qwenimage

    return make_tiny_qwenimage(tmp_path_factory.mktemp("tiny-qwenimage"))


@pytest.fixture(scope="session")
def ours(tiny_qwenimage):
    pipe = QwenImagePipeline.load(resolve_model(str(tiny_qwenimage)), torch.device("cpu"), torch.float32, "auto")
    assert type(pipe) is QwenImagePipeline and pipe.family == "qwen-image"
    return pipe


@pytest.fixture(scope="session")
def theirs(tiny_qwenimage):
    pipe = DiffusersQwenImagePipeline.from_pretrained(tiny_qwenimage)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mean_level_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def generate(pipe: QwenImagePipeline, seed: int, **kwargs):
    return pipe(pipe.resolve(SamplingParams(seed=seed, **kwargs))).images


def run_diffusers(pipe, seed: int, **kwargs):
    kwargs = {{"num_images": "num_images_per_prompt"}.get(k, k): v for k, v in kwargs.items()}
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


# ---- (a) text encoding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len", [512, 20])  # 20: the prompt's hidden states are cut, as diffusers cuts them
def test_encoding_matches_diffusers(ours, theirs, max_len):
    prompts = ["a red fox in the snow", "", "a red fox in the snow"]
    got = ours.encode_prompt(prompts, max_len)
    expected, mask = theirs.encode_prompt(prompts, device="cpu", max_sequence_length=max_len)
    lengths = [int(m.sum()) for m in mask] if mask is not None else [expected.shape[1]] * 3
    assert [g.shape[0] for g in got] == lengths
    # The empty prompt keeps the template's tokens but its first 34 (the real tokenizer's system prefix).
    template = len(ours.c.tokenizer(PROMPT_TEMPLATE.format("")).input_ids)
    assert got[1].shape[0] == min(max_len, template - TEMPLATE_TOKENS)
    for g, e in zip(got, expected):
        assert (g - e[: g.shape[0]]).abs().max().item() <= 1e-5


# ---- (b) the DiT -----------------------------------------------------------------------------------------------
def test_dit_matches_diffusers_with_masked_text(ours, theirs):
    # Two prompts of different lengths in one forward: the shorter one padded and masked, on a 4 × 6 token grid.
    inputs = ours.forward_inputs(32, 48, prompt="a red fox")
    other = ours.forward_inputs(32, 48, prompt="a much longer prompt about a forest of pines")
    text = TextBatch.stack([inputs["encoder_hidden_states"][0], other["encoder_hidden_states"][0]])
    assert text.mask is not None and not text.mask[0].all() and text.mask[1].all()
    g = torch.Generator().manual_seed(0)
    batch = dict(inputs, **ours.dit_inputs(text, [(8, 12)]))
    batch["hidden_states"] = torch.randn((2, *inputs["hidden_states"].shape[1:]), generator=g)
    batch["timestep"] = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        got = ours.c.transformer(**batch)
        expected = theirs.transformer(**diffusers_forward_inputs(batch), return_dict=False)[0]
        alone = ours.c.transformer(
            **dict(inputs, hidden_states=batch["hidden_states"][:1], timestep=batch["timestep"][:1])
        )
    assert got.shape == expected.shape == (2, 96, 16)
    assert expected.abs().max() > 1.0  # a real signal, not near-zero outputs that would pass anything
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got[:1] - alone).abs().max().item() <= 1e-4  # the padding changes nothing


def test_dit_matches_diffusers_other_shape_and_zero_cond_t():
    """A random model of another shape (4 heads of 16, Edit-2511's zero_cond_t with a reference image of another
    size after the noisy one): every parameter random, also those diffusers initialises to zero or one."""
    config = dict(patch_size=2, in_channels=32, out_channels=8, num_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=24, axes_dims_rope=[4, 6, 6], zero_cond_t=True)  # fmt: skip
    torch.manual_seed(5)
    ref = QwenImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    model = materialize(
        build_on_meta(lambda: QwenImageTransformer(QwenImageConfig.from_dict(config)), torch.float32), "cpu"
    )
    load_checkpoint(model, iter(ref.state_dict().items()), map_diffusers_key)
    from ditserve.pipelines.qwenimage import image_position_ids, text_position_ids

    g = torch.Generator().manual_seed(1)
    grids = [(3, 5), (4, 2)]
    img_ids = image_position_ids(grids, torch.device("cpu"))
    inputs = dict(
        hidden_states=torch.randn(1, 23, 32, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 24, generator=g),
        timestep=torch.tensor([0.6]),
        img_ids=img_ids,
        txt_ids=text_position_ids(grids, 7, torch.device("cpu")),
        text_mask=None,
        reference_tokens=img_ids[:, 0] > 0,
    )
    with torch.no_grad():
        got = model.eval()(**inputs)
        expected = ref(**diffusers_forward_inputs(inputs), return_dict=False)[0]
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4


def test_attention_key_mask_equals_attention_over_the_kept_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3:5] = False
    got = attention(q, k, v, "sdpa", key_mask=mask)
    kept = mask[0].nonzero().squeeze(1)
    assert torch.allclose(got[0], attention(q[:1], k[:1, kept], v[:1, kept])[0], atol=1e-6)
    assert torch.allclose(got[1], attention(q[1:], k[1:], v[1:])[0], atol=1e-6)
    assert torch.allclose(got, attention_reference(q, k, v, mask), atol=1e-6)


def test_sharding_declaration_names_forward_inputs():
    names = set(inspect.signature(QwenImageTransformer.forward).parameters) - {"self"}
    declared = QwenImageTransformer.sequence_sharding
    assert set(declared.inputs) <= names and set(declared.key_masks.values()) <= set(declared.inputs)
    model = build_on_meta(lambda: QwenImageTransformer(QwenImageConfig(num_layers=2)), torch.float32)
    assert model.repeated_blocks() == list(model.transformer_blocks)


# ---- (c) the whole pipeline ------------------------------------------------------------------------------------
CASES = {
    "no_cfg": dict(prompt="a red fox", height=32, width=48, num_inference_steps=3),
    "true_cfg": dict(prompt="a cat", negative_prompt="blurry", height=32, width=32, num_inference_steps=3),
    # Prompts of different lengths in one batch (masked text); diffusers' pipeline breaks on several prompts with
    # several images each, so the two are separate cases.
    "true_cfg_two_prompts": dict(
        prompt=["a red fox", "a cat on a long red sofa in a sunny room"],
        negative_prompt=" ",
        true_cfg_scale=2.5,
        height=32,
        width=32,
        num_inference_steps=2,
    ),
    "two_images": dict(prompt="two dogs", num_images=2, height=32, width=32, num_inference_steps=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_match_diffusers(case, ours, theirs):
    kwargs = CASES[case]
    got = generate(ours, 11, **kwargs)
    expected = run_diffusers(theirs, 11, **kwargs)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.size == b.size
        assert np.asarray(a).std() > 5  # a real picture, not a flat one that would match anything
        assert mean_level_difference(a, b) <= 1.0


def test_latents_match_diffusers(ours, theirs):
    kwargs = dict(
        prompt="x", negative_prompt="blurry", height=32, width=32, num_inference_steps=3, output_type="latent"
    )
    got = generate(ours, 4, **kwargs)[0]
    expected = run_diffusers(theirs, 4, **kwargs)[0]
    assert got.shape == expected.shape == (64, 16)
    assert (got - expected).abs().max().item() < 1e-4


def test_defaults_are_diffusers(ours):
    p = ours.resolve(SamplingParams(prompt="x"))
    assert (p.height, p.width, p.num_inference_steps, p.true_cfg_scale, p.max_sequence_length) == (
        256,
        256,
        50,
        4.0,
        512,
    )
    assert ours.spatial_multiple == 4 and ours.max_sequence_length_limit == 1024 and not ours.uses_cfg(p)
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(prompt="x", guidance_scale=3.0))
    assert info.value.field == "guidance_scale"
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(prompt="x", images=[np.zeros((8, 8, 3), np.uint8)]))
    assert info.value.field == "images"


# ---- (d) batching ----------------------------------------------------------------------------------------------
def test_batch_of_different_prompt_lengths_equals_each_alone(ours):
    prompts = ["", "a lighthouse on a cliff at dusk, waves", "a small boat"]
    common = dict(height=32, width=32, num_inference_steps=2, true_cfg_scale=2.0, output_type="np")
    requests = [
        ours.resolve(SamplingParams(prompt=p, seed=i, negative_prompt="dark" * i, **common))
        for i, p in enumerate(prompts)
    ]
    batched = ours.run_batch(requests)
    for request, out in zip(requests, batched):
        alone = ours(request).images[0]
        assert np.abs(out.images[0] - alone).max() < 1e-5
        assert out.timings["batch_size"] == 3


# ---- (e) the key map and the presets -----------------------------------------------------------------------------
def test_key_map_covers_diffusers_and_round_trips(ours, theirs):
    expected = theirs.transformer.state_dict()
    assert all(map_diffusers_key(name) is not None for name in expected)
    assert map_diffusers_key("time_text_embed.addition_t_embedding.weight") == ("addition_t_embedding", None)
    assert map_diffusers_key("pos_embed.pos_freqs") is None
    back = to_diffusers_state_dict(ours.c.transformer)
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_diffusers_pipeline_shares_our_weights(ours):
    pipe = ours.diffusers_pipeline()
    ours_storage = {p.untyped_storage().data_ptr() for p in ours.c.transformer.parameters()}
    assert all(p.untyped_storage().data_ptr() in ours_storage for p in pipe.transformer.parameters())
    kwargs = dict(prompt="a red fox", height=32, width=32, num_inference_steps=2)
    assert mean_level_difference(generate(ours, 2, **kwargs)[0], run_diffusers(pipe, 2, **kwargs)[0]) <= 1.0


@pytest.mark.parametrize("name", ["qwen-image", "qwen-image-2512", "qwen-image-edit-2511", "qwen-image-layered"])
def test_presets_build_diffusers_architecture(name):
    """The presets at full size, on the meta device: our DiT holds exactly diffusers' tensors (20B; Edit-2511's and
    Layered's variants too), the text encoder's config is Qwen2.5-VL-7B's."""
    from transformers import Qwen2_5_VLConfig

    from ditserve.registry import get_preset

    spec, preset = get_preset(name)
    text = Qwen2_5_VLConfig.from_dict(preset.configs["text_encoder"])
    assert spec.family.startswith("qwen-image") and text.text_config.hidden_size == 3584
    assert text.vision_config.depth == 32
    config = preset.configs["transformer"]
    ours = build_on_meta(lambda: QwenImageTransformer.from_config(config), torch.bfloat16)
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel.from_config(config)
    expected = {name: t.shape for name, t in ref.state_dict().items()}
    assert {name: t.shape for name, t in to_diffusers_state_dict(ours).items()} == expected
    assert 20.0e9 < sum(p.numel() for p in ours.parameters()) < 20.6e9  # "20B parameters"


def test_fp8_linears_take_their_inputs_quantised_by_norms_and_gelu(ours):
    from fp8_wiring import check_producers_quantize_for_fp8_linears

    inputs = ours.forward_inputs(32, 48, prompt="a red fox")
    consumers = [
        f"transformer_blocks.0.{name}" for name in ("img_attn.qkv", "txt_attn.qkv", "img_mlp.fc1", "img_mlp.fc2")
    ]
    consumers += ["transformer_blocks.0.txt_mlp.fc1", "transformer_blocks.0.txt_mlp.fc2"]
    check_producers_quantize_for_fp8_linears(ours.c.transformer, inputs, consumers)


def test_qk_norms_write_q_and_k_in_fp8_for_cudnn_fp8(ours):
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads

    inputs = ours.forward_inputs(32, 48, prompt="a red fox")
    check_norms_write_fp8_heads(ours.c.transformer, inputs, [FP8_HEADS] * len(ours.c.transformer.transformer_blocks))


@pytest.mark.gpu
def test_qk_norms_hand_cudnn_fp8_e4m3_on_the_gpu(ours):
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads_on_cuda

    inputs = ours.forward_inputs(32, 48, prompt="a red fox")
    blocks = len(ours.c.transformer.transformer_blocks)
    check_norms_write_fp8_heads_on_cuda(ours.c.transformer, inputs, [FP8_HEADS] * blocks)
