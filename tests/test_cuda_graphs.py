"""CUDA graphs for the DiT forward (ditserve.accel.cuda_graph): a replayed graph gives what the eager forward gives,
one graph per input shape, forgotten on LoRA changes; with several GPUs the collectives inside are captured too."""

from __future__ import annotations

import math
import multiprocessing
import traceback

import numpy as np
import pytest
import torch
from lora_writers import write_ai_toolkit

from ditserve import ConfigError, Engine
from ditserve.accel.cuda_graph import enable_cuda_graphs
from ditserve.tiny.flux import TinyFluxSpec, make_tiny_flux


def test_cuda_graphs_need_cuda(tiny_dev):
    engine = Engine.from_pretrained(str(tiny_dev), device="cpu")
    assert engine.cuda_graphs == {}  # on by default, but only CUDA has them
    with pytest.raises(ValueError, match="CUDA"):
        enable_cuda_graphs(engine.pipeline.c.transformer, torch.device("cpu"))


def test_cli_flag_turns_them_off():
    import argparse

    from ditserve.cli_common import add_engine_flags, engine_args_from

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert engine_args_from(p.parse_args(["--device", "cpu"])).cuda_graphs is True
    assert engine_args_from(p.parse_args(["--device", "cpu", "--no-cuda-graphs"])).cuda_graphs is False


CALL = dict(prompt="a fox", negative_prompt="rain", true_cfg_scale=2.0, seed=3, num_inference_steps=4, output_type="np")


