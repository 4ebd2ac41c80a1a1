"""Z-Image through the shared machinery: every parallel mode through the Engine on the CPU (gloo; one test per
mode), `ditserve bench` beside diffusers, and LoRA against diffusers' load_lora_weights. The tiny folder has 2
heads, so Ulysses and tensor parallelism split them; tolerances as in tests/test_parallel_engine.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditserve import Engine

REQUEST = dict(
    prompt="a lighthouse on a cliff",
    negative_prompt="fog",
    guidance_scale=3.0,  # CFG on: the CFG-parallel mode splits the two branches
    seed=7,
    height=40,  # 20 × 20 latents → 100 image tokens, padded to 128 (not a multiple of 3, split unevenly)
    width=40,
    num_inference_steps=3,
    max_sequence_length=40,
    output_type="np",
)


@pytest.fixture(scope="module")
def single_process(tiny_zimage):
    return Engine.from_pretrained(str(tiny_zimage)).generate(**REQUEST).images[0]


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
def test_parallel_mode_matches_one_process(tiny_zimage, single_process, mode):
    with Engine.from_pretrained(str(tiny_zimage), device="cpu", **mode) as engine:
        got = engine.generate(**REQUEST).images[0]
    assert got.shape == single_process.shape
    assert np.abs(got - single_process).max() < 1e-3


def test_bench_runs_beside_diffusers(tiny_zimage, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--model", str(tiny_zimage), "--device", "cpu", "--height", "32", "--width", "32", "--repeat", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "ditserve", "bench", *args, "--num-inference-steps", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ditserve", "diffusers"} and report["steps"] == 2
    assert report["dit_relative_difference"] < 1e-5  # float32, same weights and inputs


def _write_lora(path, modules: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> None:
    """A diffusers-named LoRA file (transformer.<module>.lora_A/B.weight) with B far from zero."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.2
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.2
    save_file(tensors, str(path))


def test_lora_matches_diffusers(tiny_zimage, tmp_path):
    """The same LoRA file (q, k and v apart, which land on our fused qkv, and a SwiGLU half, which lands on our fused
    w13) in our engine and in diffusers' ZImagePipeline.load_lora_weights: the same image; merged: the same again;
    unmerged: the base image again."""
    from diffusers import ZImagePipeline

    engine = Engine.from_pretrained(str(tiny_zimage))
    dim = engine.pipeline.c.transformer.config.dim
    ffn = engine.pipeline.c.transformer.config.ffn_dim
    modules = {f"layers.0.attention.to_{x}": (dim, dim) for x in "qkv"}
    modules |= {"layers.1.feed_forward.w3": (ffn, dim), "noise_refiner.0.attention.to_out.0": (dim, dim)}
    lora = tmp_path / "zimage_lora.safetensors"
    _write_lora(lora, modules)
    request = {**REQUEST, "guidance_scale": 0.0, "negative_prompt": None}
    base = engine.generate(**request).images[0]

    engine.set_lora("style", str(lora), strength=0.7)
    ours = engine.generate(**request).images[0]
    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    kwargs = {k: v for k, v in request.items() if k not in ("seed", "negative_prompt")}
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(request["seed"])).images[0]
    assert np.abs(ours - base).max() > 1e-2  # the LoRA changes the picture
    assert np.abs(ours - theirs).max() < 1e-4

    engine.merge_lora_weights()
    assert np.abs(engine.generate(**request).images[0] - theirs).max() < 1e-4
    engine.unmerge_lora_weights()
    engine.set_lora([], [])
    assert np.array_equal(engine.generate(**request).images[0], base)


@pytest.mark.gpu
def test_cuda_graphs_replay_what_eager_computes(tiny_zimage):
    """On CUDA in bf16 (the Triton kernels and cuDNN attention): replayed graphs give eager's images exactly, one
    graph per shape, and eager stays close to diffusers' pipeline on the same weights."""
    from diffusers import ZImagePipeline

    request = {**REQUEST, "output_type": "np"}
    eager = Engine.from_pretrained(str(tiny_zimage), device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(str(tiny_zimage), device="cuda", dtype="bfloat16")
    for size in (64, 96, 64):
        want = eager.generate(**{**request, "height": size, "width": size}).images[0]
        got = graphed.generate(**{**request, "height": size, "width": size}).images[0]
        np.testing.assert_array_equal(got, want)
    # Two sizes, and the prompt and the negative pad to different caption lengths: four shapes.
    assert graphed.cuda_graphs["transformer"].captures == 4
    pipe = ZImagePipeline.from_pretrained(tiny_zimage, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in request.items() if k != "seed"}
    theirs = pipe(**{**kwargs, "height": 64, "width": 64}, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(want - theirs).mean() < 2 / 255  # bf16: other kernels, other rounding


@pytest.mark.parametrize("prefix", ["diffusion_model.", "lora_unet_"])
def test_original_and_kohya_names_convert_to_diffusers_modules(prefix):
    """Z-Image's own module names (ComfyUI's `diffusion_model.` keys, kohya's flattened `lora_unet_` keys): the fused
    `attention.qkv` covers diffusers' to_q, to_k and to_v (B's rows in that order), `attention.out` is to_out.0."""
    from ditserve.lora import convert

    def key(module: str, part: str) -> str:
        name = module.replace(".", "_") if prefix == "lora_unet_" else module
        return f"{prefix}{name}.lora_{part}.weight"

    tensors = {
        key("layers.3.attention.qkv", "down"): torch.randn(4, 64),
        key("layers.3.attention.qkv", "up"): torch.randn(192, 4),
        key("noise_refiner.0.attention.out", "down"): torch.randn(4, 64),
        key("noise_refiner.0.attention.out", "up"): torch.randn(64, 4),
        key("context_refiner.1.feed_forward.w2", "down"): torch.randn(4, 160),
        key("context_refiner.1.feed_forward.w2", "up"): torch.randn(64, 4),
    }
    lora = convert(tensors, prefer_architecture="zimage")
    assert lora.architecture == "zimage"
    assert sorted(m.targets for m in lora.modules) == [
        ("context_refiner.1.feed_forward.w2",),
        ("layers.3.attention.to_q", "layers.3.attention.to_k", "layers.3.attention.to_v"),
        ("noise_refiner.0.attention.to_out.0",),
    ]
