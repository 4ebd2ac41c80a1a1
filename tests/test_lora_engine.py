"""The Engine's LoRA API: validation leaves the state untouched, exact unmerge in bf16, JSON-ready state."""

from __future__ import annotations

import json

import pytest
import torch
from lora_writers import write_ai_toolkit, write_kohya, write_poisoned
from safetensors.torch import save_file

from ditserve import Engine
from ditserve.layers import linear as linear_mod
from ditserve.layers.linear import LinearBase
from ditserve.lora import LoRAError
from ditserve.parallel.state import TensorParallelGroup


@pytest.fixture(scope="module")
def engine(tiny_dev):
    return Engine.from_pretrained(str(tiny_dev))


@pytest.fixture(scope="module")
def files(tiny_dev, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    wan = tmp / "wan.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4),
        },
        str(wan),
    )
    big = tmp / "full_size.safetensors"  # a FLUX.1-dev LoRA: right names, wrong sizes for the tiny model
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
        },
        str(big),
    )
    return {
        "a": write_ai_toolkit(tiny_dev, tmp / "a.safetensors", seed=21),
        "k": write_kohya(tiny_dev, tmp / "k.safetensors", seed=22, fused_single=True),
        "wan": wan,
        "big": big,
        "unknown": _unknown(tmp / "unknown.safetensors"),
        "nan": write_poisoned(tiny_dev, tmp / "nan.safetensors"),
    }


def _unknown(path):
    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(path))
    return path


def snapshot(engine):
    t = engine.pipeline.c.transformer
    adapters = {
        n: [(id(a.down), a.scale, a.row_offset) for a in m.lora]
        for n, m in t.named_modules()
        if isinstance(m, LinearBase)
    }
    return engine.list_loras(), {k: v.clone() for k, v in t.state_dict().items()}, adapters


def assert_unchanged(engine, before):
    state, weights, adapters = snapshot(engine)
    assert state == before[0]
    assert all(torch.equal(weights[k], before[1][k]) for k in weights)
    assert adapters == before[2]


BAD_CALLS = [
    (dict(lora_nickname="x1", lora_path="/no/such/file.safetensors"), "lora_path", "no such file"),
    (dict(lora_nickname="x2", lora_path="{wan}"), "lora_path", "looks like a LoRA for wan"),
    (dict(lora_nickname="x3", lora_path="{big}"), "lora_path", "wrong shape"),
    (dict(lora_nickname="x4", lora_path="{unknown}"), "lora_path", "unknown LoRA format"),
    (dict(lora_nickname="never-loaded"), "lora_nickname", "not loaded"),
    (dict(lora_nickname="x5", lora_path="{k}", strength=float("nan")), "strength", "finite number"),
    (dict(lora_nickname="x6", lora_path="{k}", strength="strong"), "strength", "finite number"),
    (dict(lora_nickname="x7", lora_path="{k}", strength=True), "strength", "finite number"),
    (dict(lora_nickname="x14", lora_path="{k}", strength=-1e9), "strength", "between -10 and 10"),
    (dict(lora_nickname="x15", lora_path="{nan}"), "lora_path", "lora_B.weight holds NaN"),
    (dict(lora_nickname="n" * 100_000, lora_path="{k}"), "lora_nickname", "the limit is 64"),
    (dict(lora_nickname="a/b", lora_path="{k}"), "lora_nickname", "only letters"),
    (dict(lora_nickname="\u0663", lora_path="{k}"), "lora_nickname", "only letters"),
    (dict(lora_nickname=["x8", "x9"], lora_path=["{k}", "{a}"], strength=[1.0]), "strength", "2 nicknames"),
    (dict(lora_nickname="x10", lora_path="{k}", target="transformer_2"), "target", "no transformer_2"),
    (dict(lora_nickname="x11", lora_path="{k}", target="vae"), "target", "unknown target"),
    (dict(lora_nickname="base", lora_path="{k}"), "lora_nickname", "already loaded"),
    # the first file is fine, the second is not: neither is loaded
    (dict(lora_nickname=["x12", "x13"], lora_path=["{k}", "{wan}"]), "lora_path", "does not fit"),
]


