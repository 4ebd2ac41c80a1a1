from __future__ import annotations

import pytest

from ditserve.config import ConfigError, EngineArgs, SamplingParams


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(prompt=""), None),
        (dict(prompt=3), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(height=30), "height"),
        (dict(width=8192), "width"),
        (dict(height=True), "height"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(true_cfg_scale=-1.0), "true_cfg_scale"),
        (dict(seed=-1), "seed"),
        (dict(num_images=0), "num_images"),
        (dict(max_sequence_length=513), "max_sequence_length"),
        (dict(output_type="gif"), "output_type"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
)
def test_sampling_params_validation_names_the_field(changes, field):
    params = SamplingParams(prompt="x").replace(**changes)
    if field is None:
        params.validate()
        return
    with pytest.raises(ConfigError) as err:
        params.validate()
    assert err.value.field == field
    assert str(err.value) == f"{field}: {err.value.message}"
    assert not err.value.message.startswith(field + ":")


def test_engine_args_validation():
    with pytest.raises(ConfigError, match="load_format"):
        EngineArgs(load_format="gguf")
    with pytest.raises(ConfigError, match="dtype"):
        EngineArgs(dtype="int4")
    with pytest.raises(ConfigError, match="attention_backend"):
        EngineArgs(attention_backend="xformers")
    with pytest.raises(ConfigError) as err:  # raised as ParallelConfigError, reported as the setting at fault
        EngineArgs(device="cpu", num_gpus=3, ulysses_degree=2)
    assert err.value.field == "num_gpus"
    assert err.value.message == "3 does not equal ulysses 2 × ring 1 × cfg 1 × tp 1 = 2"
    args = EngineArgs(device="cpu")
    assert str(args.resolved_device()) == "cpu" and str(args.resolved_dtype()) == "torch.float32"
