"""Offload on the CPU: the mechanism of layerwise DiT offload (which block is copied into which ring slot when),
component offload, the memory plan, memory reporting and the out-of-memory path.

On the CPU "host" and "device" are different buffers of the same memory, and every copy is synchronous: a block
that ran with the wrong weights (copied into the wrong slot, or overwritten before its turn) changes the output, so
the outputs with offload must equal those without, exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lora_writers import write_ai_toolkit

from ditserve import Engine
from ditserve.accel.memory_plan import ComponentSizes, DiTSize, plan
from ditserve.accel.offload import ComponentOffload, disable_layerwise_offload, enable_layerwise_offload
from ditserve.config import ConfigError, EngineArgs
from ditserve.utils.memory import DeviceOutOfMemory

CPU = torch.device("cpu")
REQUEST = dict(prompt="a red fox in snow", seed=5, height=32, width=32, num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module")
def flux(tiny_dev):
    """The tiny FLUX engine without offload (2 double + 2 single blocks of different sizes), and a forward's inputs."""
    engine = Engine.from_pretrained(str(tiny_dev), device="cpu")
    return engine, engine.pipeline.forward_inputs(32, 32)


@pytest.fixture(scope="module")
def flux_reference(flux):
    return flux[0].generate(**REQUEST).images[0]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("prefetch", [1, 2, 3, 8])
def test_layerwise_offload_equals_resident_and_reuses_the_ring(flux, prefetch):
    engine, inputs = flux
    model = copy.deepcopy(engine.pipeline.c.transformer)
    with torch.no_grad():
        expected = model(**inputs)
    blocks = model.repeated_blocks()
    (offload,) = enable_layerwise_offload([model], CPU, prefetch)
    ring = offload.ring
    assert model.block_loop.offload is offload
    assert ring.size == min(prefetch + 1, len(blocks))
    slots = [_storage(b) for b in ring.buffers]
    # Every block tensor is a view into its slot (block i in slot i % size), set once.
    for i, block in enumerate(blocks):
        for t in [*block.parameters(), *block.buffers()]:
            assert _storage(t) == slots[i % ring.size]
    with torch.no_grad():
        first = model(**inputs)
        second = model(**inputs)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert ring.copies == 2 * len(blocks)  # each block copied in once per forward
    assert [_storage(b) for b in ring.buffers] == slots  # the same buffers, not new ones
    # What a forward computes with is what the host buffers hold: zeroing block 0's host copy changes the output.
    offload.host[0].zero_()
    with torch.no_grad():
        assert not torch.equal(model(**inputs), expected)


def test_disabling_gives_the_blocks_their_own_storage_back(flux):
    engine, inputs = flux
    model = copy.deepcopy(engine.pipeline.c.transformer)
    with torch.no_grad():
        expected = model(**inputs)
    (offload,) = enable_layerwise_offload([model], CPU, 1)
    in_ring = {_storage(b) for b in offload.ring.buffers}
    disable_layerwise_offload([model])
    assert model.block_loop.offload is None
    assert all(_storage(t) not in in_ring for b in model.repeated_blocks() for t in b.parameters())
    with torch.no_grad():
        assert torch.equal(model(**inputs), expected)


def test_small_modules_stay_resident_and_blocks_leave(flux):
    engine, _ = flux
    model = copy.deepcopy(engine.pipeline.c.transformer)
    (offload,) = enable_layerwise_offload([model], CPU, 1)
    in_ring = {_storage(b) for b in offload.ring.buffers}
    in_blocks = {id(t) for b in model.repeated_blocks() for t in b.parameters()}
    outside = [t for t in model.parameters() if id(t) not in in_blocks]
    assert outside and all(_storage(t) not in in_ring for t in outside)
    assert offload.ring.nbytes < offload.host_bytes  # two slots hold less than the four blocks


