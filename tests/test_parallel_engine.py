"""Every parallel mode through the Engine, on the CPU with gloo (--num-gpus counts processes): the same image as
one process. Tolerance: float32 outputs within 1e-3 absolute (tensor parallelism sums partial products in another
order; sequence parallelism merges attention blocks in another order), images within one intensity level."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import ConfigError, Engine
from ditserve.tiny import TinyFluxSpec, make_tiny_flux


@pytest.fixture(scope="module")
def tiny_4_heads(tmp_path_factory):
    spec = TinyFluxSpec(num_attention_heads=4, num_layers=1, num_single_layers=2, seed=4)
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-4-heads"), spec)


REQUEST = dict(
    prompt="a lighthouse",
    negative_prompt="fog",
    true_cfg_scale=3.0,
    seed=7,
    height=40,  # 20 × 20 latents → 100 image tokens: padded for 3-way splits, even for 2 and 4
    width=40,
    num_inference_steps=3,
    max_sequence_length=21,  # 21 text tokens: padded shards for every degree
    output_type="np",
)


@pytest.fixture(scope="module")
def single_process(tiny_4_heads):
    return Engine.from_pretrained(str(tiny_4_heads)).generate(**REQUEST).images[0]


@pytest.mark.parametrize(
    "mode",
    [
        dict(num_gpus=2, ulysses_degree=2),
        dict(num_gpus=2, ring_degree=2),
        dict(num_gpus=2, cfg_parallel=True),
        dict(num_gpus=2, tp_size=2),
        dict(num_gpus=4, ulysses_degree=2, ring_degree=2),
        dict(num_gpus=4, ulysses_degree=2, cfg_parallel=True),
        dict(num_gpus=4, tp_size=2, ulysses_degree=2),
        dict(num_gpus=3, ring_degree=3),
    ],
    ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items() if k != "num_gpus"),
)
def test_parallel_mode_matches_one_process(tiny_4_heads, single_process, mode):
    with Engine.from_pretrained(str(tiny_4_heads), device="cpu", **mode) as engine:
        got = engine.generate(**REQUEST).images[0]
        again = engine.generate(**{**REQUEST, "seed": 8}).images[0]  # the ranks keep following
    assert got.shape == single_process.shape
    assert np.abs(got - single_process).max() < 1e-3
    assert np.abs(again - single_process).max() > 1e-2  # another seed is another picture


@pytest.mark.parametrize(
    "mode, field",
    [
        (dict(num_gpus=2, ulysses_degree=4), "num_gpus"),
        (dict(num_gpus=4, tp_size=4), None),  # multiplies out; 4 heads / 4 ranks is fine
        (dict(num_gpus=0), "num_gpus"),
    ],
)
def test_parallel_flags_must_multiply_out(mode, field):
    from ditserve.config import EngineArgs

    if field is None:
        EngineArgs(device="cpu", **mode)
        return
    with pytest.raises(ConfigError) as err:
        EngineArgs(device="cpu", **mode)
    assert err.value.field == field


def test_heads_that_cannot_split_are_refused(tiny_dev):
    # tiny_dev has 2 heads: Ulysses over 4 ranks cannot split them.
    with pytest.raises(Exception, match="ulysses_degree: 2 heads"):
        Engine.from_pretrained(str(tiny_dev), device="cpu", num_gpus=4, ulysses_degree=4)


def test_batches_run_on_every_rank(tiny_4_heads):
    """Engine.run_batch (what the server's worker calls) broadcasts the batch: same images as one process."""
    from ditserve.config import SamplingParams

    batch = [SamplingParams(**{**REQUEST, "seed": s}) for s in (1, 2)]
    alone = Engine.from_pretrained(str(tiny_4_heads)).run_batch(batch)
    with Engine.from_pretrained(str(tiny_4_heads), device="cpu", num_gpus=2, ring_degree=2) as engine:
        together = engine.run_batch(batch)
    assert [r.seed for r in together] == [1, 2]
    for a, b in zip(alone, together):
        assert np.abs(a.images[0] - b.images[0]).max() < 1e-3
