"""DiT caching (ditserve.accel.cache) at the block loop (ditserve.layers.blocks).

On a toy DiT whose blocks add w_k·c (c: the step's conditioning, so every residual is known in closed form) each
method's skipped steps and blocks are checked against a hand-computed expectation; per-row and per-branch state;
the same decisions on every gloo rank of a sequence-parallel group; real models (FLUX.1 digits, Z-Image, Wan) give
exactly the uncached output at threshold 0; bad settings are refused naming the CLI flag or the HTTP field.
"""

from __future__ import annotations

import json
import multiprocessing
import traceback

import numpy as np
import pytest
import torch
from torch import nn

from ditserve import ConfigError, Engine
from ditserve.accel.cache import caching
from ditserve.accel.cache_config import CacheConfig, mask_compute_steps
from ditserve.layers.blocks import BlockLoop, Blocks

WEIGHTS = (1.0, 2.0, 3.0, 4.0)


class AddBlock(nn.Module):
    def __init__(self, weight: float, calls: list):
        super().__init__()
        self.weight, self.calls = weight, calls

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.weight)
        return x + self.weight * c


def _add(block, state, c):
    return (block(state[0], c),)


class ToyDiT(nn.Module):
    """x + (Σ w_k)·c through four blocks; the modulated input TeaCache reads is x·c."""

    def __init__(self):
        super().__init__()
        self.calls: list[float] = []
        self.blocks = nn.ModuleList([AddBlock(w, self.calls) for w in WEIGHTS])
        self.block_loop = BlockLoop()

    def repeated_blocks(self):
        return list(self.blocks)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        (x,) = self.block_loop((x,), Blocks(self.blocks, _add, c), signal=lambda: x * c)
        return x


def run_toy(config: dict, cs: list, x=None, groups=None, model=None):
    """Steps of the toy with conditioning cs[t] (a number, or a tensor per row); returns (outputs, which blocks
    ran at each step, session)."""
    model = model or ToyDiT()
    x = torch.ones(1, 3, 2) if x is None else x
    outputs, ran = [], []
    with caching([model], CacheConfig.from_dict(config), len(cs), groups) as session:
        for c in cs:
            c = torch.as_tensor(c, dtype=torch.float32)
            c = c.view(-1, 1, 1) if c.dim() == 1 else c
            model.calls.clear()
            outputs.append(model(x, c))
            ran.append(tuple(model.calls))
            session.end_step()
    return outputs, ran, session


ALL, EDGES = WEIGHTS, (1.0, 4.0)
STEPS_C = [1.0, 1.0, 1.05, 1.2, 1.25, 1.3, 2.0, 2.05]


def test_dbcache_skips_the_middle_blocks_by_hand():
    # The first block's residual is c; it is compared with c at the last computed step:
    # step 2: .05/1 skip; 3: .2/1 compute (ref 1.2); 4: .05/1.2 skip; 5: .1/1.2 skip; 6: .8/1.2 compute; 7: .025 skip.
    config = dict(method="dbcache", fn=1, bn=1, threshold=0.1, max_warmup_steps=2)
    outputs, ran, session = run_toy(config, STEPS_C)
    assert ran == [ALL, ALL, EDGES, ALL, EDGES, EDGES, ALL, EDGES]
    # A skipped step adds the middle blocks' residual (2 + 3)·c of the last computed step.
    for step, last in ((2, 1.0), (4, 1.2), (5, 1.2), (7, 2.0)):
        c = STEPS_C[step]
        torch.testing.assert_close(outputs[step], torch.full((1, 3, 2), 1 + c + 5 * last + 4 * c))
    assert session.stats.to_dict()["blocks_skipped"] == 4 * 2 and session.stats.blocks_total == 8 * 4


