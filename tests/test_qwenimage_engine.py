"""Qwen-Image through the shared machinery: every parallel mode through the Engine on the CPU (gloo; one test per
mode), `ditserve bench` beside diffusers, LoRA against diffusers' load_lora_weights, and the published LoRA names.

The request batches two prompts of different lengths (the shorter one's text is padded and masked in every
attention) with true CFG on: Ulysses and Ring must carry the text mask over the ranks, and CFG parallelism splits
the branches. The tiny folder has 2 heads, so Ulysses and tensor parallelism split them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditserve import Engine

REQUEST = dict(
    prompt=["a lighthouse on a cliff", "a small red boat on a calm lake at dawn, mist over the water"],
    negative_prompt="fog",
    true_cfg_scale=3.0,
    seed=7,
    height=40,  # 10 × 10 latents → 25 packed image tokens (split unevenly over 2 ranks)
    width=40,
    num_inference_steps=2,
    output_type="np",
)


@pytest.fixture(scope="module")
def tiny_qwenimage(tmp_path_factory):
    from ditserve.tiny.qwenimage import make_tiny_qwenimage

    return make_tiny_qwenimage(tmp_path_factory.mktemp("tiny-qwenimage-engine"))


@pytest.fixture(scope="module")
def single_process(tiny_qwenimage):
    return Engine.from_pretrained(str(tiny_qwenimage)).generate(**REQUEST).images


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
def test_parallel_mode_matches_one_process(tiny_qwenimage, single_process, mode):
    with Engine.from_pretrained(str(tiny_qwenimage), device="cpu", **mode) as engine:
        got = engine.generate(**REQUEST).images
    assert len(got) == len(single_process) == 2
    for a, b in zip(got, single_process):
        assert a.shape == b.shape and b.std() > 0.02
        assert np.abs(a - b).max() < 1e-3


def test_bench_runs_beside_diffusers(tiny_qwenimage, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--model", str(tiny_qwenimage), "--device", "cpu", "--height", "32", "--width", "32", "--repeat", "1"]
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


def test_lora_matches_diffusers(tiny_qwenimage, tmp_path):
    """The same LoRA file (q, k and v of both streams apart, which land on our fused qkv layers, a modulation, an
    MLP layer and the output projection) in our engine and in diffusers' QwenImagePipeline.load_lora_weights: the
    same image; merged: the same again; unmerged: the base image again."""
    from diffusers import QwenImagePipeline

    engine = Engine.from_pretrained(str(tiny_qwenimage))
    dim = engine.pipeline.c.transformer.config.inner_dim
    modules = {f"transformer_blocks.0.attn.to_{x}": (dim, dim) for x in "qkv"}
    modules |= {f"transformer_blocks.1.attn.add_{x}_proj": (dim, dim) for x in "qkv"}
    modules |= {"transformer_blocks.1.img_mod.1": (6 * dim, dim), "transformer_blocks.0.txt_mlp.net.2": (dim, 4 * dim)}
    modules |= {"proj_out": (16, dim)}
    lora = tmp_path / "qwen_lora.safetensors"
    _write_lora(lora, modules)
    request = {**REQUEST, "prompt": REQUEST["prompt"][0], "negative_prompt": None}
    base = engine.generate(**request).images[0]

    engine.set_lora("style", str(lora), strength=0.7)
    ours = engine.generate(**request).images[0]
    pipe = QwenImagePipeline.from_pretrained(tiny_qwenimage)
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


@pytest.mark.parametrize(
    "style",
    ["lightning", "comfyui", "kohya"],
)
def test_published_lora_names_convert_to_diffusers_modules(style):
    """The names the published Qwen-Image LoRAs use: lightx2v's Lightning LoRAs (diffusers module names with
    kohya's lora_down/lora_up and an alpha), ComfyUI's `diffusion_model.` prefix with PEFT keys, kohya's flattened
    `lora_unet_` names."""
    from ditserve.lora import convert

    modules = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.59.img_mlp.net.2",
        "transformer_blocks.3.txt_mod.1",
    ]
    tensors = {}
    for module in modules:
        if style == "lightning":
            keys = (f"{module}.lora_down.weight", f"{module}.lora_up.weight")
            tensors[f"{module}.alpha"] = torch.tensor(8.0)
        elif style == "comfyui":
            keys = (f"diffusion_model.{module}.lora_A.weight", f"diffusion_model.{module}.lora_B.weight")
        else:
            flat = "lora_unet_" + module.replace(".", "_")
            keys = (f"{flat}.lora_down.weight", f"{flat}.lora_up.weight")
        tensors[keys[0]] = torch.randn(4, 64)
        tensors[keys[1]] = torch.randn(64, 4)
    lora = convert(tensors, prefer_architecture="qwen-image")
    assert lora.architecture == "qwen-image"
    assert sorted(m.targets for m in lora.modules) == sorted((m,) for m in modules)
    if style == "lightning":
        assert all(m.scale == pytest.approx(2.0) for m in lora.modules)  # alpha 8 / rank 4


@pytest.mark.gpu
def test_cuda_graphs_replay_what_eager_computes(tiny_qwenimage):
    """On CUDA in bf16 (the Triton kernels, cuDNN attention, SDPA with the text mask): replayed graphs give eager's
    images exactly, and eager stays close to diffusers' pipeline on the same weights."""
    from diffusers import QwenImagePipeline

    eager = Engine.from_pretrained(str(tiny_qwenimage), device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(str(tiny_qwenimage), device="cuda", dtype="bfloat16")
    for size in (64, 96, 64):
        request = {**REQUEST, "height": size, "width": size}
        want = eager.generate(**request).images
        got = graphed.generate(**request).images
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    pipe = QwenImagePipeline.from_pretrained(tiny_qwenimage, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in REQUEST.items() if k != "seed"}
    theirs = pipe(**{**kwargs, "height": 64, "width": 64}, generator=torch.Generator("cpu").manual_seed(7)).images
    for a, b in zip(want, theirs):
        assert np.abs(a - b).mean() < 2 / 255  # bf16: other kernels, other rounding
