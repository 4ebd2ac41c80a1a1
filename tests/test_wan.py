"""Wan against diffusers on one tiny random folder: prompt cleaning and text encoding, the q/k norm across heads,
the DiT, the whole pipeline (frames and latents), batching, validation and the key map. CPU, float32; the folder,
our pipeline and diffusers' are made once per session."""

from __future__ import annotations

import dataclasses
import inspect
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanPipeline as DiffusersWanPipeline
from diffusers import WanTransformer3DModel
from diffusers.pipelines.wan import pipeline_wan
from PIL import Image

from ditserve.config import ConfigError, SamplingParams
from ditserve.layers import norm as norm_mod
from ditserve.layers.attention import Attention
from ditserve.loader.folder import resolve_model
from ditserve.loader.weights import build_on_meta, load_checkpoint, materialize
from ditserve.models.wan import WanConfig, WanTransformer, map_diffusers_key, to_diffusers_state_dict
from ditserve.parallel.state import TensorParallelGroup
from ditserve.pipelines.input_images import load_image
from ditserve.pipelines.wan import WanPipeline, patchify, prompt_clean, unpatchify
from ditserve.utils.video import Video


@pytest.fixture(scope="session")
def ours(tiny_wan):
    pipe = WanPipeline.load(resolve_model(str(tiny_wan)), torch.device("cpu"), torch.float32, "auto")
    assert type(pipe) is WanPipeline and pipe.family == "wan"
    return pipe


@pytest.fixture(scope="session")
def theirs(tiny_wan):
    pipe = DiffusersWanPipeline.from_pretrained(tiny_wan)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mean_level_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def generate(pipe: WanPipeline, seed: int, **kwargs) -> list:
    return pipe(pipe.resolve(SamplingParams(seed=seed, **kwargs))).videos


def run_diffusers(pipe, seed: int, **kwargs) -> list:
    """diffusers' frames, as uint8 the way its export_to_video makes them (or its latents)."""
    kwargs = {"num_videos_per_prompt" if k == "num_images" else k: v for k, v in kwargs.items()}
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).frames
    if kwargs.get("output_type") == "latent":
        return list(out)
    return [(v * 255).astype(np.uint8) for v in out]


# ---- (a) prompt cleaning and text encoding -----------------------------------------------------------------------
def test_prompt_cleaning_is_diffusers():
    # diffusers cleans with ftfy only when it is installed; neither side has it here, and both check the same way.
    assert not pipeline_wan.is_ftfy_available()
    texts = ["  a &amp;amp; b\t\tc \n", "fish &lt;3 chips", "wide\u3000space\u00a0here", "", "\x1c odd \x1f"]
    for text in texts:
        assert prompt_clean(text) == pipeline_wan.prompt_clean(text), text


@pytest.mark.parametrize("max_len", [512, 6])  # 6: the prompt is truncated
def test_encoding_matches_diffusers(ours, theirs, max_len):
    prompts = ["a red fox  in the snow", "", "a red fox in the snow"]
    got = ours.encode_prompt(prompts, max_len)
    expected, _ = theirs.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=max_len, device="cpu"
    )
    assert got.shape == expected.shape == (3, max_len, 32)
    tokens = len(ours.c.tokenizer("a red fox in the snow").input_ids)  # the cleaned prompt, with </s>
    assert tokens == 17 and (got[1, 1:] == 0).all() and (got[0, min(max_len, tokens) :] == 0).all()  # zeros past
    assert (got[0, : min(max_len, tokens)] != 0).any(-1).all()
    assert (got - expected).abs().max().item() <= 1e-5


