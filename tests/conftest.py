from __future__ import annotations

import os
import warnings

import pytest
import torch

from ditserve.tiny.flux import TinyFluxSpec, make_tiny_flux

warnings.filterwarnings("ignore")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The built-in default model is written to a cache; tests use their own."""
    os.environ["DITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-dev"), TinyFluxSpec(seed=1))


@pytest.fixture(scope="session")
def tiny_schnell(tmp_path_factory):
    spec = TinyFluxSpec(guidance_embeds=False, dynamic_shift=False, seed=2, num_layers=1, num_single_layers=3)
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-schnell"), spec)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-sharded"), TinyFluxSpec(seed=3, shard_transformer=True))


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory):
    from ditserve.tiny.zimage import make_tiny_zimage

    return make_tiny_zimage(tmp_path_factory.mktemp("tiny-zimage"))


@pytest.fixture(scope="session")
def diffusers_pipe():
    """diffusers' FluxPipeline for a folder, cached per folder."""
    from diffusers import FluxPipeline

    cache = {}

    def get(path, dtype=torch.float32, device="cpu"):
        key = (str(path), dtype, device)
        if key not in cache:
            pipe = FluxPipeline.from_pretrained(path, dtype=dtype).to(device)
            pipe.set_progress_bar_config(disable=True)
            cache[key] = pipe
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    from ditserve.tiny.wan import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="session")
def tiny_wan_experts(tmp_path_factory):
    """Wan2.2 A14B's layout: two experts switched at boundary_ratio 0.875."""
    from ditserve.tiny.wan import TinyWanSpec, make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan-experts"), TinyWanSpec(two_experts=True, seed=3))


@pytest.fixture(scope="session")
def tiny_wan_ti2v(tmp_path_factory):
    """Wan2.2 TI2V-5B's layout: its VAE (16× spatial, 2×2 pixel patches) and expand_timesteps."""
    from ditserve.tiny.wan import TinyWanSpec, make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan-ti2v"), TinyWanSpec(ti2v=True, flow_shift=5.0, seed=4))


@pytest.fixture(scope="session")
def tiny_wan_i2v(tmp_path_factory):
    """Wan2.1 I2V's layout: WanImageToVideoPipeline with a tiny CLIP image encoder."""
    from ditserve.tiny.wan import TinyWanSpec, make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan-i2v"), TinyWanSpec(i2v=True, seed=5))


@pytest.fixture(scope="session")
def tiny_wan_i2v_experts(tmp_path_factory):
    """Wan2.2 I2V-A14B's layout: two experts switched at boundary_ratio 0.9, no CLIP."""
    from ditserve.tiny.wan import TinyWanSpec, make_tiny_wan

    spec = TinyWanSpec(i2v=True, two_experts=True, boundary_ratio=0.9, seed=6)
    return make_tiny_wan(tmp_path_factory.mktemp("tiny-wan-i2v-experts"), spec)
