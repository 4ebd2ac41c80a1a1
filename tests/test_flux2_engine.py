"""FLUX.2 through the shared machinery: the parallel modes through the Engine on the CPU (gloo; one test per mode:
Ulysses with reference images, Ring and TP on [dev], CFG on [klein], whose true CFG has two branches), and LoRA
against diffusers' load_lora_weights, in diffusers' and BFL's names. The tiny folders have 2 heads, so Ulysses and
tensor parallelism split them; tolerances as in tests/test_parallel_engine.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditserve import Engine
from ditserve.tiny.flux2 import TinyFlux2Spec, make_tiny_flux2

REQUEST = dict(
    prompt="a lighthouse on a cliff",
    seed=7,
    height=40,  # 5 × 5 = 25 image tokens: split unevenly over 2 ranks
    width=40,
    num_inference_steps=2,
    max_sequence_length=24,
    output_type="np",
)
REFERENCE = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return make_tiny_flux2(tmp_path_factory.mktemp("tiny-flux2"), TinyFlux2Spec(seed=5))


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    return make_tiny_flux2(tmp_path_factory.mktemp("tiny-flux2-klein"), TinyFlux2Spec(klein=True, seed=6))


@pytest.fixture(scope="module")
def dev_engine(dev_folder):
    return Engine.from_pretrained(str(dev_folder))


CASES = {
    "ulysses=2+images": ("dev", dict(ulysses_degree=2), dict(images=[REFERENCE])),
    "ring=2": ("dev", dict(ring_degree=2), {}),
    "tp=2": ("dev", dict(tp_size=2), {}),
    "cfg": ("klein", dict(cfg_parallel=True), dict(guidance_scale=4.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_mode_matches_one_process(case, dev_folder, klein_folder):
    variant, mode, extra = CASES[case]
    folder = dev_folder if variant == "dev" else klein_folder
    request = {**REQUEST, **extra}
    want = Engine.from_pretrained(str(folder)).generate(**request).images[0]
    with Engine.from_pretrained(str(folder), device="cpu", num_gpus=2, **mode) as engine:
        got = engine.generate(**request).images[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3


def _pairs(modules: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(rank, i, generator=g) * 0.3, torch.randn(o, rank, generator=g) * 0.3)
        for m, (o, i) in modules.items()
    }


def test_lora_matches_diffusers_in_both_namings(dev_engine, tmp_path):
    """One LoRA on q, k, v apart (our fused qkv), a SwiGLU linear_in and a single block's to_qkv_mlp_proj (our
    packed linears), a single block's to_out (row-parallel over [attention | mlp]) and a shared modulation: our
    image equals diffusers' load_lora_weights; merged the same again; unmerged the base image again. The same LoRA
    in BFL's names (fused qkv) gives the same image."""
    from safetensors.torch import save_file

    cfg = dev_engine.pipeline.c.transformer.config
    dim, mlp = cfg.inner_dim, cfg.mlp_hidden
    modules = {f"transformer_blocks.0.attn.to_{x}": (dim, dim) for x in "qkv"}
    modules |= {
        "transformer_blocks.1.ff.linear_in": (2 * mlp, dim),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (3 * dim + 2 * mlp, dim),
        "single_transformer_blocks.1.attn.to_out": (dim, dim + mlp),
        "double_stream_modulation_img.linear": (6 * dim, dim),
    }
    pairs = _pairs(modules)
    diffusers_file = tmp_path / "flux2_lora.safetensors"
    save_file(
        {f"transformer.{m}.lora_{p}.weight": t for m, (a, b) in pairs.items() for p, t in (("A", a), ("B", b))},
        str(diffusers_file),
    )
    request = {k: v for k, v in REQUEST.items() if k != "output_type"} | {"output_type": "np"}
    base = dev_engine.generate(**request).images[0]

    pipe = dev_engine.pipeline.diffusers_pipeline()  # diffusers' DiT on our weights (PEFT leaves them unchanged)
    pipe.load_lora_weights(str(diffusers_file), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    kwargs = {k: v for k, v in request.items() if k != "seed"}
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(request["seed"])).images[0]

    dev_engine.set_lora("style", str(diffusers_file), strength=0.7)
    ours = dev_engine.generate(**request).images[0]
    assert np.abs(ours - base).max() > 1e-2  # the LoRA changes the picture
    assert np.abs(ours - theirs).max() < 1e-4
    dev_engine.merge_lora_weights()
    assert np.abs(dev_engine.generate(**request).images[0] - theirs).max() < 1e-4
    dev_engine.unmerge_lora_weights()
    dev_engine.set_lora([], [])
    assert np.array_equal(dev_engine.generate(**request).images[0], base)

    # BFL names (ComfyUI keys): one img_attn.qkv module (one A, B stacking q's, k's and v's rows) is diffusers'
    # to_q, to_k and to_v with that same A each.
    a_qkv = pairs["transformer_blocks.0.attn.to_q"][0]
    b_qkv = torch.cat([pairs[f"transformer_blocks.0.attn.to_{x}"][1] for x in "qkv"])
    bfl = {
        "double_blocks.0.img_attn.qkv": (a_qkv, b_qkv),
        "double_blocks.1.img_mlp.0": pairs["transformer_blocks.1.ff.linear_in"],
        "single_blocks.0.linear1": pairs["single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
        "single_blocks.1.linear2": pairs["single_transformer_blocks.1.attn.to_out"],
        "double_stream_modulation_img.lin": pairs["double_stream_modulation_img.linear"],
    }
    same = {
        m: pairs[m] for m in modules if m not in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
    }
    same |= {
        f"transformer_blocks.0.attn.to_{x}": (a_qkv.clone(), pairs[f"transformer_blocks.0.attn.to_{x}"][1])
        for x in "kv"
    }
    bfl_file, same_file = tmp_path / "bfl.safetensors", tmp_path / "same.safetensors"
    save_file(
        {f"diffusion_model.{m}.lora_{p}.weight": t for m, (a, b) in bfl.items() for p, t in (("A", a), ("B", b))},
        str(bfl_file),
    )
    save_file(
        {f"transformer.{m}.lora_{p}.weight": t for m, (a, b) in same.items() for p, t in (("A", a), ("B", b))},
        str(same_file),
    )
    dev_engine.set_lora("bfl", str(bfl_file))
    from_bfl = dev_engine.generate(**request).images[0]
    dev_engine.set_lora("same", str(same_file))
    from_diffusers_names = dev_engine.generate(**request).images[0]
    dev_engine.set_lora([], [])
    assert np.abs(from_bfl - base).max() > 1e-2
    assert np.abs(from_bfl - from_diffusers_names).max() < 1e-5


@pytest.mark.gpu
def test_cuda_graphs_replay_what_eager_computes(dev_folder):
    """On CUDA in bf16 (the Triton kernels and cuDNN attention): replayed graphs give eager's images exactly, one
    graph per shape (a reference image adds tokens: another shape), and eager stays close to diffusers."""
    from diffusers import Flux2Pipeline

    eager = Engine.from_pretrained(str(dev_folder), device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(str(dev_folder), device="cuda", dtype="bfloat16")
    for extra in ({}, {"height": 48, "width": 64}, {"images": [REFERENCE]}, {}):
        want = eager.generate(**{**REQUEST, **extra}).images[0]
        got = graphed.generate(**{**REQUEST, **extra}).images[0]
        np.testing.assert_array_equal(got, want)
    assert graphed.cuda_graphs["transformer"].captures == 3
    pipe = Flux2Pipeline.from_pretrained(dev_folder, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    want = eager.generate(**REQUEST).images[0]
    kwargs = {k: v for k, v in REQUEST.items() if k != "seed"}
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(REQUEST["seed"])).images[0]
    assert np.abs(want - theirs).mean() < 2 / 255