# ---- (b) the q/k norm across heads -------------------------------------------------------------------------------
def test_heads_rms_norm_is_torch_rms_norm_over_the_inner_width(monkeypatch):
    """One RMS over all heads (torch.nn.RMSNorm over the flat width, as diffusers' WanAttention), and the same
    split over two tensor-parallel ranks whose partial mean squares are summed."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, 4, 6, generator=g), 1 + 0.1 * torch.randn(24, generator=g)
    ref = torch.nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(weight)
        expected = ref(x.flatten(2)).unflatten(2, (4, 6))
    norm = norm_mod.HeadsRMSNorm(24, 1e-6)
    norm.weight_loader(norm.weight, weight)
    assert torch.equal(norm(x), expected)

    halves = x.chunk(2, dim=2)
    square_sums = [h.float().square().sum((-2, -1)).unsqueeze(-1) for h in halves]
    for rank in (0, 1):
        other = square_sums[1 - rank]
        group = TensorParallelGroup(None, rank, 2, all_reduce=lambda y, other=other: y + other)
        monkeypatch.setattr(norm_mod, "tp_group", lambda group=group: group)
        shard = norm_mod.HeadsRMSNorm(24, 1e-6)
        shard.weight_loader(shard.weight, weight)
        assert shard.weight.shape == (12,)
        torch.testing.assert_close(shard(halves[rank]), expected.chunk(2, dim=2)[rank], rtol=1e-6, atol=1e-6)


# ---- (c) the DiT -----------------------------------------------------------------------------------------------
def dit_inputs(latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, patch=(1, 2, 2)) -> dict:
    from ditserve.models.wan import video_position_ids

    f, h, w = (n // p for n, p in zip(latents.shape[2:], patch))
    return dict(
        video_tokens=patchify(latents, patch),
        timestep=timestep,
        text_states=text,
        video_ids=video_position_ids(f, h, w, "cpu"),
    )


def test_dit_matches_diffusers_odd_token_count(ours, theirs):
    # 3 latent frames × 6 × 10 latents: 3 × 3 × 5 = 45 patch tokens (odd); two samples at different timesteps.
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 6, 10, generator=g)
    text = ours.encode_prompt(["a red fox", "a lighthouse on a cliff"], 512)
    timestep = torch.tensor([999, 250])
    with torch.no_grad():
        got = unpatchify(ours.c.transformer(**dit_inputs(latents, text, timestep)), (3, 3, 5), (1, 2, 2))
        expected = theirs.transformer(latents, timestep, text, return_dict=False)[0]
    assert got.shape == expected.shape == (2, 4, 3, 6, 10)
    assert expected.abs().max() > 1.0  # a real signal, not near-zero outputs that would pass anything
    assert (got - expected).abs().max().item() <= 1e-5


def test_dit_matches_diffusers_other_shape():
    """Another random shape (4 heads of 12, no cross-attention norm, a temporal patch of 2, out ≠ in channels):
    every parameter random, also those diffusers initialises to zero or one."""
    config = dict(
        patch_size=[2, 2, 2], num_attention_heads=4, attention_head_dim=12, in_channels=6, out_channels=3,
        text_dim=20, freq_dim=16, ffn_dim=40, num_layers=1, cross_attn_norm=False, rope_max_seq_len=32,
    )  # fmt: skip
    torch.manual_seed(5)
    ref = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    model = materialize(build_on_meta(lambda: WanTransformer.from_config(config), torch.float32), "cpu")
    load_checkpoint(model, iter(ref.state_dict().items()), map_diffusers_key)
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 6, 4, 2, 6, generator=g), torch.randn(1, 9, 20, generator=g)
    with torch.no_grad():
        got = model.eval()(**dit_inputs(latents, text, torch.tensor([640.0]), (2, 2, 2)))
        expected = ref(latents, torch.tensor([640.0]), text, return_dict=False)[0]
    got = unpatchify(got, (2, 1, 3), (2, 2, 2))
    assert got.shape == expected.shape == (1, 3, 4, 2, 6) and expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-5


def test_dit_per_token_timesteps_match_diffusers(ours, theirs):
    """Wan2.2 TI2V's per-token timesteps ([B, N]: here the first frame's tokens clean, as with an input image)."""
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 3, 4, 6, generator=g)  # 3 × 2 × 3 = 18 tokens, 6 a frame
    text = ours.encode_prompt(["a red fox", "tree"], 512)
    per_token = torch.tensor([[0.0] * 6 + [700.0] * 12, [0.0] * 6 + [300.0] * 12])
    uniform_inputs = dit_inputs(latents, text, torch.tensor([700.0, 300.0]))
    with torch.no_grad():
        got = unpatchify(ours.c.transformer(**uniform_inputs, token_timestep=per_token), (3, 2, 3), (1, 2, 2))
        expected = theirs.transformer(latents, per_token, text, return_dict=False)[0]
        uniform = unpatchify(ours.c.transformer(**uniform_inputs), (3, 2, 3), (1, 2, 2))
    assert expected.abs().max() > 1.0 and (got - expected).abs().max().item() <= 1e-5
    assert (got - uniform)[:, :, 0].abs().max() > 1e-2  # the clean first frame is modulated as such


def test_sharding_declaration_names_forward_inputs():
    names = set(inspect.signature(WanTransformer.forward).parameters) - {"self"}
    assert set(WanTransformer.sequence_sharding.inputs) <= names
    model = build_on_meta(lambda: WanTransformer(WanConfig(num_attention_heads=2, num_layers=2)), torch.float32)
    attentions = {m.segments for b in model.repeated_blocks() for m in b.modules() if isinstance(m, Attention)}
    assert attentions == {("video",), None}  # self-attention over the video shards, cross-attention unsplit
    assert model.repeated_blocks() == list(model.blocks)


# ---- (d) the whole pipeline ------------------------------------------------------------------------------------
CASES = {
    "cfg_default_negative": dict(prompt="a red fox", height=32, width=32, num_frames=5, num_inference_steps=3),
    "no_cfg_float_frames": dict(
        prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=1.0, output_type="np"
    ),
    "negative_two_videos_9_frames": dict(
        prompt="a  lighthouse &amp; waves",
        negative_prompt="fog",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=3.5,
        num_images=2,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_videos_match_diffusers(case, ours, theirs):
    kwargs = CASES[case]
    got = generate(ours, 11, **kwargs)
    if kwargs.get("output_type") == "np":  # diffusers' own float frames, to float rounding
        expected = theirs(generator=torch.Generator("cpu").manual_seed(11), **kwargs).frames
        assert got[0].dtype == np.float32 and np.abs(got[0] - expected[0]).max() < 1e-4
        return
    expected = run_diffusers(theirs, 11, **kwargs)
    assert len(got) == len(expected) == kwargs.get("num_images", 1)
    shape = (kwargs["num_frames"], kwargs["height"], kwargs["width"], 3)
    for a, b in zip(got, expected):
        assert a.dtype == np.uint8 and a.shape == b.shape == shape
        assert a.std() > 5  # a real video, not a flat one that would match anything
        assert mean_level_difference(a, b) <= 1.0


def test_latents_match_diffusers(ours, theirs):
    kwargs = dict(prompt="x", negative_prompt="blurry", height=32, width=32, num_frames=5, num_inference_steps=4)
    got = generate(ours, 4, output_type="latent", **kwargs)[0]
    expected = run_diffusers(theirs, 4, output_type="latent", **kwargs)[0]
    assert got.dtype == torch.float32 and got.shape == expected.shape == (4, 2, 4, 4)
    assert (got - expected).abs().max().item() < 1e-4


def test_defaults_and_validation(ours):
    p = ours.resolve(SamplingParams(prompt="x"))
    got = (p.height, p.width, p.num_frames, p.fps, p.num_inference_steps, p.guidance_scale, p.max_sequence_length)
    assert got == (480, 832, 81, 16, 50, 5.0, 512)
    assert ours.spatial_multiple == 16
    bad = [("num_frames", 8), ("height", 40), ("true_cfg_scale", 2.0), ("options", {"a": 1})]
    bad += [("sampling_preset", "lightning-8"), ("sampling_preset", 4)]
    for field, value in bad:
        with pytest.raises(ConfigError) as info:
            ours.resolve(SamplingParams(prompt="x", **{field: value}))
        assert info.value.field == field
    with pytest.raises(ConfigError, match="4·k \\+ 1.*5 or 9, not 8"):
        ours.resolve(SamplingParams(prompt="x", num_frames=8))


# ---- few-step sampling: the sampler options and the LightX2V preset ----------------------------------------------
class _LightX2VEuler:
    """diffusers' FlowMatchEulerDiscreteScheduler at shift 5 that always sets LightX2V's four timesteps (1000, 750,
    500, 250 before the shift): what the 4-step LoRAs' recipe runs, inside diffusers' own WanPipeline."""

    def __new__(cls):
        from diffusers import FlowMatchEulerDiscreteScheduler

        class Scheduler(FlowMatchEulerDiscreteScheduler):
            def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
                assert num_inference_steps == 4
                super().set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], device=device)

        return Scheduler(num_train_timesteps=1000, shift=5.0)


def test_lightx2v_preset_matches_diffusers_euler_at_its_timesteps(ours, theirs):
    """`sampling_preset="lightx2v-4step"`: 4 steps, no CFG, Euler at shift 5 over 1000/750/500/250, as diffusers'
    WanPipeline runs with that scheduler; a request's own field still wins over the preset's."""
    p = ours.resolve(SamplingParams(prompt="x", sampling_preset="lightx2v-4step"))
    assert (p.num_inference_steps, p.guidance_scale, p.guidance_scale_2) == (4, 1.0, None)  # one expert: no 2nd scale
    assert p.options == {
        "sampler": "euler",
        "flow_shift": 5.0,
        "denoising_steps": "1000,750,500,250",
        "sigma_max": None,
    }
    assert (
        ours.resolve(SamplingParams(prompt="x", sampling_preset="lightx2v-4step", guidance_scale=2.0)).guidance_scale
        == 2.0
    )
    kwargs = dict(prompt="a fox", height=32, width=32, num_frames=5, output_type="latent")
    got = generate(ours, 5, sampling_preset="lightx2v-4step", **kwargs)[0]
    reference = DiffusersWanPipeline(**{**theirs.components, "scheduler": _LightX2VEuler()})
    reference.set_progress_bar_config(disable=True)
    expected = run_diffusers(reference, 5, num_inference_steps=4, guidance_scale=1.0, **kwargs)[0]
    assert (got - expected).abs().max().item() < 1e-4
    default = generate(ours, 5, num_inference_steps=4, guidance_scale=1.0, **kwargs)[0]
    assert (got - default).abs().max().item() > 1e-2  # UniPC at the folder's shift samples otherwise


def test_sampler_options_are_checked(ours):
    for options, field in (
        ({"sampler": "ddim"}, "options.sampler"),
        ({"flow_shift": -1}, "options.flow_shift"),
        ({"denoising_steps": "1000,500"}, "options.denoising_steps"),  # UniPC takes its own
        ({"sampler": "euler", "denoising_steps": "1000,500"}, "options.denoising_steps"),  # 2 for 4 steps
        ({"sampler": "euler", "denoising_steps": "500,750,250,100"}, "options.denoising_steps"),
        ({"sampler": "euler", "denoising_steps": "a,b,c,d"}, "options.denoising_steps"),
    ):
        with pytest.raises(ConfigError) as info:
            ours.resolve(SamplingParams(prompt="x", num_inference_steps=4, options=options))
        assert info.value.field == field, options


def test_batch_equals_each_alone(ours):
    common = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    requests = [
        ours.resolve(SamplingParams(prompt=p, seed=i, negative_prompt="dark" * i, **common))
        for i, p in enumerate(["", "a lighthouse on a cliff at dusk", "a small boat"])
    ]
    for request, out in zip(requests, ours.run_batch(requests)):
        assert (out.videos[0] - ours(request).videos[0]).abs().max() < 1e-5
        assert out.timings["batch_size"] == 3


# ---- (e) the key map and diffusers beside us ------------------------------------------------------------------
def test_key_map_covers_diffusers_and_round_trips(ours, theirs):
    expected = theirs.transformer.state_dict()
    assert all(map_diffusers_key(name) is not None for name in expected)
    assert map_diffusers_key("blocks.0.attn1.norm_added_q.weight") is None and map_diffusers_key("rope.x") is None
    back = to_diffusers_state_dict(ours.c.transformer)
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_diffusers_pipeline_shares_our_weights(ours):
    pipe = ours.diffusers_pipeline()
    ours_storage = {p.untyped_storage().data_ptr() for p in ours.c.transformer.parameters()}
    assert all(p.untyped_storage().data_ptr() in ours_storage for p in pipe.transformer.parameters())
    inputs = ours.forward_inputs(32, 48, num_frames=5)
    with torch.no_grad():
        mine, theirs = ours.comparable_outputs(
            ours.c.transformer(**inputs),
            pipe.transformer(**ours.diffusers_forward_inputs(inputs), return_dict=False),
            inputs,
        )
    assert mine.shape == (1, 4, 2, 4, 6) and (mine - theirs).abs().max() <= 1e-5


# ---- the registration: engine, presets ---------------------------------------------------------------------------
def test_engine_serves_the_folder(tiny_wan, theirs, tmp_path):
    from ditserve import Engine

    engine = Engine.from_pretrained(str(tiny_wan))
    assert engine.pipeline.family == "wan"
    kwargs = dict(prompt="a red fox", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=2.0)
    result = engine.generate(seed=7, negative_prompt="blurry", **kwargs)
    expected = run_diffusers(theirs, 7, negative_prompt="blurry", **kwargs)[0]
    assert result.images == [] and len(result.timings["steps"]) == 2 and result.params.fps == 16
    assert isinstance(result.videos[0], Video) and result.videos[0].fps == 16  # saves itself (utils/video.py)
    assert result.videos[0].save(tmp_path / "fox.mp4").stat().st_size > 0
    assert result.videos[0].shape == (5, 32, 32, 3) and mean_level_difference(result.videos[0], expected) <= 1.0


@pytest.mark.parametrize(
    ("preset", "billions", "experts"),
    [
        ("wan2.1-t2v-1.3b", (1.3, 1.5), 1),
        ("wan2.1-t2v-14b", (14, 14.5), 1),
        ("wan2.2-t2v-a14b", (14, 14.5), 2),
        ("wan2.2-ti2v-5b", (4.9, 5.1), 1),
        ("wan2.1-i2v-14b", (16.3, 16.5), 1),
        ("wan2.2-i2v-a14b", (14, 14.5), 2),
    ],
)
def test_preset_builds_diffusers_architecture(preset, billions, experts):
    """The presets at full size, on the meta device: our DiT holds exactly diffusers' tensors; Wan2.2 A14B has
    two such experts and its boundary."""
    from transformers import UMT5Config

    from ditserve.registry import get_preset

    source = resolve_model(preset, "dummy")
    assert [d.component for d in source.dits] == ["transformer", "transformer_2"][:experts]
    assert source.has("image_encoder") == source.has("image_processor") == (preset == "wan2.1-i2v-14b")
    boundary = {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.9}.get(preset)
    assert source.pipeline_config()["boundary_ratio"] == boundary
    spec, p = get_preset(preset)
    assert spec.family == "wan" and UMT5Config.from_dict(p.configs["text_encoder"]).d_model == 4096
    config = p.configs["transformer"]
    model = build_on_meta(lambda: WanTransformer.from_config(config), torch.bfloat16)
    with torch.device("meta"):
        ref = WanTransformer3DModel.from_config(config)
    expected = {name: t.shape for name, t in ref.state_dict().items()}
    assert {name: t.shape for name, t in to_diffusers_state_dict(model).items()} == expected
    assert billions[0] * 1e9 < sum(p.numel() for p in model.parameters()) < billions[1] * 1e9
    assert model.config.rope_axes == (44, 42, 42)
    if preset == "wan2.2-ti2v-5b":
        assert source.pipeline_config()["expand_timesteps"] and p.configs["vae"]["z_dim"] == 48


# ---- Wan2.2 A14B: two experts switched at the folder's boundary_ratio ----------------------------------------------
def _record_calls(model, log: list, name: str):
    return model.register_forward_hook(lambda *_: log.append(name))


def test_two_experts_switch_where_diffusers_does(tiny_wan_experts):
    ours = WanPipeline.load(resolve_model(str(tiny_wan_experts)), torch.device("cpu"), torch.float32, "auto")
    theirs = DiffusersWanPipeline.from_pretrained(tiny_wan_experts)
    theirs.set_progress_bar_config(disable=True)
    assert ours.boundary_ratio == 0.875 and set(ours.transformers()) == {"transformer", "transformer_2"}
    few = ours.resolve(SamplingParams(prompt="x", sampling_preset="lightx2v-4step"))
    assert (few.guidance_scale, few.guidance_scale_2) == (1.0, 1.0)  # CFG off on both experts
    # 4 steps: t = 999, 900 (≥ 875: the first expert), then 750, 500 (the second), each with CFG (two forwards).
    kwargs = dict(prompt="a red fox", negative_prompt="fog", height=32, width=32, num_frames=5, num_inference_steps=4)
    kwargs |= dict(guidance_scale=4.0, guidance_scale_2=2.0)
    ours_log, their_log = [], []
    hooks = [_record_calls(ours.c.transformer, ours_log, "high"), _record_calls(ours.c.transformer_2, ours_log, "low")]
    hooks += [_record_calls(theirs.transformer, their_log, "high")]
    hooks += [_record_calls(theirs.transformer_2, their_log, "low")]
    try:
        latents = generate(ours, 5, output_type="latent", **kwargs)[0]
        expected_latents = run_diffusers(theirs, 5, output_type="latent", **kwargs)[0]
    finally:
        for h in hooks:
            h.remove()
    assert ours_log == their_log == ["high"] * 4 + ["low"] * 4
    assert (latents - expected_latents).abs().max().item() < 1e-4
    # guidance_scale_2 matters (the second expert's steps run with it), and the frames match diffusers'.
    other = generate(ours, 5, output_type="latent", **{**kwargs, "guidance_scale_2": 4.0})[0]
    assert (other - latents).abs().max() > 1e-3
    frames = generate(ours, 5, **kwargs)[0]
    assert frames.std() > 5 and mean_level_difference(frames, run_diffusers(theirs, 5, **kwargs)[0]) <= 1.0


def test_guidance_scale_2_needs_a_second_expert(ours):
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(prompt="x", guidance_scale_2=3.0))
    assert info.value.field == "guidance_scale_2" and "one transformer" in str(info.value)
    with pytest.raises(ConfigError) as info:
        SamplingParams(prompt="x", guidance_scale_2=float("nan")).validate()
    assert info.value.field == "guidance_scale_2"


# ---- Wan2.2 TI2V-5B: text to video -------------------------------------------------------------------------------
def test_ti2v_text_to_video_matches_diffusers(tiny_wan_ti2v):
    """Its 48-channel-style VAE (residual, 2×2 pixel patches, 16× spatial) and expand_timesteps, without an image."""
    ours = WanPipeline.load(resolve_model(str(tiny_wan_ti2v)), torch.device("cpu"), torch.float32, "auto")
    theirs = DiffusersWanPipeline.from_pretrained(tiny_wan_ti2v)
    theirs.set_progress_bar_config(disable=True)
    assert ours.pipeline_config["expand_timesteps"] and ours.spatial_multiple == 32
    kwargs = dict(prompt="a red fox", negative_prompt="fog", height=64, width=32, num_frames=5, num_inference_steps=3)
    latents = generate(ours, 2, output_type="latent", **kwargs)[0]
    expected = run_diffusers(theirs, 2, output_type="latent", **kwargs)[0]
    assert latents.shape == expected.shape == (4, 2, 4, 2) and (latents - expected).abs().max().item() < 1e-4
    frames = generate(ours, 2, **kwargs)[0]
    assert frames.shape == (5, 64, 32, 3) and frames.std() > 5
    assert mean_level_difference(frames, run_diffusers(theirs, 2, **kwargs)[0]) <= 1.0
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(prompt="x", height=48, width=32))
    assert info.value.field == "height"


# ---- image to video: Wan2.1 I2V (CLIP), Wan2.2 I2V-A14B (two experts), Wan2.2 TI2V with an image -------------------
@pytest.fixture
def diffusers_i2v_without_ftfy(monkeypatch):
    """diffusers' WanImageToVideoPipeline (0.42.1) calls ftfy.fix_text whether or not ftfy is installed (its
    pipeline_wan sibling checks first); without ftfy it cannot clean a prompt at all. Both sides then skip ftfy, as
    ours and diffusers' WanPipeline do without it."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not pipeline_wan_i2v.is_ftfy_available():
        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)