def test_dbcache_limits():
    base = dict(method="dbcache", fn=1, bn=1, threshold=0.1, max_warmup_steps=2)
    # At most one skipped step in a row: step 5 computes (ref 1.3), so step 6 (.7/1.3) computes, 7 skips.
    _, ran, _ = run_toy(dict(base, max_continuous_cached_steps=1), STEPS_C)
    assert ran == [ALL, ALL, EDGES, ALL, EDGES, ALL, ALL, EDGES]
    # At most two skipped steps: 2 and 4; then every step computes.
    _, ran, _ = run_toy(dict(base, max_cached_steps=2), STEPS_C)
    assert ran == [ALL, ALL, EDGES, ALL, EDGES, ALL, ALL, ALL]
    # Four warm-up steps: 0-3 compute whatever the change.
    _, ran, _ = run_toy(dict(base, max_warmup_steps=4), STEPS_C)
    assert ran == [ALL, ALL, ALL, ALL, EDGES, EDGES, ALL, EDGES]


def test_taylorseer_forecasts_the_residual():
    # c grows by 0.01 a step: the change since step 1 stays under 0.1, so steps 2-7 skip; the middle residual
    # 5·c is linear in the step, which an order-1 forecast from steps 0 and 1 gets exactly (dbcache reuses 5·c₁).
    cs = [1 + 0.01 * t for t in range(8)]
    config = dict(fn=1, bn=1, threshold=0.1, max_warmup_steps=2)
    uncached = [torch.full((1, 3, 2), 1 + 10 * c) for c in cs]
    taylor, ran, _ = run_toy(dict(config, method="taylorseer"), cs)
    reused, _, _ = run_toy(dict(config, method="dbcache"), cs)
    assert ran == [ALL, ALL] + [EDGES] * 6
    for step in range(2, 8):
        torch.testing.assert_close(taylor[step], uncached[step])
        assert (reused[step] - uncached[step]).abs().max() > 0.01 * (step - 1)
    # Order 2 on c = 1 + a·t² (computes at 0, 1, 2): D0 = 5c₂, D1 = 5·3a, D2 = 5·(3a − a); the Taylor forecast
    # at step 3 is 5(c₂ + 3a + 2a/2) = 5(1 + 8a), not the true 5(1 + 9a).
    a = 0.001
    cs = [1 + a * t * t for t in range(4)]
    out, ran, _ = run_toy(dict(config, method="taylorseer", taylorseer_order=2, max_warmup_steps=3), cs)
    assert ran == [ALL, ALL, ALL, EDGES]
    torch.testing.assert_close(out[3], torch.full((1, 3, 2), 1 + cs[3] + 5 * (1 + 8 * a) + 4 * cs[3]))


def test_teacache_skips_the_whole_loop_by_hand():
    # The modulated input is x·c = c; its relative change adds up until it reaches 0.1:
    # 1: .02 skip; 2: +.0294 skip; 3: +.1429 compute; 4: .0417 skip; 5: +.04 skip; 6: .54 compute; 7: the last step.
    cs = [1.0, 1.02, 1.05, 1.2, 1.25, 1.3, 2.0, 2.05]
    outputs, ran, session = run_toy(dict(method="teacache", threshold=0.1), cs)
    assert ran == [ALL, (), (), ALL, (), (), ALL, ALL]
    torch.testing.assert_close(outputs[2], torch.full((1, 3, 2), 1 + 10 * 1.0))  # the step-0 residual
    assert session.stats.blocks_skipped == 4 * 4
    # Rescaled by 4x: step 1 adds .08 (skip), step 2 .08 + .1176 (compute), and no later change stays below.
    _, ran, _ = run_toy(dict(method="teacache", threshold=0.1, teacache_coefficients=[4.0, 0.0]), cs)
    assert ran == [ALL, ()] + [ALL] * 6


def test_step_masks():
    assert mask_compute_steps("fast", 10) == [True, True, False, False, True, False, False, True, False, True]
    assert mask_compute_steps("slow", 10) == [True, True, True, True, False, True, True, False, True, True]
    assert mask_compute_steps("none", 5) == [True] * 5
    fast28 = mask_compute_steps("fast", 28)
    assert sum(fast28) == 12 and fast28[:3] == [True] * 3 and fast28[-1]
    _, ran, _ = run_toy(dict(method="mask", mask="fast"), [1.0] * 10)
    assert ran == [ALL if computes else () for computes in mask_compute_steps("fast", 10)]
    _, ran, _ = run_toy(dict(method="mask", compute_steps=[0, 3, 5], fn=1), [1.0] * 6)
    assert ran == [ALL, (1.0,), (1.0,), ALL, (1.0,), ALL]


