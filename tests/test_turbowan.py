"""TurboWan (TurboDiffusion's SLA-tuned, rCM-distilled Wan): a tiny folder whose transformer is a .pth state dict in
the original Wan names with SLA's proj_l, sampled by the Engine against a plain-torch rendering of TurboDiffusion's
published sampling loop; rCM's times; the presets."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_sla_fp8_is_sla_on_fp8_operands(engine, tiny_wan):
    """`sla-fp8` per request: the same model, SLA's products over e4m3 operands (on the CPU the reference: q, k, v
    rounded as the kernels round them); refused where SLA is."""
    size = dict(num_frames=9, height=128, width=128, seed=SEED, num_inference_steps=2, output_type="latent")
    plain = engine.run(SamplingParams(prompt=PROMPT, attention=ATTENTION, **size)).videos[0].float()
    fp8 = engine.run(SamplingParams(prompt=PROMPT, attention="sla-fp8:0.5", **size)).videos[0].float()
    assert 0 < (fp8 - plain).norm() / plain.norm() < 0.1
    # tiny_wan has no SLA projections
    with Engine.from_pretrained(str(tiny_wan), device="cpu") as dense, pytest.raises(ConfigError) as e:
        dense.generate(PROMPT, attention="sla-fp8", **size)
    assert e.value.field == "attention" and "sla" in e.value.message


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


# ---- TurboDiffusion's -quant checkpoints (Int8Linear: int8 weights, one scale per 128 × 128 block) ----------------
def _quantize_int8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TurboDiffusion's weight quantiser, block by block: scale = amax / 128, round to nearest, saturate to int8."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(-(-rows // 128), -(-cols // 128))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = block.abs().max().clamp_min(1e-12)
            scale[i, j] = amax / 128
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block * (128 / amax)).round().clamp(-128, 127)
    return q, scale


def _block_product(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def test_block_int8_dequantisation():
    from ditserve.loader.weights import LoaderError, dequantize_block_int8

    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(3))  # 3 × 3 blocks, partial at the edges
    q, scale = _quantize_int8_blocks(w)
    got = dequantize_block_int8(q, scale)
    assert torch.equal(got, _block_product(q, scale))
    # within half a step, but for a block's largest positive value, saturated from 128 to 127 steps
    assert ((got - w).abs() <= scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260] * 1.0001).all()
    with pytest.raises(LoaderError, match=r"needs \(3, 3\)"):
        dequantize_block_int8(q, scale[:2])


def test_quantised_checkpoint_loads_its_block_products(turbowan, tmp_path):
    """A TurboWan folder whose .pth holds every block linear as Int8Linear does (SLA's proj_l stays float, as
    TurboDiffusion leaves it) loads the same DiT as a .pth holding those products in float."""
    import shutil

    from ditserve.loader.weights import LoaderError

    pth = turbowan / "transformer" / "turbowan.pth"
    state = torch.load(pth, weights_only=True)
    quantised, products = {}, {}
    for name, t in state.items():
        if name.startswith("blocks.") and t.dim() == 2 and "proj_l" not in name:
            q, scale = _quantize_int8_blocks(t)
            prefix = name.removesuffix("weight")
            quantised.update({prefix + "int8_weight": q, prefix + "scale": scale})
            products[name] = _block_product(q, scale)
        else:
            quantised[name] = products[name] = t
    assert len(quantised) > len(state)  # something was quantised
    models = []
    for label, content in (("quant", quantised), ("products", products)):
        folder = Path(shutil.copytree(turbowan, tmp_path / label))
        torch.save(content, folder / "transformer" / "turbowan.pth")
        with Engine.from_pretrained(str(folder), device="cpu") as engine:
            models.append(engine.pipeline.c.transformer.state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])

    del quantised["blocks.0.ffn.0.scale"]
    folder = Path(shutil.copytree(turbowan, tmp_path / "no-scale"))
    torch.save(quantised, folder / "transformer" / "turbowan.pth")
    with pytest.raises(LoaderError, match=r"blocks\.0\.ffn\.0\.int8_weight has no blocks\.0\.ffn\.0\.scale"):
        Engine.from_pretrained(str(folder), device="cpu")