def test_image_processor_pil_backend_gives_clip_pixels():
    """Without torchvision, transformers serves CLIPImageProcessor through its PIL backend (diffusers and we load
    the same object from the folder): CLIP's classic preprocessing exactly (shorter side to 224 by PIL's bicubic,
    centre crop, CLIP's mean and std)."""
    from ditserve.loader.tokenizers import clip_image_processor

    processor = clip_image_processor()
    image = Image.fromarray((np.random.default_rng(1).random((300, 500, 3)) * 255).astype(np.uint8))
    got = processor(images=image, return_tensors="pt").pixel_values[0].numpy()
    resized = image.resize((373, 224), Image.BICUBIC)  # 500 × 224 / 300 = 373.3
    crop = np.asarray(resized.crop((74, 0, 298, 224))).astype(np.float32) / 255
    mean, std = np.array(processor.image_mean, np.float32), np.array(processor.image_std, np.float32)
    assert np.array_equal(got, ((crop - mean) / std).transpose(2, 0, 1))


I2V_CASES = {
    "wan2.1_i2v_clip": ("tiny_wan_i2v", "concat", dict(height=32, width=48)),
    "wan2.2_i2v_a14b_experts": ("tiny_wan_i2v_experts", "concat", dict(height=32, width=48)),
    "wan2.2_ti2v_image": ("tiny_wan_ti2v", "first_frame", dict(height=64, width=32)),
}


