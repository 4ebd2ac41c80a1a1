"""Every parallel mode through the Engine, on the CPU with gloo (--num-gpus counts processes): the same image as
one process. Tolerance: float32 outputs within 1e-3 absolute (tensor parallelism sums partial products in another
order; sequence parallelism merges attention blocks in another order), images within one intensity level."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import ConfigError, Engine
from ditserve.tiny.flux import TinyFluxSpec, make_tiny_flux


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
        # One run per mode, Ulysses inside its combination with Ring (4 ranks); test_sequence_parallel.py holds the
        # exchange at each degree and Ulysses on tensor-parallel heads, tests/test_cache.py Ulysses with CFG.
        dict(num_gpus=2, ring_degree=2),
        dict(num_gpus=2, cfg_parallel=True),
        dict(num_gpus=2, tp_size=2),
        dict(num_gpus=4, ulysses_degree=2, ring_degree=2),
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
        (dict(num_gpus=2, tp_size=2, tp_all_reduce="fastest"), "tp_all_reduce"),
        (dict(num_gpus=2, tp_size=2, tp_all_reduce="two-shot"), "tp_all_reduce"),  # symmetric memory: GPUs only
        (dict(num_gpus=2, tp_size=2, tp_all_reduce="nccl"), None),  # on the CPU, gloo's
        (dict(num_gpus=2, ulysses_degree=2, ulysses_exchange="nvlink"), "ulysses_exchange"),
        (dict(num_gpus=2, ulysses_degree=2, ulysses_exchange="copy-engine"), "ulysses_exchange"),  # GPUs only
        (dict(num_gpus=2, ulysses_degree=2, ulysses_exchange="nccl"), None),
        (dict(num_gpus=2, ulysses_degree=2, ulysses_exchange="auto"), None),  # on the CPU, gloo's all-to-all
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


def test_a_process_that_made_a_rendezvous_spawns_ranks_without_symmetric_memory(
    tiny_4_heads, single_process, caplog, monkeypatch
):
    """PyTorch numbers symmetric-memory rendezvous per process (parallel/symmetric.py): ranks spawned fresh could not
    line up with a driver that made some for an earlier engine (on GPUs every rank hung). So that driver's next world
    sends "auto" Ulysses exchanges through NCCL and refuses the methods that need symmetric memory by name."""
    import dataclasses

    import ditserve.parallel.symmetric as symmetric
    from ditserve.parallel.groups import ParallelConfig, ParallelConfigError

    u2 = ParallelConfig(num_gpus=2, ulysses_degree=2)
    monkeypatch.setattr(symmetric, "_rendezvous_made", 0)
    assert u2.for_fresh_ranks() is u2
    monkeypatch.setattr(symmetric, "_rendezvous_made", 1)  # as after an earlier engine's copy-engine exchange
    assert u2.for_fresh_ranks() == dataclasses.replace(u2, ulysses_exchange="nccl")
    for config, field in (
        (dataclasses.replace(u2, ulysses_exchange="copy-engine"), "ulysses_exchange"),
        (ParallelConfig(num_gpus=2, tp_size=2, tp_all_reduce="two-shot"), "tp_all_reduce"),
    ):
        with pytest.raises(ParallelConfigError, match="in a new process") as err:
            config.for_fresh_ranks()
        assert err.value.field == field
    ring = ParallelConfig(num_gpus=2, ring_degree=2)
    assert ring.for_fresh_ranks() is ring  # nothing of it needs symmetric memory
    capturing = caplog.at_level("WARNING", logger="ditserve.parallel.groups")
    with capturing, Engine.from_pretrained(str(tiny_4_heads), device="cpu", num_gpus=2, ulysses_degree=2) as engine:
        assert engine.parallel.ulysses_exchange == engine.args.ulysses_exchange == "nccl"
        got = engine.generate(**REQUEST).images[0]
    assert "in a new process" in caplog.text
    assert np.abs(got - single_process).max() < 1e-3


def test_symmetric_buffers_at_least_double_and_their_rendezvous_are_counted(monkeypatch):
    """Every symmetric buffer of ours (two-shot all-reduce, copy-engine exchange) comes from one place, which grows a
    replaced buffer at least twofold and counts the rendezvous that `for_fresh_ranks` weighs. On the CPU, with
    PyTorch's allocation and rendezvous stood in for."""
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    import ditserve.parallel.symmetric as symmetric

    monkeypatch.setattr(symm_mem, "empty", lambda n, dtype, device: torch.empty(n, dtype=dtype, device=device))
    monkeypatch.setattr(symm_mem, "rendezvous", lambda buffer, group: ("handle", buffer.numel()))
    monkeypatch.setattr(symmetric, "_rendezvous_made", 0)
    sizes = []
    for numel, grown_from in ((10, 0), (12, 10), (30, 10)):
        buffer, handle = symmetric.symmetric_buffer(numel, torch.float32, torch.device("cpu"), None, grown_from)
        assert handle == ("handle", buffer.numel())
        sizes.append(buffer.numel())
    assert sizes == [10, 20, 30]
    assert symmetric.rendezvous_made() == 3


TILED = dict(REQUEST, height=64, width=64, true_cfg_scale=1.0)  # 32×32 latents: 3×3 tiles of the tiny VAE's 16


def test_vae_tiles_decoded_across_ranks_match_one_process(tiny_4_heads, diffusers_pipe):
    """--vae-tiling: one process gives diffusers' tiled decode; 3 ranks (9 tiles, shared unevenly) give the same."""
    import torch

    one = Engine.from_pretrained(str(tiny_4_heads), device="cpu", vae_tiling=True)
    tiled = one.generate(**TILED).images[0]
    plain = Engine.from_pretrained(str(tiny_4_heads), device="cpu").generate(**TILED).images[0]
    assert np.abs(tiled - plain).max() > 1e-4  # the seams are blended: tiling did happen
    pipe = diffusers_pipe(tiny_4_heads)
    pipe.vae.enable_tiling()
    theirs = pipe(
        TILED["prompt"],
        height=64,
        width=64,
        num_inference_steps=TILED["num_inference_steps"],
        max_sequence_length=TILED["max_sequence_length"],
        generator=torch.Generator("cpu").manual_seed(TILED["seed"]),
        output_type="np",
    ).images[0]
    assert np.abs(tiled - theirs).max() < 1e-4
    with Engine.from_pretrained(str(tiny_4_heads), device="cpu", vae_tiling=True, num_gpus=3, ring_degree=3) as engine:
        got = engine.generate(**TILED).images[0]
        small = engine.generate(**{**TILED, "height": 32, "width": 32}).images[0]  # one tile: rank 0 alone
    assert np.abs(got - tiled).max() < 1e-3
    assert small.shape == (32, 32, 3)


@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (2, 4, 29, 41)])
def test_tiled_decode_is_diffusers_bit_for_bit(shape):
    import torch
    from diffusers import AutoencoderKL

    from ditserve.parallel.vae import needs_tiling, tiled_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[16, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    z = torch.randn(*shape)
    assert not needs_tiling(vae, z)  # tiling is diffusers' opt-in
    vae.enable_tiling()
    assert needs_tiling(vae, z)
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae, z), vae.decode(z).sample)