def test_rows_decide_alone_and_branches_keep_their_state():
    # Row 0 follows STEPS_C; row 1 changes by 50% a step, so it always computes and the middle blocks run for both,
    # but row 0 still gets its cached residual: each row as it would be alone.
    other = [1.5**t for t in range(len(STEPS_C))]
    config = dict(method="dbcache", fn=1, bn=1, threshold=0.1, max_warmup_steps=2)
    alone, _, _ = run_toy(config, STEPS_C)
    together, ran, _ = run_toy(config, [[a, b] for a, b in zip(STEPS_C, other)], x=torch.ones(2, 3, 2))
    assert ran == [ALL] * len(STEPS_C)
    for a, t in zip(alone, together):
        torch.testing.assert_close(t[:1], a)
    # Two calls a step are two branches (true CFG's positive and negative), each with its own history.
    model = ToyDiT()
    outputs = {0: [], 1: []}
    with caching([model], CacheConfig.from_dict(config), len(STEPS_C)) as session:
        for a, b in zip(STEPS_C, other):
            for branch, c in ((0, a), (1, b)):
                outputs[branch].append(model(torch.ones(1, 3, 2), torch.tensor(c)))
            session.end_step()
    for a, t in zip(alone, outputs[0]):
        torch.testing.assert_close(t, a)
    assert model.block_loop.hook is None  # taken off after the batch


class _FakeGraphs:
    """Stands for CudaGraphs: records which runs of steps were replayed, and runs them."""

    def __init__(self):
        self.names = []

    def replay(self, name, fn, args, kwargs=None):
        self.names.append(name[1:3])
        return fn(*args)


def test_graphed_runs_of_blocks(monkeypatch):
    """With CUDA graphs the hook replays the first fn blocks, the middle and the last bn blocks as separate
    graphs (the cached path leaves the middle out), with the same result as eager."""
    import ditserve.accel.cache as cache_mod

    fake = _FakeGraphs()
    monkeypatch.setattr(cache_mod, "CudaGraphs", _FakeGraphs)
    model = ToyDiT()
    model.__dict__["forward"] = fake  # where enable_cuda_graphs puts the engine's graphs
    config = dict(method="dbcache", fn=1, bn=1, threshold=0.1, max_warmup_steps=2)
    eager, _, _ = run_toy(config, STEPS_C)
    with caching([model], CacheConfig.from_dict(config), len(STEPS_C)) as session:
        graphed = []
        for c in STEPS_C:
            graphed.append(ToyDiT.forward(model, torch.ones(1, 3, 2), torch.tensor(c)))
            session.end_step()
    for g, e in zip(graphed, eager):
        torch.testing.assert_close(g, e)
    computed, skipped = [(0, 1), (1, 3), (3, 4)], [(0, 1), (3, 4)]
    expected = [computed, computed, skipped, computed, skipped, skipped, computed, skipped]
    assert fake.names == [name for step in expected for name in step]


# ---- the same decisions on every rank ---------------------------------------------------------------------------
def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from ditserve.parallel.sequence import SequenceParallelGroups

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        groups = type("Groups", (), {})()
        groups.sequence = SequenceParallelGroups(None, 1, 0, None, 1, 0, dist.group.WORLD)
        groups.tp_group = None
        shards = [c[:, rank * 2 : rank * 2 + 2] for c in _STEPS_SHARDED]
        _, ran, _ = run_toy(_SHARDED_CONFIG, shards, x=torch.ones(1, 2, 2), groups=groups)
        results.put((rank, ran, None))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


# Four tokens, two a rank. At step 3 tokens 0-1 (rank 0) barely change and tokens 2-3 (rank 1) change a lot: alone,
# rank 0 would skip where rank 1 computes.
_STEPS_SHARDED = [
    torch.tensor(c).view(1, 4, 1)
    for c in ([1.0] * 4, [1.01] * 4, [1.02] * 4, [1.01, 1.01, 1.6, 1.6], [1.02, 1.02, 1.62, 1.62])
]
_SHARDED_CONFIG = dict(method="dbcache", fn=1, bn=1, threshold=0.1, max_warmup_steps=1)