@pytest.mark.parametrize("merged", [False, True])
def test_bad_requests_leave_the_state_unchanged(engine, files, merged):
    engine.set_lora("base", str(files["a"]), 0.5)
    if merged:
        engine.merge_lora_weights()
    try:
        before = snapshot(engine)
        for kwargs, field, message in BAD_CALLS:
            kwargs = {
                k: [p.format(**files) for p in v] if isinstance(v, list) and k == "lora_path" else v
                for k, v in kwargs.items()
            }
            if isinstance(kwargs.get("lora_path"), str):
                kwargs["lora_path"] = kwargs["lora_path"].format(**files)
            with pytest.raises(LoRAError, match=message) as e:
                engine.set_lora(**kwargs)
            assert e.value.field == field, kwargs
            assert_unchanged(engine, before)
        for call, field in (
            (lambda: engine.merge_lora_weights(strength=float("inf")), "strength"),
            (lambda: engine.merge_lora_weights(strength=11.0), "strength"),
            (lambda: engine.merge_lora_weights(target="transformer_2"), "target"),
            (lambda: engine.unmerge_lora_weights(target=["transformer", "nope"]), "target"),
        ):
            with pytest.raises(LoRAError) as e:
                call()
            assert e.value.field == field
            assert_unchanged(engine, before)
    finally:
        engine.set_lora([])


def test_the_strength_bound_is_configurable(engine, files):
    engine.lora.max_strength = 20.0
    try:
        assert engine.set_lora("loud", str(files["a"]), 15.0)["targets"]["transformer"]["active"][0]["strength"] == 15
        with pytest.raises(LoRAError, match="between -20 and 20"):
            engine.set_lora("loud", strength=-21.0)
    finally:
        engine.lora.max_strength = 10.0
        engine.set_lora([])


def test_merge_without_active_lora_is_refused(engine):
    engine.set_lora([])
    with pytest.raises(LoRAError, match="call set_lora first"):
        engine.merge_lora_weights()


def test_list_loras_is_plain_json(engine, files):
    engine.set_lora(["json-a", "json-k"], [str(files["a"]), str(files["k"])], [1.0, 0.25], target=["transformer"])
    try:
        state = engine.list_loras()
        assert json.loads(json.dumps(state)) == state
        loaded = {e["nickname"]: e for e in state["loaded"]}
        assert loaded["json-k"]["format"] == "kohya-flux" and loaded["json-k"]["ranks"] == [4]
        assert loaded["json-a"]["path"] == str(files["a"])
        assert state["targets"]["transformer"] == {
            "active": [{"nickname": "json-a", "strength": 1.0}, {"nickname": "json-k", "strength": 0.25}],
            "mode": "dynamic",
            "merged": False,
            "merge_strength": None,
        }
        # a loaded nickname needs no path; a new set replaces the old one
        engine.set_lora("json-k", strength=-1.0)
        assert engine.list_loras()["targets"]["transformer"]["active"] == [{"nickname": "json-k", "strength": -1.0}]
        # set_lora on a merged target re-merges from W0 with the new set
        engine.merge_lora_weights(strength=0.5)
        engine.set_lora("json-a")
        t = engine.list_loras()["targets"]["transformer"]
        assert t["merged"] and t["merge_strength"] == 0.5 and t["active"] == [{"nickname": "json-a", "strength": 1.0}]
    finally:
        engine.set_lora([])
        engine.unmerge_lora_weights()


def test_bf16_unmerge_is_bitwise_after_100_cycles(tiny_dev, files):
    engine = Engine.from_pretrained(str(tiny_dev), dtype="bfloat16")
    t = engine.pipeline.c.transformer
    w0 = {k: v.clone() for k, v in t.state_dict().items()}
    engine.set_lora(["a", "k"], [str(files["a"]), str(files["k"])], [0.9, 0.3])
    merged_once = None
    for i in range(100):
        engine.merge_lora_weights(strength=1.0 + (i % 3) * 0.1)
        if merged_once is None:
            merged_once = {k: v.clone() for k, v in t.state_dict().items()}
            assert any(not torch.equal(merged_once[k], w0[k]) for k in w0)
        engine.unmerge_lora_weights()
        assert all(torch.equal(v, w0[k]) for k, v in t.state_dict().items()), f"drift after cycle {i}"
    engine.merge_lora_weights(strength=1.0)  # merging is recomputed from W0: the same bits every time
    assert all(torch.equal(v, merged_once[k]) for k, v in t.state_dict().items())
    engine.merge_lora_weights(strength=0.5)  # re-merging from the kept W0 copy, not from the merged weight
    engine.merge_lora_weights(strength=1.0)
    assert all(torch.equal(v, merged_once[k]) for k, v in t.state_dict().items())
    engine.unmerge_lora_weights()
    assert all(torch.equal(v, w0[k]) for k, v in t.state_dict().items())