@pytest.mark.parametrize(
    "cache",
    [{"method": "dbcache", "threshold": 10.0, "max_warmup_steps": 1}, {"method": "teacache", "threshold": 10.0}],
)
def test_offload_under_dit_caching(flux, tiny_dev, cache):
    """Caching skips blocks at the same seam: the runs it chooses (and TeaCache's signal, read from the first
    block's weights) still get their blocks copied in."""
    request = dict(REQUEST, num_inference_steps=4, cache=cache)
    expected = flux[0].generate(**request)
    engine = Engine.from_pretrained(str(tiny_dev), device="cpu", dit_layerwise_offload=True, offload_prefetch_size=1)
    got = engine.generate(**request)
    assert got.timings["cache"]["blocks_skipped"] > 0
    assert got.timings["cache"] == expected.timings["cache"]
    assert np.array_equal(got.images[0], expected.images[0])


@pytest.fixture(scope="module")
def offloaded_flux(tiny_dev):
    return Engine.from_pretrained(
        str(tiny_dev),
        device="cpu",
        dit_layerwise_offload=True,
        offload_prefetch_size=2,
        text_encoder_cpu_offload=True,
        vae_cpu_offload=True,
    )


def test_engine_with_every_offload_equals_without(offloaded_flux, flux_reference):
    engine = offloaded_flux
    assert engine.memory_plan.dit_layerwise_offload and engine.memory_plan.offload_prefetch_size == 2
    assert sorted(engine.component_offloads) == ["text_encoder", "text_encoder_2", "vae"]
    before = {name: o.loads for name, o in engine.component_offloads.items()}
    got = engine.generate(**REQUEST)
    assert np.array_equal(got.images[0], flux_reference)
    # Each component came to the device once for the request (its entry calls) and is back on the host.
    assert {name: o.loads - before[name] for name, o in engine.component_offloads.items()} == dict.fromkeys(before, 1)
    assert all(o.depth == 0 for o in engine.component_offloads.values())


def test_component_offload_holds_host_copies_between_calls():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    x = torch.randn(2, 4)
    expected = layer(x)
    offload = ComponentOffload(layer, CPU, pin=False)
    hosts = [host for _, host in offload.tensors]
    assert torch.equal(layer(x), expected)
    assert offload.loads == 1 and offload.nbytes == sum(t.numel() * 4 for t in layer.parameters())
    assert all(t.data_ptr() == h.data_ptr() for (t, _), h in zip(offload.tensors, hosts))


@pytest.fixture(scope="module")
def lora_file(tiny_dev, tmp_path_factory):
    return write_ai_toolkit(tiny_dev, tmp_path_factory.mktemp("lora") / "a.safetensors", seed=31)


@pytest.mark.parametrize("merged", [False, True], ids=["dynamic", "merged"])
def test_lora_with_offload_equals_without(flux, offloaded_flux, lora_file, merged):
    """Adapters stay on the device; a merge changes the host copies, which later forwards copy in; unmerging puts
    the base weights back."""
    path = lora_file
    results = []
    for engine in (flux[0], offloaded_flux):
        engine.set_lora("fox", str(path), 0.8)
        if merged:
            engine.merge_lora_weights()
        results.append(engine.generate(**REQUEST).images[0])
        engine.unmerge_lora_weights() if merged else None
        engine.set_lora([])
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[1], offloaded_flux.generate(**REQUEST).images[0])  # the LoRA did something
    assert np.array_equal(offloaded_flux.generate(**REQUEST).images[0], flux[0].generate(**REQUEST).images[0])


def test_two_experts_share_one_ring(tiny_wan_experts):
    request = dict(prompt="a lighthouse", seed=7, height=48, width=16, num_frames=5, num_inference_steps=4)
    request.update(guidance_scale=3.0, max_sequence_length=40, output_type="np")
    expected = Engine.from_pretrained(str(tiny_wan_experts), device="cpu").generate(**request).videos[0]
    engine = Engine.from_pretrained(str(tiny_wan_experts), device="cpu", dit_layerwise_offload=True)
    offloads = engine.block_offloads
    assert sorted(offloads) == ["transformer", "transformer_2"]
    assert offloads["transformer"].ring is offloads["transformer_2"].ring  # the idle expert is all on the host
    got = engine.generate(**request).videos[0]
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("mode", [dict(tp_size=2), dict(ulysses_degree=2)], ids=["tp", "ulysses"])
def test_offload_under_parallel_modes(tiny_wan, mode):
    """Each rank offloads its own shard; every rank reports its memory."""
    request = dict(prompt="a lighthouse", seed=7, height=48, width=16, num_frames=9, num_inference_steps=2)
    request.update(max_sequence_length=40, output_type="np")
    expected = Engine.from_pretrained(str(tiny_wan), device="cpu").generate(**request).videos[0]
    with Engine.from_pretrained(
        str(tiny_wan), device="cpu", num_gpus=2, dit_layerwise_offload=True, offload_prefetch_size=1, **mode
    ) as engine:
        got = engine.generate(**request)
    assert np.abs(got.videos[0] - expected).max() < 1e-3
    assert [r["rank"] for r in got.memory["ranks"]] == [0, 1]