def test_decisions_agree_across_gloo_ranks():
    from ditserve.engine.distributed import free_port

    _, ran_whole, _ = run_toy(_SHARDED_CONFIG, _STEPS_SHARDED, x=torch.ones(1, 4, 2))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in processes:
        p.start()
    got = {}
    try:
        for _ in range(2):
            rank, ran, error = results.get(timeout=120)
            assert error is None, error
            got[rank] = ran
    finally:
        for p in processes:
            p.join(timeout=30)
    # Steps 1, 2: 1% and 2% since step 0 (skip); step 3: (2·.01 + 2·.6)/4 ≈ 0.3 (compute), though rank 0's own
    # shard changed by 1%; step 4: .06/5.22 since step 3 (skip).
    assert got[0] == got[1] == ran_whole
    assert ran_whole == [ALL, EDGES, EDGES, ALL, EDGES]


def test_engine_under_ulysses_and_cfg_parallel_decides_as_one_process(digits):
    """The digits model over 4 gloo ranks (Ulysses 2 × CFG parallel): the same skips as one process, and the
    same image up to float rounding (a rank that decided otherwise would hang or diverge)."""
    call = dict(DIGIT, cache={"method": "dbcache", "threshold": 0.12, "max_warmup_steps": 1})
    want = digits.generate(**call)
    with Engine.from_pretrained(None, device="cpu", num_gpus=4, ulysses_degree=2, cfg_parallel=True) as engine:
        got = engine.generate(**call)
    assert got.timings["cache"]["blocks_skipped"] > 0
    # With CFG parallelism rank 0 runs one branch: its counts are half of one process's.
    assert 2 * got.timings["cache"]["blocks_skipped"] == want.timings["cache"]["blocks_skipped"]
    assert np.abs(got.images[0] - want.images[0]).max() < 1e-3


# ---- real models --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return Engine.from_pretrained(None, device="cpu")


DIGIT = dict(prompt="the digit 3", seed=1, output_type="np", num_inference_steps=8)


def test_threshold_zero_is_the_uncached_output(digits):
    want = digits.generate(**DIGIT)
    assert "cache" not in want.timings
    for cache in (
        dict(method="dbcache", threshold=0.0, max_warmup_steps=0),
        dict(method="taylorseer", threshold=0.0, max_warmup_steps=0, taylorseer_order=2),
        dict(method="teacache", threshold=0.0, max_warmup_steps=0),
        dict(method="mask", compute_steps=list(range(8))),
    ):
        got = digits.generate(**DIGIT, cache=cache)
        np.testing.assert_array_equal(got.images[0], want.images[0])
        assert got.timings["cache"]["blocks_skipped"] == 0
        assert got.timings["cache"]["blocks_total"] == 8 * 2 * 4  # steps × CFG branches × blocks


def test_a_skipping_setting_skips_and_stays_close(digits):
    want = digits.generate(**DIGIT).images[0]
    got = digits.generate(**DIGIT, cache="teacache")
    report = got.timings["cache"]
    assert report["method"] == "teacache" and 0 < report["blocks_skipped"] < report["blocks_total"]
    assert np.abs(got.images[0] - want).mean() < 0.1
    # The engine's default cache applies to requests that name none; "none" turns it off.
    engine = Engine.from_pretrained(None, device="cpu", cache={"method": "mask", "mask": "fast"})
    assert engine.generate(**DIGIT).timings["cache"]["method"] == "mask"
    np.testing.assert_array_equal(engine.generate(**DIGIT, cache="none").images[0], want)


@pytest.mark.parametrize("family", ["zimage", "wan"])
def test_other_families(family, tiny_zimage, tiny_wan):
    folder = tiny_zimage if family == "zimage" else tiny_wan
    engine = Engine.from_pretrained(str(folder), device="cpu")
    call = dict(prompt="a fox", negative_prompt="rain", seed=2, num_inference_steps=6, output_type="np")
    call.update(guidance_scale=3.0, height=32, width=32)
    if family == "wan":
        call.update(num_frames=5)
    want = engine.generate(**call)
    out = want.videos[0] if family == "wan" else want.images[0]
    same = engine.generate(**call, cache=dict(method="dbcache", threshold=0.0, max_warmup_steps=0))
    np.testing.assert_array_equal(same.videos[0] if family == "wan" else same.images[0], out)
    fast = engine.generate(**call, cache=dict(method="mask", mask="fast", fn=1))
    assert fast.timings["cache"]["blocks_skipped"] > 0
    got = fast.videos[0] if family == "wan" else fast.images[0]
    assert np.isfinite(np.asarray(got, dtype=np.float32)).all()