@pytest.mark.parametrize("rank", [0, 1])
def test_lora_shards_follow_tensor_parallel_layout(monkeypatch, rank):
    """Each rank's share of an adapter gives that rank's share of the full layer's LoRA output."""
    monkeypatch.setattr(linear_mod, "tp_group", lambda: TensorParallelGroup(None, rank, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g)

    merged = linear_mod.MergedColumnParallelLinear(6, [8, 8, 12], bias=False)
    merged.weight.data.zero_()
    down, up = torch.randn(2, 6, generator=g), torch.randn(20, 2, generator=g)  # parts 1 and 2 (8 + 12 rows)
    a, b, offset = merged.lora_shard(down, up, 1, 2)
    merged.lora = [linear_mod.LinearLoRA(a, b, 0.5, offset)]
    full = 0.5 * (x @ down.T @ up.T)
    expected = torch.cat(
        [torch.zeros(3, 4), full[:, rank * 4 : rank * 4 + 4], full[:, 8 + rank * 6 : 8 + rank * 6 + 6]], 1
    )
    assert torch.allclose(merged(x), expected, atol=1e-6)

    row = linear_mod.RowParallelLinear(20, 5, bias=False, input_sizes=[8, 12])
    row.weight.data.zero_()
    down, up = torch.randn(2, 20, generator=g), torch.randn(5, 2, generator=g)
    a, b, offset = row.lora_shard(down, up)
    x_local = torch.randn(3, 10, generator=g)  # this rank's [4 of attention | 6 of mlp] inputs
    cols = torch.cat([down[:, rank * 4 : rank * 4 + 4], down[:, 8 + rank * 6 : 8 + rank * 6 + 6]], 1)
    assert torch.equal(a, cols) and offset == 0
    row.lora = [linear_mod.LinearLoRA(a, b, 1.0)]
    partial = row.apply_lora(x_local, torch.zeros(3, 5))  # what forward adds before its all-reduce
    assert torch.allclose(partial, x_local @ cols.T @ up.T, atol=1e-6)


@pytest.mark.gpu
def test_cuda_bf16_merged_matches_dynamic_and_unmerges_exactly(tiny_dev, files):
    import numpy as np

    engine = Engine.from_pretrained(str(tiny_dev), device="cuda", dtype="bfloat16")
    t = engine.pipeline.c.transformer
    w0 = {k: v.clone() for k, v in t.state_dict().items()}
    call = dict(prompt="a fox", seed=3, num_inference_steps=4, height=64, width=64)
    base = np.asarray(engine.generate(**call).images[0], dtype=np.int16)
    engine.set_lora(["a", "k"], [str(files["a"]), str(files["k"])], [0.8, -0.3])
    dynamic = np.asarray(engine.generate(**call).images[0], dtype=np.int16)
    engine.merge_lora_weights()
    merged = np.asarray(engine.generate(**call).images[0], dtype=np.int16)
    assert np.abs(dynamic - base).mean() > 3
    assert np.abs(merged - dynamic).mean() <= 1.0  # bf16: the merged weight is rounded once, dynamic per GEMM
    engine.unmerge_lora_weights()
    assert all(torch.equal(v, w0[k]) for k, v in t.state_dict().items())
    assert np.array_equal(np.asarray(engine.generate(**call).images[0], dtype=np.int16), base)


def test_lora_change_waits_for_the_running_request(engine, files):
    """A set_lora issued mid-request lands after it: the running request finishes with the state it started with."""
    import threading
    import time

    import numpy as np

    call = dict(prompt="a fox", seed=5, num_inference_steps=3, height=32, width=32)
    engine.set_lora([])
    base = np.asarray(engine.generate(**call).images[0])
    started, result = threading.Event(), {}

    def on_step(i, n):
        started.set()
        time.sleep(0.3)  # give the main thread time to try to change the LoRA mid-request

    worker = threading.Thread(target=lambda: result.setdefault("r", engine.generate(on_step=on_step, **call)))
    worker.start()
    started.wait(timeout=60)
    t0 = time.perf_counter()
    assert engine.list_loras()["targets"]["transformer"]["mode"] == "off"
    assert time.perf_counter() - t0 < 0.2  # answered without waiting for the request
    engine.set_lora("mid", str(files["a"]), 1.0)  # blocks until the request is done
    worker.join()
    try:
        assert np.array_equal(np.asarray(result["r"].images[0]), base)
        assert not np.array_equal(np.asarray(engine.generate(**call).images[0]), base)
    finally:
        engine.set_lora([])
