"""TurboWan (TurboDiffusion's SLA-tuned, rCM-distilled Wan): a tiny folder whose transformer is a .pth state dict in
the original Wan names with SLA's proj_l, sampled by the Engine against a plain-torch rendering of TurboDiffusion's
published sampling loop; rCM's times; the presets."""

from __future__ import annotations

import math

import pytest
import torch

from ditserve import Engine, SamplingParams
from ditserve.config import ConfigError
from ditserve.loader.folder import resolve_model
from ditserve.models.wan import video_position_ids
from ditserve.pipelines.base import offered_sparse_backends
from ditserve.pipelines.rcm import rcm_times
from ditserve.pipelines.wan import patchify, unpatchify

PROMPT = "a red kite over the dunes"
SEED, STEPS, SIGMA_MAX = 11, 3, 80.0
ATTENTION = "sla:0.5"  # 192 tokens: 2 query blocks of 128, 3 key blocks of 64, one chosen per query block


@pytest.fixture(scope="module")
def turbowan(tmp_path_factory):
    from ditserve.tiny.wan import make_tiny_wan_folder

    return make_tiny_wan_folder(tmp_path_factory.mktemp("tiny-turbowan"), turbowan=True)


@pytest.fixture(scope="module")
def engine(turbowan):
    with Engine.from_pretrained(str(turbowan), device="cpu", attention_backend=ATTENTION) as engine:
        yield engine


def published_loop(
    pipeline, prompt: str, seed: int, steps: int, sigma_max: float, num_frames: int, height: int, width: int
):
    """TurboDiffusion's wan2.1_t2v_infer.py sampling loop in plain torch on our DiT: TrigFlow times atan(sigma_max),
    1.5, 1.4, 1.0 (the first steps − 1), 0 turned into rectified-flow times, x = noise·t₀, then per step
    x ← (1 − t')(x − t·v) + t'·ε with fresh noise from the same generator, all float64."""
    text = pipeline.encode_prompt([prompt], 512)
    shape = (1, *pipeline.latent_shape(num_frames, height, width))
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    theta = torch.tensor([math.atan(sigma_max), *[1.5, 1.4, 1.0][: steps - 1], 0.0], dtype=torch.float64)
    t_steps = torch.sin(theta) / (torch.cos(theta) + torch.sin(theta))
    x = noise.double() * t_steps[0]
    grid = (shape[2], shape[3] // 2, shape[4] // 2)
    ids = video_position_ids(*grid, device="cpu")
    model = pipeline.c.transformer
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        timestep = (t_cur.float() * 1000).reshape(1)
        out = model(patchify(x.float(), (1, 2, 2)), timestep, text, ids, attention=ATTENTION, token_grid=grid)
        v = unpatchify(out, grid, (1, 2, 2)).double()
        x = (1 - t_next) * (x - t_cur * v) + t_next * torch.randn(shape, generator=generator, dtype=torch.float32)
    return x.float()


def test_engine_is_the_published_sampling_loop(engine):
    size = dict(num_frames=9, height=128, width=128)  # a (3, 8, 8) token grid
    got = engine.run(
        SamplingParams(prompt=PROMPT, seed=SEED, num_inference_steps=STEPS, output_type="latent", **size)
    ).videos[0]
    expected = published_loop(engine.pipeline, PROMPT, SEED, STEPS, SIGMA_MAX, **size)[0]
    assert got.shape == expected.shape
    assert torch.allclose(got.float(), expected, atol=1e-4), (got.float() - expected).abs().max()
    # the folder's sampler is rCM; sigma_max moves the start
    other = engine.run(
        SamplingParams(
            prompt=PROMPT,
            seed=SEED,
            num_inference_steps=STEPS,
            output_type="latent",
            options={"sigma_max": 2.0},
            **size,
        )
    ).videos[0]
    assert (other.float() - got.float()).abs().max() > 1e-3


def test_rcm_settings_refused_where_wrong(engine):
    with pytest.raises(ConfigError) as e:
        engine.run(SamplingParams(prompt=PROMPT, num_inference_steps=8, num_frames=9, height=48, width=16))
    assert e.value.field == "num_inference_steps"
    with pytest.raises(ConfigError) as e:
        engine.run(SamplingParams(prompt=PROMPT, num_frames=9, height=48, width=16, options={"flow_shift": 5.0}))
    assert e.value.field == "options.flow_shift"
    with pytest.raises(ConfigError) as e:
        engine.run(
            SamplingParams(
                prompt=PROMPT, num_frames=9, height=48, width=16, options={"sampler": "unipc", "sigma_max": 3.0}
            )
        )
    assert e.value.field == "options.sigma_max"


def test_rcm_times():
    t = rcm_times(4, 80.0)
    assert t[0].item() == pytest.approx(80 / 81) and t[-1].item() == 0
    assert torch.all(t[:-1] > t[1:])
    with pytest.raises(ValueError):
        rcm_times(5, 80.0)


@pytest.mark.parametrize(
    "name",
    ["turbowan2.1-t2v-1.3b-480p", "turbowan2.1-t2v-14b-480p", "turbowan2.1-t2v-14b-720p", "turbowan2.2-i2v-a14b-720p"],
)
def test_presets(name):
    source = resolve_model(name, "dummy")
    assert source.config("transformer")["sparse_linear_attention"] is True
    assert offered_sparse_backends(source) == ("sla", "sliding-tile")
    assert source.pipeline_config()["sampler"] == "rcm"