@pytest.mark.gpu
def test_replayed_graphs_match_eager(tiny_dev):
    eager = Engine.from_pretrained(str(tiny_dev), device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(str(tiny_dev), device="cuda", dtype="bfloat16")
    graphs = graphed.cuda_graphs["transformer"]
    assert eager.cuda_graphs == {}
    for size in (64, 96, 64):
        want = eager.generate(**CALL, height=size, width=size).images[0]
        got = graphed.generate(**CALL, height=size, width=size).images[0]
        np.testing.assert_array_equal(got, want)
    # Both CFG branches have one shape: one graph per image size, reused by every step and by the repeat of 64.
    assert graphs.captures == 2 and len(graphs.graphs) == 2
    batch = dict(CALL, num_images=2, height=64, width=64)
    for got, want in zip(graphed.generate(**batch).images, eager.generate(**batch).images):
        np.testing.assert_array_equal(got, want)
    assert graphs.captures == 3  # batch 2 is another shape


@pytest.mark.gpu
def test_lora_change_recaptures(tiny_dev, tmp_path):
    lora = write_ai_toolkit(tiny_dev, tmp_path / "a.safetensors")
    eager = Engine.from_pretrained(str(tiny_dev), device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(str(tiny_dev), device="cuda", dtype="bfloat16")
    call = dict(CALL, height=64, width=64)
    base = graphed.generate(**call).images[0]
    for engine in (eager, graphed):
        engine.set_lora("a", str(lora), 0.9)
    with_lora = graphed.generate(**call).images[0]
    np.testing.assert_array_equal(with_lora, eager.generate(**call).images[0])
    assert np.abs(with_lora - base).mean() > 1e-2
    for engine in (eager, graphed):
        engine.merge_lora_weights()
    np.testing.assert_array_equal(graphed.generate(**call).images[0], eager.generate(**call).images[0])
    graphed.unmerge_lora_weights()
    np.testing.assert_array_equal(graphed.generate(**call).images[0], base)


@pytest.fixture(scope="module")
def tiny_4_heads(tmp_path_factory):
    spec = TinyFluxSpec(num_attention_heads=4, num_layers=1, num_single_layers=2, seed=4)
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-4-heads"), spec)


# 40×40 pixels: 100 image tokens; 21 text tokens: padded shards for every degree, so the padded-key path is captured.
PARALLEL_CALL = dict(CALL, height=40, width=40, max_sequence_length=21)


def _gpus_for(mode: dict) -> int:
    degrees = (mode.get("ulysses_degree", 1), mode.get("ring_degree", 1), mode.get("tp_size", 1))
    return math.prod(degrees) * (2 if mode.get("cfg_parallel") else 1)


def _engines_in_one_process(model: str, modes: list[dict], results) -> None:
    """Multi-GPU engines one after another in this process (spawned fresh by `_in_a_fresh_process`); puts (error,
    [(what ran, the image, the image again) for each mode]). A mode the engine refuses gives ({"refused": field},
    None, None)."""
    try:
        done = []
        for mode in modes:
            try:
                engine = Engine.from_pretrained(model, device="cuda", dtype="float32", num_gpus=_gpus_for(mode), **mode)
            except ConfigError as e:
                done.append(({"refused": e.field}, None, None))
                continue
            with engine:
                ran = {"graphs": bool(engine.cuda_graphs)}
                exchanges = {m.exchange for m in engine.pipeline.c.transformer.modules() if hasattr(m, "exchange")}
                got = engine.generate(**PARALLEL_CALL).images[0]
                again = engine.generate(**PARALLEL_CALL).images[0]  # replayed, not captured
                # After the run: a copy-engine exchange that could not set up symmetric memory went through NCCL.
                ran["exchanges"] = sorted(
                    "NcclExchange" if getattr(e, "unavailable", False) else type(e).__name__ for e in exchanges
                )
            done.append((ran, got, again))
        results.put((None, done))
    except BaseException:
        results.put((traceback.format_exc(), None))


def _in_a_fresh_process(model: str, modes: list[dict]) -> list[tuple]:
    """Multi-GPU engines run in a process of their own: after one engine has set up symmetric memory, the same
    process's next one runs without it (parallel/symmetric.py), which would leave it untested in a shared process."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_engines_in_one_process, args=(model, modes, results))
    process.start()
    try:
        error, done = results.get(timeout=600)
    finally:
        process.join(timeout=120)
        if process.is_alive():
            process.kill()
    assert error is None, error
    return done


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mode",
    [
        dict(ulysses_degree=2),  # the copy-engine exchange, chosen by "auto"
        dict(ulysses_degree=2, ulysses_exchange="nccl"),
        dict(ring_degree=2),
        dict(tp_size=2),
        dict(tp_size=2, tp_all_reduce="two-shot"),
        dict(cfg_parallel=True),
        # Ulysses subgroups on 4 GPUs, through the copy engines ("auto"): two symmetric-memory groups side by side.
        dict(ulysses_degree=2, ring_degree=2),
        dict(ulysses_degree=2, tp_size=2),
        dict(ulysses_degree=2, cfg_parallel=True),
    ],
    ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()),
)
def test_graphs_with_collectives_match_one_gpu(tiny_4_heads, mode):
    if torch.cuda.device_count() < _gpus_for(mode):
        pytest.skip(f"needs {_gpus_for(mode)} CUDA devices")
    one = Engine.from_pretrained(str(tiny_4_heads), device="cuda", dtype="float32", cuda_graphs=False)
    want = one.generate(**PARALLEL_CALL).images[0]
    [(ran, got, again)] = _in_a_fresh_process(str(tiny_4_heads), [mode])
    assert ran["graphs"]
    if mode.get("ulysses_degree", 1) > 1:
        wanted = "NcclExchange" if mode.get("ulysses_exchange") == "nccl" else "CopyEngineExchange"
        assert ran["exchanges"] == [wanted]
    assert np.abs(got - want).max() < 1e-3
    np.testing.assert_array_equal(got, again)


@pytest.mark.gpu
def test_a_second_engine_in_one_process_runs_without_symmetric_memory(tiny_4_heads):
    """After an engine whose copy-engine exchange set up symmetric memory, the same process's next engine cannot set
    it up with its fresh ranks (every rank hung: docs/parallel.md): it goes through NCCL and gives the same
    image, and a method that needs symmetric memory, named outright, is refused with its flag."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    u2 = dict(ulysses_degree=2)
    first, second, named = _in_a_fresh_process(str(tiny_4_heads), [u2, u2, dict(u2, ulysses_exchange="copy-engine")])
    assert first[0]["exchanges"] == ["CopyEngineExchange"]
    assert second[0]["exchanges"] == ["NcclExchange"]
    assert np.abs(second[1] - first[1]).max() < 1e-3
    assert named[0] == {"refused": "ulysses_exchange"}


class _FakeGraph:
    """Stands in for a captured graph on the CPU: records the capture, replays by calling the forward."""

    made: list = []
    released: list = []

    def __init__(self, fn, args, kwargs, pool, device):
        if kwargs.get("fail"):
            raise RuntimeError("cannot capture")
        self.fn = fn
        _FakeGraph.made.append(tuple(a.shape for a in args))

    def replay(self, args, kwargs):
        return self.fn(*args, **kwargs)

    def release(self):
        _FakeGraph.released.append(self)


def test_graph_cache_keys_eviction_and_fallback(monkeypatch):
    """The dispatch around the graphs, on the CPU: one capture per shape, least recently used dropped, a failed
    capture runs eagerly from then on, grad mode and CPU tensors never use a graph."""
    import ditserve.accel.cuda_graph as cg

    monkeypatch.setattr(cg, "_Graph", _FakeGraph)
    monkeypatch.setattr(cg.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cg.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cg, "_signature", lambda args, kwargs: tuple((a.shape, kwargs.get("fail")) for a in args))
    _FakeGraph.made, _FakeGraph.released = [], []
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x, fail=False):
            calls.append(x.shape)
            return x * 2

    model = Model()
    graphs = cg.CudaGraphs(model, torch.device("cpu"), max_graphs=2)
    model.forward = graphs
    with torch.no_grad():
        for n in (1, 2, 1, 3, 2):
            assert torch.equal(model(torch.ones(n)), torch.full((n,), 2.0))
        assert _FakeGraph.made == [(torch.Size([1]),), (torch.Size([2]),), (torch.Size([3]),), (torch.Size([2]),)]
        # 1 was dropped
        assert list(graphs.graphs) == [("forward", ((torch.Size([3]), None),)), ("forward", ((torch.Size([2]), None),))]
        assert len(_FakeGraph.released) == 2  # the dropped graphs were freed: the first 2, then 1
        assert torch.equal(model(torch.ones(4), fail=True), torch.full((4,), 2.0))  # eager after a failed capture
        assert ("forward", ((torch.Size([4]), True),)) in graphs.failed
    model(torch.ones(5))  # grad mode: eager, no capture
    assert graphs.captures == 4 and len(_FakeGraph.made) == 4
    kept = list(graphs.graphs.values())
    cg.disable_cuda_graphs(model)
    assert not graphs.graphs and not graphs.failed
    assert _FakeGraph.released[2:] == kept  # disabling frees every graph still kept
    assert "forward" not in model.__dict__ and model(torch.ones(1)).item() == 2.0


def test_engine_frees_its_graphs_before_leaving_the_process_group(monkeypatch):
    """NCCL's communicator teardown blocks while a graph that captured its collectives is alive
    (pytorch/pytorch#115388): the engine's shutdown drops its graphs first, on every rank."""
    import ditserve.engine.engine as engine_mod

    order = []

    class Graphs:
        def reset(self):
            order.append("graphs freed")

    engine = engine_mod.Engine.__new__(engine_mod.Engine)  # only the shutdown path: no model is loaded
    engine.cuda_graphs = {"transformer": Graphs()}
    engine._rank_processes = []
    monkeypatch.setattr(engine_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(engine_mod.dist, "destroy_process_group", lambda: order.append("group left"))
    engine._shutdown()
    assert order == ["graphs freed", "group left"]
