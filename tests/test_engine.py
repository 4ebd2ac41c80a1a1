"""Engine.resolve: the one place a request gets the model's defaults and its seed."""

from __future__ import annotations

import pytest

from ditserve.config import ConfigError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_dev):
    from ditserve.engine.engine import Engine

    return Engine.from_pretrained(str(tiny_dev), device="cpu")


def test_resolve_fills_defaults_and_draws_a_seed(engine):
    defaults = engine.defaults()
    resolved = engine.resolve(SamplingParams(prompt="x"))
    assert resolved.num_inference_steps == defaults.num_inference_steps
    assert (resolved.height, resolved.width) == (defaults.height, defaults.width)
    assert isinstance(resolved.seed, int) and 0 <= resolved.seed < 2**63
    assert engine.resolve(SamplingParams(prompt="x")).seed != resolved.seed  # drawn afresh per request
    assert engine.resolve(SamplingParams(prompt="x", seed=5)).seed == 5


def test_run_batch_reports_the_seeds_it_drew(engine):
    batch = [SamplingParams(prompt="a", height=32, width=32, num_inference_steps=1), SamplingParams(prompt="b", seed=9)]
    batch[1] = batch[1].replace(height=32, width=32, num_inference_steps=1)
    first, second = engine.run_batch(batch)
    assert first.seed == first.params.seed and isinstance(first.seed, int)
    assert second.seed == 9


def test_resolve_rejects_what_the_model_cannot_run(engine):
    with pytest.raises(ConfigError) as err:
        engine.resolve(SamplingParams(prompt="x", height=30, width=32))
    assert err.value.field == "height"
