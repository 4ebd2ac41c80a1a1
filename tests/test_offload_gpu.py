"""Offload on CUDA (marker `gpu`): the ring filled on its own stream, with CUDA graphs on (and compiled blocks),
gives the outputs of the resident model; memory figures are reported per stage and rank; a real out-of-memory fails
one request, frees what it took, and the next request runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lora_writers import write_ai_toolkit

from ditserve import Engine
from ditserve.accel.cuda_graph import enable_cuda_graphs
from ditserve.accel.offload import enable_layerwise_offload
from ditserve.utils.memory import DeviceOutOfMemory

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
REQUEST = dict(prompt="a red fox in snow", seed=5, height=64, width=64, num_inference_steps=4, output_type="np")
# float32 on the GPU: the same kernels read the same weights, so offload changes nothing beyond reduction order.
TOLERANCE = 1e-5


def _engine(folder, **kwargs) -> Engine:
    return Engine.from_pretrained(str(folder), device="cuda", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def resident(tiny_dev):
    return _engine(tiny_dev)


@pytest.fixture(scope="module")
def reference(resident):
    return resident.generate(**REQUEST)


@pytest.fixture(scope="module")
def ungraphed(tiny_dev):
    return _engine(tiny_dev, cuda_graphs=False)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_graphed_forward_with_offload_equals_resident(ungraphed, prefetch):
    model = copy.deepcopy(ungraphed.pipeline.c.transformer)
    inputs = ungraphed.pipeline.forward_inputs(64, 64)
    with torch.no_grad():
        expected = model(**inputs)
    torch.cuda.synchronize()
    resident_bytes = torch.cuda.memory_allocated()
    (offload,) = enable_layerwise_offload([model], CUDA, prefetch)
    offloaded_bytes = torch.cuda.memory_allocated()  # the ring and the small modules in place of every block
    graphs = enable_cuda_graphs(model, CUDA)
    slots = [b.data_ptr() for b in offload.ring.buffers]
    with torch.no_grad():
        outs = [model(**inputs) for _ in range(4)]  # two eager warm-ups, the capture, then replays
    assert graphs.captures == 1
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=TOLERANCE, atol=TOLERANCE)
    assert [b.data_ptr() for b in offload.ring.buffers] == slots
    assert all(p.is_pinned() for p in offload.host)
    # Weights on the device, not a forward's peak: at this tiny size activations and the graph pool outweigh them.
    if prefetch + 1 < len(model.repeated_blocks()):
        assert offloaded_bytes < resident_bytes


def test_engine_offload_with_graphs_and_caching(tiny_dev, resident):
    engine = _engine(
        tiny_dev,
        dit_layerwise_offload=True,
        offload_prefetch_size=1,
        text_encoder_cpu_offload=True,
        vae_cpu_offload=True,
    )
    assert engine.cuda_graphs  # graphs on
    for cache in (None, {"method": "dbcache", "threshold": 10.0, "max_warmup_steps": 1}):
        request = dict(REQUEST, cache=cache)
        expected = resident.generate(**request).images[0]
        got = engine.generate(**request)
        np.testing.assert_allclose(got.images[0], expected, atol=1e-4)
    memory = got.memory
    assert set(memory["stages"]) == {"encode", "prepare", "denoise", "decode"}
    assert all(isinstance(v, float) and v > 0 for v in memory["stages"].values())
    assert memory["ranks"][0]["device"] == "cuda:0" and memory["ranks"][0]["reserved_mb"] > 0
    assert got.peak_memory_mb == memory["peak_allocated_mb"] == max(memory["stages"].values())


def test_compiled_blocks_with_offload(tiny_dev, reference):
    engine = _engine(tiny_dev, dit_layerwise_offload=True, offload_prefetch_size=2, compile=True)
    got = engine.generate(**REQUEST).images[0]
    # Compiled kernels fuse and reduce in their own order: float32 pixels agree to a few 1e-4.
    np.testing.assert_allclose(got, reference.images[0], atol=5e-4)


def test_merged_lora_with_offload(tiny_dev, resident, tmp_path):
    path = write_ai_toolkit(tiny_dev, tmp_path / "a.safetensors", seed=31)
    engine = _engine(tiny_dev, dit_layerwise_offload=True, offload_prefetch_size=1)
    results = []
    for e in (resident, engine):
        e.set_lora("fox", str(path), 0.8)
        e.merge_lora_weights()
        results.append(e.generate(**REQUEST).images[0])
        e.unmerge_lora_weights()
        e.set_lora([])
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_out_of_memory_fails_one_request_and_frees_it(tiny_dev, reference):
    engine = _engine(tiny_dev, dit_layerwise_offload=True, offload_prefetch_size=1)
    engine.generate(**REQUEST)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    # Room for the small request, not for a tensor of more than the free memory.
    hog = int(free * 0.98)
    blocker = torch.empty(hog, dtype=torch.uint8, device=CUDA)
    try:
        with pytest.raises(DeviceOutOfMemory, match="out of device memory"):
            engine.generate(**dict(REQUEST, height=2048, width=2048, num_images=4))
    finally:
        del blocker
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 2**20
    np.testing.assert_allclose(engine.generate(**REQUEST).images[0], reference.images[0], atol=1e-4)


WAN_REQUEST = dict(prompt="a lighthouse", seed=7, height=48, width=16, num_frames=5, num_inference_steps=4)
WAN_REQUEST.update(guidance_scale=3.0, max_sequence_length=40, output_type="np")


def test_two_experts_on_one_ring_with_graphs(tiny_wan_experts):
    expected = _engine(tiny_wan_experts).generate(**WAN_REQUEST).videos[0]
    engine = _engine(tiny_wan_experts, dit_layerwise_offload=True)
    assert engine.block_offloads["transformer"].ring is engine.block_offloads["transformer_2"].ring
    # The experts take turns: their graphs share one memory pool, held once.
    assert engine.cuda_graphs["transformer"].pool is engine.cuda_graphs["transformer_2"].pool
    np.testing.assert_allclose(engine.generate(**WAN_REQUEST).videos[0], expected, atol=1e-4)
    assert all(g.captures and not g.failed for g in engine.cuda_graphs.values())


def test_offload_enabled_after_graphs_recaptures(tiny_wan_experts):
    """As benchmarks/offload.py does: the whole forward graphed resident, then layerwise offload and a reset; the
    block-run graphs are captured into a fresh pool (not the emptied one) and give the resident output."""
    engine = _engine(tiny_wan_experts)
    name, model = next(iter(engine.pipeline.transformers().items()))
    graphs = engine.cuda_graphs[name]
    inputs = engine.pipeline.forward_inputs(48, 16, num_frames=5)
    with torch.no_grad():
        expected = [model(**inputs) for _ in range(3)][-1]
        assert graphs.captures == 1
        enable_layerwise_offload([model], CUDA, 1)
        graphs.reset()
        got = [model(**inputs) for _ in range(3)][-1]
    assert not graphs.failed and graphs.captures == 2
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", [dict(tp_size=2), dict(ulysses_degree=2)], ids=["tp", "ulysses"])
def test_offload_on_two_gpus(tiny_wan, mode):
    request = dict(WAN_REQUEST, num_frames=9, guidance_scale=1.0)
    expected = _engine(tiny_wan).generate(**request).videos[0]
    with _engine(tiny_wan, num_gpus=2, dit_layerwise_offload=True, offload_prefetch_size=1, **mode) as engine:
        got = engine.generate(**request)
    np.testing.assert_allclose(got.videos[0], expected, atol=1e-3)
    assert [r["device"] for r in got.memory["ranks"]] == ["cuda:0", "cuda:1"]
    assert all(r["peak_allocated_mb"] > 0 for r in got.memory["ranks"])
