"""The whole pipeline against diffusers' FluxPipeline on the same folder and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditserve import Engine


def mean_level_difference(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture(scope="module")
def engines():
    cache = {}

    def get(path, **kwargs):
        key = (str(path), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = Engine.from_pretrained(str(path), **kwargs)
        return cache[key]

    return get


CASES = {
    "default_size_few_steps": dict(prompt="a red fox", num_inference_steps=4),
    "non_square": dict(prompt="the digit 7", height=48, width=96, num_inference_steps=5, guidance_scale=5.0),
    "true_cfg": dict(prompt="a cat", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=3, height=64),
    "two_images": dict(prompt="two dogs", num_images=2, num_inference_steps=3, height=32, width=64),
    "short_t5": dict(prompt="a very long prompt " * 20, max_sequence_length=16, num_inference_steps=3, height=32),
}
DIFFUSERS_NAMES = {"num_images": "num_images_per_prompt"}


def run_diffusers(pipe, seed, **kwargs):
    kwargs = {DIFFUSERS_NAMES.get(k, k): v for k, v in kwargs.items()}
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_match_diffusers(case, tiny_dev, engines, diffusers_pipe):
    kwargs = CASES[case]
    ours = engines(tiny_dev).generate(seed=11, **kwargs)
    theirs = run_diffusers(diffusers_pipe(tiny_dev), 11, **kwargs)
    assert len(ours.images) == len(theirs) == kwargs.get("num_images", 1)
    for a, b in zip(ours.images, theirs):
        assert a.size == b.size
        assert np.asarray(a).std() > 5  # a real picture, not a flat one that would match anything
        assert mean_level_difference(a, b) <= 1.0


def test_schnell_and_sharded_folders(tiny_schnell, tiny_sharded, engines, diffusers_pipe):
    for folder in (tiny_schnell, tiny_sharded):
        ours = engines(folder).generate("a boat", seed=2, num_inference_steps=4, height=64, width=64)
        theirs = run_diffusers(diffusers_pipe(folder), 2, prompt="a boat", num_inference_steps=4, height=64, width=64)
        assert mean_level_difference(ours.images[0], theirs[0]) <= 1.0


def test_numpy_and_latent_outputs_match(tiny_dev, engines, diffusers_pipe):
    kwargs = dict(prompt="x", num_inference_steps=3, height=32, width=32)
    ours_np = engines(tiny_dev).generate(seed=4, output_type="np", **kwargs).images[0]
    theirs_np = run_diffusers(diffusers_pipe(tiny_dev), 4, output_type="np", **kwargs)[0]
    assert np.abs(ours_np - theirs_np).max() < 1e-4
    ours_lat = engines(tiny_dev).generate(seed=4, output_type="latent", **kwargs).images[0]
    theirs_lat = run_diffusers(diffusers_pipe(tiny_dev), 4, output_type="latent", **kwargs)[0]
    assert torch.allclose(ours_lat, theirs_lat, atol=1e-4)


def test_same_seed_same_image_and_seed_reported(tiny_dev, engines):
    engine = engines(tiny_dev)
    a = engine.generate("a tree", seed=9, num_inference_steps=2, height=32, width=32)
    b = engine.generate("a tree", seed=9, num_inference_steps=2, height=32, width=32)
    c = engine.generate("a tree", num_inference_steps=2, height=32, width=32)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    d = engine.generate("a tree", seed=c.seed, num_inference_steps=2, height=32, width=32)
    assert np.array_equal(np.asarray(c.images[0]), np.asarray(d.images[0]))


def test_result_reports_defaults_and_timings(tiny_dev, engines):
    result = engines(tiny_dev).generate("a tree", seed=1, num_inference_steps=3)
    p = result.params
    assert (p.height, p.width, p.guidance_scale, p.true_cfg_scale, p.max_sequence_length) == (256, 256, 3.5, 1.0, 512)
    t = result.timings
    assert len(t["steps"]) == 3 and all(s > 0 for s in t["steps"])
    assert t["total"] >= t["denoise"] >= sum(t["steps"]) * 0.5
    assert set(t) >= {"encode", "prepare", "denoise", "decode", "total", "steps"}
    assert result.peak_memory_mb is None  # CPU


@pytest.mark.gpu
def test_pipeline_matches_diffusers_bf16_cuda(tiny_dev, diffusers_pipe):
    engine = Engine.from_pretrained(str(tiny_dev), device="cuda", dtype="bfloat16")
    kwargs = dict(prompt="a red fox", num_inference_steps=8, height=128, width=96)
    ours = engine.generate(seed=5, **kwargs)
    theirs = run_diffusers(diffusers_pipe(tiny_dev, torch.bfloat16, "cuda"), 5, **kwargs)
    diff = mean_level_difference(ours.images[0], theirs[0])
    print(f"bf16 cuda pipeline: mean level difference {diff:.3f}, peak {ours.peak_memory_mb:.1f} MiB")
    assert diff <= 1.0
    assert ours.peak_memory_mb and ours.peak_memory_mb > 0
