"""Z-Image against diffusers on one tiny random folder: text encoding, the DiT, the whole pipeline, batching and the
key map. CPU, float32; the folder, both pipelines and diffusers' pipeline are made once per session."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline as DiffusersZImagePipeline
from diffusers import ZImageTransformer2DModel

from ditserve.config import ConfigError, SamplingParams
from ditserve.layers.attention import Attention
from ditserve.loader.folder import resolve_model
from ditserve.loader.tokenizers import qwen3_tokenizer
from ditserve.loader.weights import build_on_meta, load_checkpoint, materialize
from ditserve.models.zimage import ZImageConfig, ZImageTransformer, map_diffusers_key, to_diffusers_state_dict
from ditserve.pipelines.zimage import ZImagePipeline, diffusers_forward_inputs, unpatchify


@pytest.fixture(scope="session")
def ours(tiny_zimage):
    pipe = ZImagePipeline.load(resolve_model(str(tiny_zimage)), torch.device("cpu"), torch.float32, "auto")
    assert type(pipe) is ZImagePipeline and pipe.family == "zimage"
    return pipe


@pytest.fixture(scope="session")
def theirs(tiny_zimage):
    pipe = DiffusersZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mean_level_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def generate(pipe: ZImagePipeline, seed: int, **kwargs):
    options = {k: kwargs.pop(k) for k in ("cfg_normalization", "cfg_truncation") if k in kwargs}
    params = SamplingParams(seed=seed, options=options, **kwargs)
    return pipe(pipe.resolve(params)).images


DIFFUSERS_NAMES = {"num_images": "num_images_per_prompt"}


def run_diffusers(pipe, seed: int, **kwargs):
    kwargs = {DIFFUSERS_NAMES.get(k, k): v for k, v in kwargs.items()}
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


# ---- (a) text encoding -----------------------------------------------------------------------------------------
def test_chat_template_renders_like_qwen3():
    tok = qwen3_tokenizer()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert rendered == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(rendered).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.convert_ids_to_tokens(ids[-1]) == "Ċ"
    assert (tok.pad_token, tok.eos_token, tok.padding_side) == ("<|endoftext|>", "<|im_end|>", "right")


@pytest.mark.parametrize("max_len", [512, 24])  # 24: the chat-formatted prompt is truncated
def test_encoding_matches_diffusers(ours, theirs, max_len):
    prompts = ["a red fox in the snow", "", "a red fox in the snow"]
    got = ours.encode_prompt(prompts, max_len)
    expected, _ = theirs.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_len
    )
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert got[0].shape[0] == min(max_len, 40) and got[1].shape[0] == 19  # 19: the chat template's own tokens
    for g, e in zip(got, expected):
        assert (g - e).abs().max().item() <= 1e-5


# ---- (b) the DiT -----------------------------------------------------------------------------------------------
def test_dit_matches_diffusers_with_padding(ours, theirs):
    # 40×56 pixels: 20×28 latents, 10×14 = 140 patch tokens (padded to 160); captions of 28 and 23 tokens share
    # the padded length 32, so one forward holds both, each with its own pads.
    inputs = ours.forward_inputs(40, 56, prompt="a red fox")
    other = ours.forward_inputs(40, 56, prompt="tree")
    assert other["caption_pad"].sum() > inputs["caption_pad"].sum() > 0 and inputs["image_pad"].sum() == 20
    g = torch.Generator().manual_seed(0)
    batch = dict(inputs)
    batch["image_tokens"] = torch.randn((2, *inputs["image_tokens"].shape[1:]), generator=g)
    batch["timestep"] = torch.tensor([0.3, 0.8])
    batch["caption_feats"] = torch.cat([inputs["caption_feats"], other["caption_feats"]])
    batch["caption_pad"] = torch.cat([inputs["caption_pad"], other["caption_pad"]])
    with torch.no_grad():
        got = unpatchify(ours.c.transformer(**batch), 20, 28, 2)
        expected = torch.stack(theirs.transformer(**diffusers_forward_inputs(batch, ours.c.transformer.config))[0])
    expected = expected.squeeze(2)
    assert got.shape == expected.shape == (2, 4, 20, 28)
    assert expected.abs().max() > 1.0  # a real signal, not near-zero outputs that would pass anything
    assert (got - expected).abs().max().item() <= 1e-4


def test_dit_matches_diffusers_other_shape():
    """A random model of another shape (4 heads of 16, two refiner layers, a wider patch): every parameter random,
    also those diffusers initialises to zero or one."""
    config = dict(
        all_patch_size=[2], all_f_patch_size=[1], in_channels=8, dim=64, n_layers=1, n_refiner_layers=2, n_heads=4,
        n_kv_heads=4, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )  # fmt: skip
    torch.manual_seed(5)
    ref = ZImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    model = materialize(build_on_meta(lambda: ZImageTransformer(ZImageConfig.from_dict(config)), torch.float32), "cpu")
    load_checkpoint(model, iter(ref.state_dict().items()), map_diffusers_key)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 8, 6, 10, generator=g)  # 15 tokens, padded to 32
    caption = torch.randn(37, 24, generator=g)  # padded to 64
    from ditserve.pipelines.zimage import caption_groups, image_pad_mask, pad_tokens, patchify

    group = caption_groups([caption], 3, 5)[0]
    inputs = dict(
        image_tokens=pad_tokens(patchify(latents, 2), 32),
        timestep=torch.tensor([0.6]),
        image_pad=image_pad_mask(15, torch.device("cpu")),
        **group.inputs,
    )
    with torch.no_grad():
        got = unpatchify(model.eval()(**inputs), 6, 10, 2)
        expected = ref(**diffusers_forward_inputs(inputs, model.config))[0][0].squeeze(1)
    assert expected.abs().max() > 1.0
    assert (got[0] - expected).abs().max().item() <= 1e-4


def test_qk_norms_write_q_and_k_in_fp8_for_cudnn_fp8(ours):
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads

    from ditserve.layers.attention import Attention

    dit = ours.c.transformer
    attentions = sum(isinstance(m, Attention) for m in dit.modules())
    check_norms_write_fp8_heads(dit, ours.forward_inputs(40, 56, prompt="a red fox"), [FP8_HEADS] * attentions)


@pytest.mark.gpu
def test_qk_norms_hand_cudnn_fp8_e4m3_on_the_gpu(ours):
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads_on_cuda

    from ditserve.layers.attention import Attention

    dit = ours.c.transformer
    attentions = sum(isinstance(m, Attention) for m in dit.modules())
    check_norms_write_fp8_heads_on_cuda(dit, ours.forward_inputs(40, 56, prompt="a red fox"), [FP8_HEADS] * attentions)


def test_sharding_declaration_names_forward_inputs():
    names = set(inspect.signature(ZImageTransformer.forward).parameters) - {"self"}
    declared = ZImageTransformer.sequence_sharding
    assert set(declared.inputs) <= names
    model = build_on_meta(
        lambda: ZImageTransformer(ZImageConfig(dim=64, n_heads=2, axes_dims=(8, 12, 12))), torch.float32
    )
    kinds = {
        (type(b).__name__, next(m for m in b.modules() if isinstance(m, Attention)).segments)
        for b in model.repeated_blocks()
    }
    assert kinds == {("ZImageBlock", ("image",)), ("ZImageBlock", ("text",)), ("ZImageBlock", ("image", "text"))}
    assert model.repeated_blocks()[0] is model.noise_refiner[0] and model.repeated_blocks()[-1] is model.layers[-1]


# ---- (c) the whole pipeline ------------------------------------------------------------------------------------
CASES = {
    "turbo_no_cfg": dict(prompt="a red fox", height=48, width=64, num_inference_steps=4, guidance_scale=0.0),
    "cfg_default_negative": dict(prompt="a cat", height=32, width=32, num_inference_steps=3, guidance_scale=4.0),
    "cfg_negative_normalized_truncated": dict(
        prompt="a cat on a long red sofa in a sunny room with plants",
        negative_prompt="blurry",
        height=32,
        width=48,
        num_inference_steps=4,
        guidance_scale=3.0,
        cfg_normalization=True,
        cfg_truncation=0.2,  # t_norm runs 0, 0.1, 0.25, 0.5: no CFG in the last two steps
    ),
    "two_images": dict(prompt="two dogs", num_images=2, height=32, width=32, num_inference_steps=3, guidance_scale=1.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_match_diffusers(case, ours, theirs):
    kwargs = CASES[case]
    got = generate(ours, 11, **kwargs)
    expected = run_diffusers(theirs, 11, **kwargs)
    assert len(got) == len(expected) == kwargs.get("num_images", 1)
    for a, b in zip(got, expected):
        assert a.size == b.size
        assert np.asarray(a).std() > 5  # a real picture, not a flat one that would match anything
        assert mean_level_difference(a, b) <= 1.0


def test_latents_match_diffusers(ours, theirs):
    # Strict on the latents, with every CFG setting in play (t_norm runs 0, 0.14, 0.4: the last step has no CFG).
    kwargs = dict(prompt="x", negative_prompt="blurry", height=32, width=32, num_inference_steps=3, guidance_scale=3.0)
    kwargs.update(cfg_normalization=True, cfg_truncation=0.2, output_type="latent")
    got = generate(ours, 4, **kwargs)[0]
    expected = run_diffusers(theirs, 4, **kwargs)[0]
    assert got.dtype == torch.float32 and got.shape == expected.shape == (4, 16, 16)
    assert (got - expected).abs().max().item() < 1e-4


def test_defaults_are_diffusers(ours):
    p = ours.resolve(SamplingParams(prompt="x"))
    assert (p.height, p.width, p.num_inference_steps, p.guidance_scale, p.max_sequence_length) == (
        1024,
        1024,
        50,
        5.0,
        512,
    )
    assert p.options == {"cfg_normalization": False, "cfg_truncation": 1.0}
    assert ours.spatial_multiple == 4 and ours.max_sequence_length_limit == 1504
    with pytest.raises(ConfigError, match="true_cfg_scale"):
        ours.resolve(SamplingParams(prompt="x", true_cfg_scale=3.0))
    with pytest.raises(ConfigError, match="cfg_norm") as info:
        ours.resolve(SamplingParams(prompt="x", options={"cfg_norm": 1}))
    assert info.value.field == "options"
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(prompt="x", options={"cfg_truncation": "late"}))
    assert info.value.field == "options.cfg_truncation"


# ---- (d) batching ----------------------------------------------------------------------------------------------
def test_batch_of_different_caption_lengths_equals_each_alone(ours):
    # Captions of 19, 57 and 31 tokens: padded to 32, 64 and 32, so one step runs two DiT forwards per branch.
    prompts = ["", "a lighthouse on a cliff at dusk, waves", "a small boat"]
    common = dict(height=32, width=32, num_inference_steps=2, guidance_scale=2.0, output_type="np")
    requests = [
        ours.resolve(SamplingParams(prompt=p, seed=i, negative_prompt="dark" * i, **common))
        for i, p in enumerate(prompts)
    ]
    lengths = [e.shape[0] for e in ours.encode_prompt(prompts, 512)]
    assert lengths == [19, 57, 31]
    batched = ours.run_batch(requests)
    for request, out in zip(requests, batched):
        alone = ours(request).images[0]
        assert np.abs(out.images[0] - alone).max() < 1e-5
        assert out.timings["batch_size"] == 3


# ---- (e) the key map -------------------------------------------------------------------------------------------
def test_key_map_covers_diffusers_and_round_trips(ours, theirs):
    expected = theirs.transformer.state_dict()
    assert all(map_diffusers_key(name) is not None for name in expected)
    assert map_diffusers_key("all_x_embedder.2-1.scale") is None and map_diffusers_key("siglip_pad_token") is None
    back = to_diffusers_state_dict(ours.c.transformer)
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_diffusers_pipeline_shares_our_weights(ours):
    pipe = ours.diffusers_pipeline()
    ours_storage = {p.untyped_storage().data_ptr() for p in ours.c.transformer.parameters()}
    assert all(p.untyped_storage().data_ptr() in ours_storage for p in pipe.transformer.parameters())
    kwargs = dict(prompt="a red fox", height=32, width=32, num_inference_steps=2, guidance_scale=0.0)
    assert mean_level_difference(generate(ours, 2, **kwargs)[0], run_diffusers(pipe, 2, **kwargs)[0]) <= 1.0


# ---- the registration: engine, preset ----------------------------------------------------------------------------
def test_engine_serves_the_folder(tiny_zimage, theirs):
    from ditserve import Engine

    engine = Engine.from_pretrained(str(tiny_zimage))
    assert engine.pipeline.family == "zimage"
    kwargs = dict(prompt="a red fox", height=32, width=48, num_inference_steps=3, guidance_scale=2.0)
    result = engine.generate(seed=7, negative_prompt="blurry", **kwargs)
    expected = run_diffusers(theirs, 7, negative_prompt="blurry", **kwargs)
    assert result.params.max_sequence_length == 512 and len(result.timings["steps"]) == 3
    assert mean_level_difference(result.images[0], expected[0]) <= 1.0


def test_turbo_preset_builds_diffusers_architecture():
    """The z-image-turbo preset at full size, on the meta device: our DiT holds exactly diffusers' tensors."""
    from transformers import Qwen3Config

    from ditserve.registry import get_preset

    spec, preset = get_preset("z-image-turbo")
    assert spec.family == "zimage" and Qwen3Config.from_dict(preset.configs["text_encoder"]).hidden_size == 2560
    config = preset.configs["transformer"]
    ours = build_on_meta(lambda: ZImageTransformer.from_config(config), torch.bfloat16)
    with torch.device("meta"):
        ref = ZImageTransformer2DModel.from_config(config)
    expected = {name: t.shape for name, t in ref.state_dict().items()}
    back = {name: t.shape for name, t in to_diffusers_state_dict(ours).items()}
    assert back == expected
    assert 6.0e9 < sum(p.numel() for p in ours.parameters()) < 6.3e9  # "6B parameters"
    assert ours.config.head_dim == 128 and ours.config.ffn_dim == 10240 and len(ours.repeated_blocks()) == 34