@pytest.mark.parametrize("case", sorted(I2V_CASES))
def test_image_to_video_matches_diffusers(case, request, diffusers_i2v_without_ftfy):
    from diffusers import WanImageToVideoPipeline

    fixture, mode, size = I2V_CASES[case]
    folder = request.getfixturevalue(fixture)
    ours = WanPipeline.load(resolve_model(str(folder)), torch.device("cpu"), torch.float32, "auto")
    theirs = WanImageToVideoPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    assert ours.image_mode == mode
    image = Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    kwargs = dict(prompt="a red fox", negative_prompt="fog", num_frames=5, num_inference_steps=4, **size)
    got = generate(ours, 2, output_type="latent", images=[image], **kwargs)[0]
    out = theirs(image=image, generator=torch.Generator("cpu").manual_seed(2), output_type="latent", **kwargs)
    expected = out.frames[0]
    assert expected.abs().max() > 1.0 and (got - expected).abs().max().item() < 1e-4
    if case == "wan2.1_i2v_clip":  # what `ditserve bench` runs: the same forward in diffusers, with CLIP states
        forward = ours.forward_inputs(32, 48, num_frames=5)
        with torch.no_grad():
            mine, their_out = ours.comparable_outputs(
                ours.c.transformer(**forward),
                ours.diffusers_pipeline().transformer(**ours.diffusers_forward_inputs(forward), return_dict=False),
                forward,
            )
        assert forward["image_states"].shape[1] == 5 and (mine - their_out).abs().max() <= 1e-5
        # the frames too, and the image changes them
        frames = generate(ours, 2, images=[image], **kwargs)[0]
        their_frames = theirs(image=image, generator=torch.Generator("cpu").manual_seed(2), **kwargs).frames[0]
        assert frames.std() > 5 and mean_level_difference(frames, (their_frames * 255).astype(np.uint8)) <= 1.0
        other = generate(ours, 2, output_type="latent", images=[np.asarray(image)[::-1].copy()], **kwargs)[0]
        assert (other - got).abs().max() > 1e-2