# ---- memory reporting ---------------------------------------------------------------------------------------------
def test_memory_per_stage_and_rank_in_the_result(flux, monkeypatch):
    """torch counts no CPU memory: a fake allocator's peaks show where the figures go."""
    from ditserve.utils import memory

    peaks = iter(range(100, 10_000, 100))
    monkeypatch.setattr(memory, "peak_mb", lambda device: float(next(peaks)))
    result = flux[0].generate(**REQUEST)
    stages = result.memory["stages"]
    assert set(stages) == {"encode", "prepare", "denoise", "decode"}
    assert all(isinstance(v, float) for v in stages.values())
    assert result.memory["ranks"][0]["stages"] == stages and result.memory["ranks"][0]["device"] == "cpu"
    assert result.peak_memory_mb == result.memory["peak_allocated_mb"] >= max(stages.values())
    assert "stage_peak_memory_mb" not in result.timings


def test_memory_in_the_cli_summary_and_metrics(flux, monkeypatch):
    from ditserve.cli import _format_summary
    from ditserve.server.metrics import ServerMetrics
    from ditserve.utils import memory

    peaks = iter(range(100, 10_000, 100))
    monkeypatch.setattr(memory, "peak_mb", lambda device: float(next(peaks)))
    result = flux[0].generate(**REQUEST)
    stages = result.memory["stages"]
    summary = _format_summary(result, ["out.png"])
    assert f"peak memory {result.peak_memory_mb:.0f} MiB (encode {stages['encode']:.0f}, " in summary
    metrics = ServerMetrics()
    ranks = [
        dict(r, device=f"cuda:{i}", allocated_mb=10.0 + i, reserved_mb=20.0)
        for i, r in enumerate(2 * result.memory["ranks"])
    ]
    metrics.observe_result("images/generations", 1.0, 0.0, {"memory": dict(result.memory, ranks=ranks)}, 1.0)
    text = metrics.render().decode()
    assert 'ditserve_device_memory_allocated_mb{device="cuda:1"} 11.0' in text
    assert 'ditserve_device_memory_reserved_mb{device="cuda:0"} 20.0' in text
    assert f'ditserve_device_memory_peak_mb{{device="cuda:0"}} {ranks[0]["peak_allocated_mb"]}' in text


def test_cpu_memory_fields_are_present_and_empty(flux):
    memory = flux[0].generate(**REQUEST).memory
    assert memory["peak_allocated_mb"] is None
    assert memory["stages"] == dict.fromkeys(("encode", "prepare", "denoise", "decode"))


def test_out_of_memory_fails_one_request_and_the_next_runs(offloaded_flux, flux_reference, monkeypatch):
    block = offloaded_flux.pipeline.c.transformer.repeated_blocks()[1]
    forward = block.forward
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(block, "forward", failing)
    with pytest.raises(DeviceOutOfMemory, match="out of device memory.*--dit-layerwise-offload"):
        offloaded_flux.generate(**REQUEST)
    assert all(o.depth == 0 for o in offloaded_flux.component_offloads.values())
    assert np.array_equal(offloaded_flux.generate(**REQUEST).images[0], flux_reference)


# ---- settings and the memory plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("offload_prefetch_size", 0), ("offload_prefetch_size", 1.5), ("max_gpu_memory", -1), ("vae_cpu_offload", 1)],
)
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ConfigError) as e:
        EngineArgs(device="cpu", **{field: value})
    assert e.value.field == field


GIB = 2**30