# ---- bad settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cache", "field"),
    [
        ({"method": "fastest"}, "cache.method"),
        ({"method": "dbcache", "threshold": -1}, "cache.threshold"),
        ({"method": "dbcache", "fn": 0}, "cache.fn"),
        ({"method": "taylorseer", "taylorseer_order": 3}, "cache.taylorseer_order"),
        ({"method": "mask", "mask": "turbo"}, "cache.mask"),
        ({"method": "dbcache", "mask": "fast"}, "cache.mask"),
        ({"method": "teacache", "bn": 1}, "cache.bn"),
        ({"method": "dbcache", "treshold": 0.1}, "cache.treshold"),
        ({"method": "mask", "compute_steps": []}, "cache.compute_steps"),
    ],
)
def test_bad_settings_name_the_field(cache, field):
    with pytest.raises(ConfigError) as e:
        from ditserve.config import SamplingParams

        SamplingParams(prompt="x", cache=cache).validate()
    assert e.value.field == field


def test_bad_settings_on_the_command_line(capsys):
    from ditserve.cli import main

    assert main(["generate", "--prompt", "x", "--device", "cpu", "--cache", "dbcache", "--cache-threshold", "-1"]) == 2
    assert "--cache-threshold: must be a finite number" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--device", "cpu", "--cache-fn", "2"]) == 2
    assert "--cache: name the method" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--device", "cpu", "--cache", "dbcache", "--cache-fn", "4"]) == 2
    assert "--cache-fn: fn 4 + bn 0 leaves none of the model's 4 blocks" in capsys.readouterr().err


def test_bad_settings_over_http():
    from ditserve.server.schemas import ImageGenerationRequest, InvalidRequest, to_sampling_params, validated

    def params(cache):
        body = validated(ImageGenerationRequest, {"prompt": "x", "cache": cache})
        return to_sampling_params(body, 16, 512, 1000)

    assert params({"method": "mask", "mask": "fast"}).cache == {"method": "mask", "mask": "fast"}
    with pytest.raises(InvalidRequest) as e:
        params({"method": "dbcache", "max_cached_steps": -2})
    assert e.value.param == "cache.max_cached_steps"
    with pytest.raises(InvalidRequest) as e:
        params("dbcache")
    assert e.value.param == "cache"


def test_settings_travel_to_the_worker():
    from ditserve.config import SamplingParams
    from ditserve.engine import messages as msg

    params = SamplingParams(prompt="x", cache={"method": "teacache", "threshold": 0.2})
    back = msg.params_from_dict(json.loads(json.dumps(msg.params_to_dict(params))))
    assert CacheConfig.coerce(back.cache) == CacheConfig(method="teacache", threshold=0.2)


# ---- GPU: CUDA graphs -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cached_runs_under_cuda_graphs_match_eager():
    eager = Engine.from_pretrained(None, device="cuda", dtype="bfloat16", cuda_graphs=False)
    graphed = Engine.from_pretrained(None, device="cuda", dtype="bfloat16")
    graphs = graphed.cuda_graphs["transformer"]
    call = dict(DIGIT, num_inference_steps=20)
    for cache in ("dbcache", "taylorseer", "teacache", {"method": "mask", "mask": "fast"}):
        want = eager.generate(**call, cache=cache)
        got = graphed.generate(**call, cache=cache)
        assert got.timings["cache"] == want.timings["cache"]
        np.testing.assert_array_equal(got.images[0], want.images[0])
    # The runs of blocks were captured (first fn, middle, last bn), not the whole forward.
    names = [name for name, _ in graphs.graphs]
    assert "forward" not in names and any(name[0] == "blocks" for name in names)
    # Uncached requests on the same engine replay the whole forward, and give the eager image.
    np.testing.assert_array_equal(graphed.generate(**call).images[0], eager.generate(**call).images[0])
    assert "forward" in [name for name, _ in graphs.graphs]