def test_image_inputs_are_checked_and_travel_as_plain_data(ours, tiny_wan_i2v, tmp_path):
    with pytest.raises(ConfigError) as info:
        ours.resolve(SamplingParams(prompt="x", images=[np.zeros((32, 32, 3), np.uint8)]))
    assert info.value.field == "images" and "text only" in str(info.value)
    i2v = WanPipeline.load(resolve_model(str(tiny_wan_i2v)), torch.device("cpu"), torch.float32, "auto")
    assert ours.tasks == ("text-to-video",) and i2v.tasks == ("image-to-video",)  # what the server routes by
    for images in (None, [np.zeros((32, 32, 3), np.uint8)] * 2, [np.zeros((32, 32), np.uint8)], [tmp_path / "no"]):
        with pytest.raises(ConfigError) as info:
            i2v.resolve(SamplingParams(prompt="x", images=images))
        assert info.value.field == "images"
    array = (np.random.default_rng(3).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "in.png")
    resolved = [i2v.resolve(SamplingParams(prompt="x", images=[im])) for im in (array, str(tmp_path / "in.png"))]
    assert resolved[0].images == resolved[1].images and resolved[0].images[0].startswith("data:image/png;base64,")
    json.dumps(dataclasses.asdict(resolved[0]))  # what crosses to the other ranks
    assert np.array_equal(np.asarray(load_image(resolved[0].images[0])), array)