def _sizes() -> ComponentSizes:
    # A video model: a 28 GiB DiT of 40 blocks (0.2 GiB outside them), an 11 GiB text encoder, a 0.5 GiB VAE.
    block = int(27.8 * GIB / 40)
    return ComponentSizes(
        dits={"transformer": DiTSize(int(28 * GIB), [block] * 40, 1)},
        others={"text_encoder": int(11 * GIB), "vae": GIB // 2},
    )


# Estimates (GiB): resident components + the DiT (or its parts outside the blocks, 0.2, and two slots of 0.7) +
# the larger of the biggest offloaded component and 8 for activations.
@pytest.mark.parametrize(
    "budget, layerwise, offloaded",
    [
        (80, False, []),  # 11.5 + 28 + 8 = 47.5
        (47.2, False, ["vae"]),  # 11 + 28 + 8 = 47: the VAE is the cheapest to move
        (45, False, ["text_encoder"]),  # 0.5 + 28 + 11 = 39.5
        (39.2, False, ["text_encoder", "vae"]),  # 28 + 11 = 39
        (24, True, []),  # 11.5 + 1.6 + 8: only the blocks' offload fits
        (13.5, True, ["text_encoder"]),  # 0.5 + 1.6 + 11
    ],
)
def test_the_budget_picks_the_cheapest_offloads_that_fit(budget, layerwise, offloaded):
    chosen = plan(EngineArgs(device="cpu", max_gpu_memory=budget), _sizes(), "video", None)
    assert (chosen.dit_layerwise_offload, chosen.offloaded) == (layerwise, offloaded)
    assert chosen.estimate_bytes <= budget * GIB
    assert "max_gpu_memory" in chosen.describe()


def test_under_cuda_graphs_the_activations_are_held_beside_an_offloaded_component():
    """A graph's pool keeps its activations between requests, so on a GPU (device_bytes given) an offloaded text
    encoder runs beside them: 13.5 GiB fit without graphs (0.5 + 1.6 + max(11, 8)); with them the least is 20.6
    (1.6 + 11 + 8, the VAE moved too), and at 21.5 nothing needs moving (11.5 + 1.6 + 8: a resident encoder runs
    beside the pool, no worse than without graphs)."""
    args = dict(device="cpu", max_gpu_memory=13.5, dit_layerwise_offload=True)
    chosen = plan(EngineArgs(**args, cuda_graphs=False), _sizes(), "video", 80 * GIB)
    assert chosen.offloaded == ["text_encoder"] and chosen.estimate_bytes <= 13.5 * GIB
    with pytest.raises(ConfigError) as e:
        plan(EngineArgs(**args), _sizes(), "video", 80 * GIB)
    assert e.value.field == "max_gpu_memory" and "20.6 GiB" in e.value.message
    assert plan(EngineArgs(**{**args, "max_gpu_memory": 21.5}), _sizes(), "video", 80 * GIB).offloaded == []


def test_a_budget_nothing_fits_is_refused_naming_the_flag():
    with pytest.raises(ConfigError) as e:
        plan(EngineArgs(device="cpu", max_gpu_memory=12.5), _sizes(), "video", None)  # 12.6 at the least
    assert e.value.field == "max_gpu_memory" and "least it needs" in e.value.message


def test_video_models_offload_their_blocks_when_they_would_not_fit():
    args = EngineArgs(device="cpu")
    assert plan(args, _sizes(), "video", 24 * GIB).dit_layerwise_offload
    assert not plan(args, _sizes(), "video", 80 * GIB).dit_layerwise_offload
    assert not plan(args, _sizes(), "image", 24 * GIB).dit_layerwise_offload  # image models: the user decides
    assert not plan(EngineArgs(device="cpu", dit_layerwise_offload=False), _sizes(), "video", GIB).dit_layerwise_offload


def test_engine_and_cli_refuse_a_budget_too_small(tiny_dev, capsys):
    with pytest.raises(ConfigError) as e:
        Engine.from_pretrained(str(tiny_dev), device="cpu", max_gpu_memory=1)
    assert e.value.field == "max_gpu_memory"
    from ditserve.cli import main

    common = ["generate", "--model", str(tiny_dev), "--device", "cpu", "--prompt", "x"]
    assert main([*common, "--max-gpu-memory", "1"]) == 2
    assert "ditserve: --max-gpu-memory: 1 GiB is too little for this model" in capsys.readouterr().err
    assert main([*common, "--offload-prefetch-size", "0"]) == 2
    assert "ditserve: --offload-prefetch-size: must be a number of blocks" in capsys.readouterr().err


def test_the_engine_applies_what_the_budget_picks(tiny_dev, flux_reference, monkeypatch):
    from ditserve.accel import memory_plan
    from ditserve.loader.folder import resolve_model

    monkeypatch.setattr(memory_plan, "ACTIVATION_ROOM_GIB", {"image": 0.0, "video": 0.0})
    sizes = memory_plan.component_sizes(resolve_model(str(tiny_dev)), torch.float32)
    budget = 0.9 * memory_plan.estimate(sizes, "image", False, 2, set()) / GIB  # everything resident does not fit
    expected = plan(EngineArgs(device="cpu", max_gpu_memory=budget), sizes, "image", None)
    assert expected.dit_layerwise_offload or expected.offloaded
    engine = Engine.from_pretrained(str(tiny_dev), device="cpu", max_gpu_memory=budget)
    assert engine.memory_plan == expected and expected.reason == "max_gpu_memory"
    assert bool(engine.block_offloads) == expected.dit_layerwise_offload
    assert sorted(engine.component_offloads) == expected.offloaded
    assert np.array_equal(engine.generate(**REQUEST).images[0], flux_reference)


def test_host_buffers_are_grouped_below_powers_of_two():
    from ditserve.accel.offload import _host_buffers

    sizes = [3 << 20] * 10 + [0]  # 30 MiB: allocations of 15, 6, 6 and 3 MiB, under 16, 8, 8 and 4
    buffers = list(_host_buffers(sizes, pin=False))
    assert [b.numel() for b in buffers] == sizes
    allocations = {}
    for b in buffers:
        allocations.setdefault(b.untyped_storage().data_ptr(), []).append(b.numel())
    totals = [sum(v) for v in allocations.values()]
    assert sum(totals) == sum(sizes) and len(totals) < len(sizes)
    assert all(total <= 1 << (total - 1).bit_length() <= 1.5 * total for total in totals if total)


# ---- the CUDA ordering, replayed on the CPU ----------------------------------------------------------------------
class RecordedOrder:
    """Copies done at once (as on the CPU), while the waits and records StreamOrder makes on CUDA are replayed on
    vector clocks: each stream counts its operations and knows how many of the other's it has waited for. Operation
    a (on stream S, its n-th) happens before operation b iff b's clock has seen n operations of S. A wait on an event
    recorded in an earlier run would tie a captured CUDA graph to work outside it: refused."""

    def __init__(self, host_blocks: dict[int, int], slots: int):
        self.host_blocks = host_blocks  # host buffer address → block index
        self.clocks = {"copy": {"copy": 0, "compute": 0}, "compute": {"copy": 0, "compute": 0}}
        self.copied: list[dict | None] = [None] * slots
        self.computed: list[dict | None] = [None] * slots
        self.events: list[tuple] = []  # ("copy" | "compute", block, slot, clock), in the order issued
        self.running: int | None = None  # the block whose forward started (a pre-hook sets it)
        self.run = 0
        self.recorded_in: dict[int, int] = {}  # id of an event's clock → the run it was recorded in

    def _join(self, stream: str, clock: dict | None, event: bool = True) -> None:
        assert clock is not None, "a wait on an event never recorded"
        assert not event or self.recorded_in[id(clock)] == self.run, "a wait on an event of an earlier run"
        for s in clock:
            self.clocks[stream][s] = max(self.clocks[stream][s], clock[s])

    def _tick(self, stream: str) -> dict:
        self.clocks[stream][stream] += 1
        clock = dict(self.clocks[stream])
        self.recorded_in[id(clock)] = self.run
        return clock

    def begin(self) -> None:
        self.run += 1
        self._join("copy", self.clocks["compute"], event=False)

    def copy(self, slot, dst, src, after_compute) -> None:
        dst.copy_(src)
        if after_compute:
            self._join("copy", self.computed[slot])
        self.copied[slot] = clock = self._tick("copy")
        self.events.append(("copy", self.host_blocks[src.data_ptr()], slot, clock))

    def before_compute(self, slot) -> None:
        self._join("compute", self.copied[slot])

    def after_compute(self, slot) -> None:
        self.computed[slot] = clock = self._tick("compute")
        block = self.running
        if block is None:  # no block forward ran: TeaCache's signal, which reads the block just copied to the slot
            block = next(e[1] for e in reversed(self.events) if e[0] == "copy" and e[2] == slot)
        self.events.append(("compute", block, slot, clock))
        self.running = None

    def end(self) -> None:
        self._join("compute", self.clocks["copy"], event=False)

    def synchronize(self) -> None:
        pass


def _record(offload, model) -> RecordedOrder:
    recorder = RecordedOrder({h.data_ptr(): i for i, h in enumerate(offload.host)}, offload.ring.size)
    offload.ring.order = recorder
    for i, block in enumerate(model.repeated_blocks()):
        block.register_forward_pre_hook(lambda *_, i=i: setattr(recorder, "running", i))
    return recorder


def _check_ordering(events: list[tuple]) -> int:
    """Every block computes after its copy has landed, and its slot is not overwritten until it is done."""
    computes = 0
    for p, (kind, block, slot, clock) in enumerate(events):
        if kind != "compute":
            continue
        computes += 1
        fill = max(q for q, e in enumerate(events[:p]) if e[0] == "copy" and e[1] == block)
        assert events[fill][2] == slot, f"block {block} computed in slot {slot}, copied to {events[fill][2]}"
        assert clock["copy"] >= events[fill][3]["copy"], f"block {block} computed before its copy landed"
        for kind2, other, slot2, clock2 in events[fill + 1 :]:
            if kind2 == "copy" and slot2 == slot:
                assert clock2["compute"] >= clock["compute"], f"block {other} overwrote block {block} too early"
    return computes


@pytest.mark.parametrize("prefetch", [1, 2])
def test_cuda_ordering_keeps_every_slot_until_its_block_is_done(flux, prefetch):
    engine, inputs = flux
    model = copy.deepcopy(engine.pipeline.c.transformer)
    (offload,) = enable_layerwise_offload([model], CPU, prefetch)
    recorder = _record(offload, model)
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
    assert _check_ordering(recorder.events) == 2 * len(model.repeated_blocks())


def test_cuda_ordering_under_caching(tiny_dev):
    """A cache hook runs the loop in parts (and TeaCache reads the first block outside it): each part orders its
    own copies."""
    engine = Engine.from_pretrained(str(tiny_dev), device="cpu", dit_layerwise_offload=True, offload_prefetch_size=1)
    offload = engine.block_offloads["transformer"]
    recorder = _record(offload, engine.pipeline.c.transformer)
    for cache in ({"method": "dbcache", "threshold": 10.0, "max_warmup_steps": 1}, {"method": "teacache"}):
        result = engine.generate(**dict(REQUEST, num_inference_steps=4, cache=cache))
        assert result.timings["cache"]["forwards"] == 4
        if cache["method"] == "dbcache":
            assert result.timings["cache"]["blocks_skipped"] > 0  # the loop ran in parts
    assert _check_ordering(recorder.events) > 0


def test_the_ordering_check_catches_a_copy_that_does_not_wait(flux, monkeypatch):
    from ditserve.accel.offload import Ring

    engine, inputs = flux
    model = copy.deepcopy(engine.pipeline.c.transformer)
    (offload,) = enable_layerwise_offload([model], CPU, 1)
    recorder = _record(offload, model)
    hasty = lambda self, slot, host: self.order.copy(slot, self.buffers[slot][: host.numel()], host, False)  # noqa: E731
    monkeypatch.setattr(Ring, "copy", hasty)
    with torch.no_grad():
        model(**inputs)
    with pytest.raises(AssertionError, match="overwrote block 0 too early"):
        _check_ordering(recorder.events)


def test_the_ordering_check_catches_a_wait_on_an_earlier_run(flux, monkeypatch):
    from ditserve.accel.offload import Ring

    engine, inputs = flux
    model = copy.deepcopy(engine.pipeline.c.transformer)
    (offload,) = enable_layerwise_offload([model], CPU, 1)
    _record(offload, model)
    monkeypatch.setattr(Ring, "begin_run", lambda self: self.order.begin())  # forgets to start the run afresh
    with torch.no_grad():
        model(**inputs)
        with pytest.raises(AssertionError, match="an event of an earlier run"):
            model(**inputs)
