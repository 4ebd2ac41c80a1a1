"""Wan through the shared machinery: every parallel mode through the Engine on the CPU (gloo; one test per mode),
and LoRA against diffusers' load_lora_weights (a diffusers-named file and an original-Wan/LightX2V-named one). The
tiny folder has 2 heads, so Ulysses and tensor parallelism split them; tolerances as in tests/test_zimage_engine.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ditserve import Engine
from ditserve.parallel.sequence import SequenceParallelAttention

REQUEST = dict(
    prompt="a lighthouse on a cliff",
    negative_prompt="fog",
    guidance_scale=3.0,  # CFG on: the CFG-parallel mode splits the two branches
    seed=7,
    height=48,  # 6 × 2 latents → 3 × 1 tokens a frame, 3 latent frames: 9 video tokens (split 5 + 4 over 2 ranks)
    width=16,
    num_frames=9,
    num_inference_steps=2,
    max_sequence_length=40,
    output_type="np",
)


@pytest.fixture(scope="module")
def single_process(tiny_wan):
    return Engine.from_pretrained(str(tiny_wan)).generate(**REQUEST).videos[0]


@pytest.mark.parametrize(
    "mode",
    [
        dict(num_gpus=2, ulysses_degree=2),
        dict(num_gpus=2, ring_degree=2),
        dict(num_gpus=2, tp_size=2),
        dict(num_gpus=2, cfg_parallel=True),
    ],
    ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items() if k != "num_gpus"),
)
def test_parallel_mode_matches_one_process(tiny_wan, single_process, mode):
    with Engine.from_pretrained(str(tiny_wan), device="cpu", **mode) as engine:
        got = engine.generate(**REQUEST).videos[0]
    assert got.shape == single_process.shape == (9, 48, 16, 3)
    assert np.abs(got - single_process).max() < 1e-3


# ---- LoRA ------------------------------------------------------------------------------------------------------
def _pair(g: torch.Generator, out_features: int, in_features: int, rank: int = 4):
    return torch.randn(rank, in_features, generator=g) * 0.2, torch.randn(out_features, rank, generator=g) * 0.2


def _diffusers_named(dims: dict) -> dict[str, torch.Tensor]:
    """transformer.<diffusers module>.lora_A/B.weight: q, k and v apart (our fused qkv), the cross-attention's k
    (one part of our fused k/v), the feed-forward and the timestep projection."""
    dim, ffn = dims["dim"], dims["ffn"]
    modules = {f"blocks.0.attn1.to_{x}": (dim, dim) for x in "qkv"}
    modules |= {"blocks.1.attn2.to_k": (dim, dim), "blocks.1.attn2.to_out.0": (dim, dim)}
    modules |= {"blocks.0.ffn.net.0.proj": (ffn, dim), "condition_embedder.time_proj": (6 * dim, dim)}
    g, tensors = torch.Generator().manual_seed(0), {}
    for module, (out_features, in_features) in modules.items():
        down, up = _pair(g, out_features, in_features)
        tensors[f"transformer.{module}.lora_A.weight"] = down
        tensors[f"transformer.{module}.lora_B.weight"] = up
    return tensors


def _original_named(dims: dict) -> dict[str, torch.Tensor]:
    """What LightX2V / the original Wan repo write: diffusion_model.blocks.N.self_attn.q.lora_down/up + alpha."""
    dim, ffn = dims["dim"], dims["ffn"]
    modules = {f"blocks.{i}.self_attn.{x}": (dim, dim) for i in (0, 1) for x in "qkvo"}
    modules |= {f"blocks.{i}.cross_attn.{x}": (dim, dim) for i in (0, 1) for x in "qkvo"}
    modules |= {"blocks.1.ffn.0": (ffn, dim), "blocks.1.ffn.2": (dim, ffn)}
    g, tensors = torch.Generator().manual_seed(1), {}
    for module, (out_features, in_features) in modules.items():
        down, up = _pair(g, out_features, in_features)
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)  # scale alpha / rank = 0.5
    return tensors


@pytest.mark.parametrize("writer", [_diffusers_named, _original_named], ids=["diffusers", "lightx2v"])
def test_lora_matches_diffusers(tiny_wan, tmp_path, writer):
    """The same LoRA file in our engine and in diffusers' WanPipeline.load_lora_weights: the same frames; merged:
    the same again; unmerged: the base frames again."""
    from diffusers import WanPipeline

    engine = Engine.from_pretrained(str(tiny_wan))
    cfg = engine.pipeline.c.transformer.config
    lora = tmp_path / "wan_lora.safetensors"
    save_file(writer({"dim": cfg.dim, "ffn": cfg.ffn_dim}), str(lora))
    request = {**REQUEST, "guidance_scale": 1.0, "negative_prompt": None, "height": 32, "width": 32}
    base = engine.generate(**request).videos[0]

    engine.set_lora("style", str(lora), strength=0.7)
    ours = engine.generate(**request).videos[0]
    pipe = WanPipeline.from_pretrained(tiny_wan)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    kwargs = {k: v for k, v in request.items() if k not in ("seed", "negative_prompt")}
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(request["seed"])).frames[0]
    assert np.abs(ours - base).max() > 1e-2  # the LoRA changes the video
    assert np.abs(ours - theirs).max() < 1e-4

    engine.merge_lora_weights()
    assert np.abs(engine.generate(**request).videos[0] - theirs).max() < 1e-4
    engine.unmerge_lora_weights()
    engine.set_lora([], [])
    assert np.array_equal(engine.generate(**request).videos[0], base)


def test_lora_on_the_second_expert_matches_diffusers(tiny_wan_experts, tmp_path):
    """A LoRA with `target="transformer_2"` changes only the steps the second expert runs, and gives what diffusers'
    `load_lora_weights(..., load_into_transformer_2=True)` gives; merged and unmerged likewise."""
    from diffusers import WanPipeline

    engine = Engine.from_pretrained(str(tiny_wan_experts))
    cfg = engine.pipeline.c.transformer_2.config
    lora = tmp_path / "late_lora.safetensors"
    save_file(_original_named({"dim": cfg.dim, "ffn": cfg.ffn_dim}), str(lora))
    request = {**REQUEST, "guidance_scale": 1.0, "negative_prompt": None, "num_inference_steps": 4}
    base = engine.generate(**request).videos[0]
    engine.set_lora("late", str(lora), target="transformer_2")
    targets = engine.list_loras()["targets"]
    assert targets["transformer"]["active"] == [] and [a["nickname"] for a in targets["transformer_2"]["active"]] == [
        "late"
    ]
    ours = engine.generate(**request).videos[0]
    pipe = WanPipeline.from_pretrained(tiny_wan_experts)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="late", load_into_transformer_2=True)
    kwargs = {k: v for k, v in request.items() if k not in ("seed", "negative_prompt")}
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(request["seed"])).frames[0]
    assert np.abs(ours - base).max() > 1e-2
    assert np.abs(ours - theirs).max() < 1e-4
    engine.merge_lora_weights(target="transformer_2")
    assert np.abs(engine.generate(**request).videos[0] - theirs).max() < 1e-4
    engine.unmerge_lora_weights(target="transformer_2")
    engine.set_lora([], [])
    assert np.array_equal(engine.generate(**request).videos[0], base)


# ---- Wan2.2's experts and input images across ranks ----------------------------------------------------------------
IMAGE = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)


def test_two_experts_and_an_image_under_ulysses(tiny_wan_i2v_experts):
    """Wan2.2 I2V-A14B's layout under Ulysses-2: the engine shards both experts (the second runs the last steps,
    with guidance_scale_2), and the input image reaches the other rank (a PNG data URI in the broadcast request)."""
    job = {**REQUEST, "num_inference_steps": 4, "guidance_scale_2": 1.5, "images": [IMAGE]}
    alone = Engine.from_pretrained(str(tiny_wan_i2v_experts))
    assert set(alone.pipeline.transformers()) == set(alone.lora.targets) == {"transformer", "transformer_2"}
    expected = alone.generate(**job).videos[0]
    with Engine.from_pretrained(str(tiny_wan_i2v_experts), device="cpu", num_gpus=2, ulysses_degree=2) as engine:
        for model in engine.pipeline.transformers().values():  # rank 0's experts: both wrapped
            assert "forward" in vars(model)
            assert any(isinstance(m, SequenceParallelAttention) for m in model.modules())
        got = engine.generate(**job).videos[0]
    assert np.abs(got - expected).max() < 1e-3


def test_ti2v_image_under_ring(tiny_wan_ti2v):
    """Wan2.2 TI2V with an image under Ring-2: its per-token timesteps (0 on the image's frame) are sharded with the
    video tokens (9 frames at 64 × 32: 3 latent frames of 2 tokens, split 3 + 3)."""
    job = {**REQUEST, "height": 64, "width": 32, "images": [IMAGE]}
    expected = Engine.from_pretrained(str(tiny_wan_ti2v)).generate(**job).videos[0]
    with Engine.from_pretrained(str(tiny_wan_ti2v), device="cpu", num_gpus=2, ring_degree=2) as engine:
        got = engine.generate(**job).videos[0]
    assert got.shape == expected.shape == (9, 64, 32, 3) and np.abs(got - expected).max() < 1e-3


@pytest.mark.gpu
def test_cuda_graphs_replay_what_eager_computes(tiny_wan):
    """On CUDA in bf16 (cuDNN attention, the Triton kernels): replayed graphs give eager's frames exactly, and eager
    stays close to diffusers' WanPipeline on the same weights."""
    from diffusers import WanPipeline

    request = {**REQUEST, "output_type": "np", "height": 64, "width": 64}
    eager = Engine.from_pretrained(str(tiny_wan), device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(str(tiny_wan), device="cuda", dtype="bfloat16")
    want = eager.generate(**request).videos[0]
    for _ in range(2):  # captured, then replayed
        np.testing.assert_array_equal(graphed.generate(**request).videos[0], want)
    assert graphed.cuda_graphs["transformer"].captures >= 1
    pipe = WanPipeline.from_pretrained(tiny_wan, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in request.items() if k != "seed"}
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(request["seed"])).frames[0]
    assert np.abs(want - theirs).mean() < 3 / 255  # frames in [0, 1]; bf16: other kernels, other rounding


# ---- the VAE decode shared out over the ranks ----------------------------------------------------------------------
TILED = {**REQUEST, "height": 32, "width": 288, "guidance_scale": 1.0, "negative_prompt": None}  # 2 tiles of 256 px


def test_tiled_decode_over_ranks_is_diffusers_tiled_decode(tiny_wan):
    """One rank: our tile loop is AutoencoderKLWan.tiled_decode bit for bit (uneven tiles, several frames)."""
    from diffusers import AutoencoderKLWan

    from ditserve.pipelines.wan import tiled_decode_over_ranks

    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae")
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=48, tile_sample_stride_height=24,
                      tile_sample_stride_width=32)  # fmt: skip
    z = torch.randn(1, vae.config.z_dim, 3, 7, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiled_decode_over_ranks(vae, z, None), vae.tiled_decode(z, return_dict=False)[0])


def test_vae_tiles_decoded_across_ranks_match_one_process(tiny_wan):
    """--vae-tiling: one process gives diffusers' tiled decode; under Ulysses-2 the two ranks decode a tile each
    and give the same frames."""
    one = Engine.from_pretrained(str(tiny_wan), vae_tiling=True)
    tiled = one.generate(**TILED).videos[0]
    plain = Engine.from_pretrained(str(tiny_wan)).generate(**TILED).videos[0]
    assert np.abs(tiled - plain).max() > 1e-4  # the seam is blended: tiling did happen
    with Engine.from_pretrained(str(tiny_wan), device="cpu", vae_tiling=True, num_gpus=2, ulysses_degree=2) as engine:
        got = engine.generate(**TILED).videos[0]
    assert np.abs(got - tiled).max() < 1e-3
