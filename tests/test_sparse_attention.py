"""Sparse attention backends (layers/sparse_attention.py): the block-sparse kernel against its torch reference
(Triton's interpreter on the CPU, and on CUDA), the patterns' tables, and the backends through the Engine on a tiny
Wan folder: per request, refused where they do not fit, under Ulysses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditserve import Engine
from ditserve.config import ConfigError
from ditserve.layers.attention import attention_reference
from ditserve.layers.sparse_attention import (
    SlidingTile,
    sliding_tile_attention,
    sliding_tile_density,
    tile_layout,
)

REQUEST = dict(
    prompt="a lighthouse on a cliff",
    seed=7,
    height=48,  # 3 × 1 tokens a frame, 3 latent frames: a (3, 3, 1) grid of 9 tokens, split 5 + 4 over 2 ranks
    width=16,
    num_frames=9,
    num_inference_steps=2,
    max_sequence_length=40,
    output_type="np",
)


def test_kernel_matches_reference_in_triton_interpreter():
    pytest.importorskip("triton")
    root = str(Path(__file__).resolve().parents[1])  # this checkout's ditserve, whatever is installed
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("DITSERVE_DISABLE_TRITON", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sparse_kernel_checks.py"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sparse kernel checks passed" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", ["small", "wan"])
def test_kernel_matches_reference_cuda(sizes):
    sys.path.insert(0, str(Path(__file__).parent))
    from sparse_kernel_checks import run_all

    run_all("cuda", torch.bfloat16, 2e-2, sizes)


def test_hopper_sla_kernel_compiles_for_sm90_without_spills_or_serialised_wgmma(tmp_path):
    """The Gluon SLA kernel (kernels/sla_fp8_hopper.py) compiled here for sm_90 (no GPU needed): no register spills,
    and ptxas keeps its wgmmas asynchronous (warning C7514 says it serialised them, which undoes the kernel's
    overlap of products and softmax)."""
    sla = pytest.importorskip("ditserve.kernels.sla_fp8_hopper")
    if sla.gluon is None:
        pytest.skip("this Triton has no Gluon")
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    gl, desc = sla.gl, sla.TensorDescriptor

    def descriptor(dtype, block):
        base = torch.zeros(4096, 128, dtype=dtype)
        return desc.from_tensor(base, block, gl.NVMMASharedLayout.get_default_for(block, sla._gluon_dtype(dtype)))

    descriptors = dict(
        q_desc=descriptor(torch.float8_e4m3fn, [128, 128]),
        k_desc=descriptor(torch.float8_e4m3fn, [64, 128]),
        v_desc=descriptor(torch.float8_e4m3fn, [128, 64]),
        kvw_desc=descriptor(torch.bfloat16, [128, 128]),
    )
    kernel = sla._sla_fp8_ws_kernel
    constants = dict(D=128, MAX_COUNT=118, KV=64, STAGES=sla.STAGES, EPILOGUE=1, CONSUMER_REGS=240)
    pointers = dict(OUT="*bf16", LUT="*i32", QS="*fp32", KS="*fp32", VS="*fp32", QE="*bf16", E1="*fp32", E2="*fp32")
    signature, constexprs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
        elif name in descriptors:
            signature[name] = native_specialize_impl(BaseBackend, descriptors[name], False, True, True)[0]
        else:
            signature[name] = pointers.get(name, "fp32" if name == "lin_eps" else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in pointers}
    compiled = triton.compile(
        GluonASTSource(kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 128),
        options={"num_warps": 4},
    )
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run(
        [get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    assert "C7514" not in report.stderr, report.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in report.stderr, report.stderr
    assert "setmaxnreg" in compiled.asm["ptx"]  # the consumers' registers come from the producer's


@pytest.mark.gpu
def test_hopper_sla_kernel_matches_triton_kernel_and_reference():
    """On Hopper, SLA's FP8 launches take the Gluon kernel: odd LUT widths (a last pair of one block), partial last
    blocks, two batch entries, with and without the linear epilogue, against the Triton kernel (a `config` keeps
    it) and the float reference over the same e4m3 operands."""
    from ditserve.kernels import block_sparse_attention as kernel
    from ditserve.kernels import sla_fp8_hopper
    from ditserve.layers.sparse_attention import (
        SLA_KEY_BLOCK,
        SLA_QUERY_BLOCK,
        _runs,
        sla_block_map,
        sla_key_statistics,
    )

    if not torch.cuda.is_available() or not sla_fp8_hopper.usable(
        torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16), SLA_KEY_BLOCK
    ):
        pytest.skip("needs a Hopper GPU and Gluon")
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    g = torch.Generator(device="cuda").manual_seed(0)
    for b, n, heads, topk in ((1, 1000, 2, 0.5), (2, 2500, 3, 0.3), (1, 4096, 2, 0.21), (1, 3000, 1, 0.07)):
        q, k, v = (torch.randn(b, n, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        projection = torch.nn.Linear(128, 128, device="cuda", dtype=torch.bfloat16)
        lut, _ = sla_block_map(q, k, topk)
        q_blocks, kv_blocks = _runs(n, SLA_QUERY_BLOCK, q.device), _runs(n, SLA_KEY_BLOCK, q.device)
        counts = torch.full(lut.shape[:-1], lut.shape[-1], dtype=torch.int32, device="cuda")
        for linear in (None, kernel.LinearBranch(*sla_key_statistics(k, v, projection))):
            blocks = (q, k, v, q_blocks, None, lut, None)
            gluon = kernel.block_sparse_attention(*blocks, max_kv_len=SLA_KEY_BLOCK, epilogue=linear, fp8=True)
            paired = kernel.KernelConfig(128, 8, 3)
            triton = kernel.block_sparse_attention(
                *blocks, max_kv_len=SLA_KEY_BLOCK, epilogue=linear, fp8=True, config=paired
            )
            exact = kernel.block_sparse_attention_reference(
                q, k, v, q_blocks, kv_blocks, lut, counts, None, 128**-0.5, linear, True
            )
            case = (b, n, heads, lut.shape[-1], linear is not None)
            assert rel(gluon, triton) < 1e-3, (case, rel(gluon, triton))
            assert rel(gluon, exact) < 5e-2, (case, rel(gluon, exact))
            assert rel(gluon, exact) < 1.1 * rel(triton, exact) + 1e-3, (case, rel(gluon, exact), rel(triton, exact))


@pytest.mark.gpu
def test_autotuned_launch_matches_default_config():
    """A launch large enough to be autotuned (SLA's, with its linear epilogue) gives what the default config gives,
    and the chosen config is reported."""
    from ditserve.kernels import block_sparse_attention as kernel
    from ditserve.layers.sparse_attention import (
        SLA_KEY_BLOCK,
        SLA_QUERY_BLOCK,
        _runs,
        sla_block_map,
        sla_key_statistics,
    )

    g = torch.Generator().manual_seed(0)
    n, heads = 32768, 8  # 256 query blocks × 8 heads: kernel.TUNE_MIN_PROGRAMS
    q, k, v = (torch.randn(1, n, heads, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    projection = torch.nn.Linear(128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lut, counts = sla_block_map(q, k, 0.1)
        blocks = (q, k, v, _runs(n, SLA_QUERY_BLOCK, q.device), _runs(n, SLA_KEY_BLOCK, q.device), lut, counts)
        linear = kernel.LinearBranch(*sla_key_statistics(k, v, projection))
        tuned = kernel.block_sparse_attention(*blocks, max_kv_len=SLA_KEY_BLOCK, epilogue=linear)
        default = kernel.block_sparse_attention(
            *blocks, max_kv_len=SLA_KEY_BLOCK, epilogue=linear, config=kernel.default_config(SLA_QUERY_BLOCK)
        )
    assert ((tuned.float() - default.float()).norm() / default.float().norm()).item() < 1e-2
    assert any(key[7] == 1 for key in kernel.tuned_configs())  # EPILOGUE: the linear branch


def test_tiles_cover_every_token_once_and_windows_shift_inwards():
    layout = tile_layout((5, 17, 9), (3, 3, 3), torch.device("cpu"))
    assert sorted(layout.order.tolist()) == list(range(5 * 17 * 9))
    assert int(layout.lengths.sum()) == 5 * 17 * 9 and layout.block == 128
    tiles = (3, 3, 2)  # ceil(5/2), ceil(17/8), ceil(9/8)
    lut = layout.lut[0, 0]
    assert lut.shape == (18, 3 * 3 * 2)  # the column axis has 2 tiles: the window of 3 shrinks to them
    corner = set(lut[0].tolist())  # tile (0, 0, 0): its window shifted inwards, not cut
    expected = {(a * tiles[1] + b) * tiles[2] + c for a in range(3) for b in range(3) for c in range(2)}
    assert corner == expected
    assert sliding_tile_density((3, 3, 1), (99, 99, 99)) == 1.0
    assert 0.05 < sliding_tile_density((21, 45, 80), (3, 3, 5)) < 0.1  # Wan 720p


def test_sliding_tile_reference_path_is_local_attention():
    """Without Triton (the CPU engine's path): a full window is dense attention; a one-tile window is attention
    within each tile."""
    g = torch.Generator().manual_seed(0)
    grid = (4, 3, 2)
    q, k, v = (torch.randn(1, 24, 2, 8, generator=g) for _ in range(3))
    dense = attention_reference(q, k, v)
    assert torch.allclose(sliding_tile_attention(q, k, v, grid, SlidingTile((9, 9, 9))), dense, atol=1e-6)
    local = sliding_tile_attention(q, k, v, grid, SlidingTile((1, 1, 1)))
    first_tile = attention_reference(q[:, :12], k[:, :12], v[:, :12])  # frames 0-1: the first tile (2 × 8 × 8)
    assert torch.allclose(local[:, :12], first_tile, atol=1e-6)


@pytest.fixture(scope="module")
def engine(tiny_wan):
    with Engine.from_pretrained(str(tiny_wan), device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def dense_video(engine):
    return engine.generate(**REQUEST).videos[0]


def test_per_request_backend(engine, dense_video):
    full = engine.generate(**REQUEST, attention="sliding-tile:99,99,99").videos[0]
    assert np.abs(full - dense_video).max() < 1e-4  # a window over every tile is dense attention
    local = engine.generate(**REQUEST, attention="sliding-tile:1,1,1").videos[0]
    assert np.abs(local - dense_video).max() > 1e-3  # one tile: frames 0-1 and frame 2 apart
    again = engine.generate(**REQUEST).videos[0]  # the request's backend does not stay
    assert np.array_equal(again, dense_video)


def test_backends_refused_where_they_do_not_fit(engine, tiny_wan):
    with pytest.raises(ConfigError, match="sla") as e:
        engine.generate(**REQUEST, attention="sla")
    assert e.value.field == "attention"
    with pytest.raises(ConfigError) as e:
        engine.generate(**REQUEST, attention="sliding-tile:2,3,3")  # windows are odd tile counts
    assert e.value.field == "attention"
    with pytest.raises(ConfigError) as e:
        Engine.from_pretrained(str(tiny_wan), device="cpu", attention_backend="sla:0.1")
    assert e.value.field == "attention_backend"
    with pytest.raises(ConfigError) as e:
        Engine.from_pretrained("digits", device="cpu", attention_backend="sliding-tile")
    assert e.value.field == "attention_backend" and "flux" in e.value.message
    with pytest.raises(ConfigError) as e:
        Engine.from_pretrained(str(tiny_wan), device="cpu", attention_backend="sliding-tile", num_gpus=2, ring_degree=2)
    assert e.value.field == "attention_backend"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sliding-tile:1,1,3", "sla:0.5", "sla-fp8:0.5", "vsa:0.5"])
def test_cuda_graphs_replay_sparse_attention(tmp_path, backend):
    """A sparse backend captured into the DiT's CUDA graph gives what it gives eagerly (TurboWan-style tiny folder:
    it has SLA's projections; for VSA a FastWan-style one, with its gates)."""
    from ditserve.tiny.wan import make_tiny_wan_folder

    vsa = backend.startswith("vsa")
    folder = make_tiny_wan_folder(tmp_path / "tiny", turbowan=not vsa, vsa=vsa)
    request = dict(REQUEST, height=128, width=128, output_type="latent")
    outputs = []
    for graphs in (False, True):
        with Engine.from_pretrained(str(folder), device="cuda", dtype="float32", cuda_graphs=graphs) as engine:
            outputs.append(engine.generate(**request, attention=backend).videos[0].float())
            if graphs:
                assert engine.cuda_graphs["transformer"].captures >= 1
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)


# ---- VSA -----------------------------------------------------------------------------------------------------------
# a (3, 8, 8) token grid: 4 cubes of 4 × 4 × 4 (their frames cut to 3); latents, to skip the VAE
VSA_REQUEST = dict(REQUEST, height=128, width=128, output_type="latent")


def _zero_gates(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: torch.zeros_like(t) if "to_gate_compress" in k else t for k, t in state.items()}, weights)


@pytest.fixture(scope="module")
def tiny_vsa(tmp_path_factory):
    from ditserve.tiny.wan import make_tiny_wan_folder

    return make_tiny_wan_folder(tmp_path_factory.mktemp("tiny-fastwan"), vsa=True)


def test_vsa_reference_path_is_dense_when_no_cube_is_left_out():
    """Without Triton: at sparsity 0 every cube is chosen, so the fine stage is dense attention and the output is
    dense attention plus gate × the coarse output of the query's cube (one cube here: the mean of v, attended)."""
    from ditserve.layers.sparse_attention import VSA, vsa_attention

    g = torch.Generator().manual_seed(1)
    grid = (2, 3, 4)  # one cube (smaller than 4 × 4 × 4)
    q, k, v, gate = (torch.randn(1, 24, 2, 8, generator=g) for _ in range(4))
    out = vsa_attention(q, k, v, gate, grid, VSA(0.0))
    expected = attention_reference(q, k, v) + gate * v.mean(dim=1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(vsa_attention(q, k, v, torch.zeros_like(gate), grid, VSA(0.9)), attention_reference(q, k, v))


def test_vsa_folder_loads_and_runs(tiny_vsa):
    from ditserve.loader.folder import resolve_model

    source = resolve_model(str(tiny_vsa))
    assert source.config("transformer")["video_sparse_attention"]  # told by the to_gate_compress names alone
    with Engine.from_pretrained(str(tiny_vsa), device="cpu") as engine:
        dense = engine.generate(**VSA_REQUEST).videos[0]
        sparse = engine.generate(**VSA_REQUEST, attention="vsa:0.5").videos[0].float()
        full = engine.generate(**VSA_REQUEST, attention="vsa:0").videos[0].float()
    assert torch.isfinite(sparse).all()
    assert (sparse - dense.float()).abs().max() > 1e-3 and (full - sparse).abs().max() > 1e-4


def test_vsa_with_zero_gates_and_no_cube_left_out_is_dense(tiny_vsa, tmp_path):
    import shutil

    folder = Path(shutil.copytree(tiny_vsa, tmp_path / "zero-gates"))
    _zero_gates(folder)
    with Engine.from_pretrained(str(folder), device="cpu", attention_backend="vsa:0") as engine:
        vsa = engine.generate(**VSA_REQUEST).videos[0].float()
        dense = engine.generate(**VSA_REQUEST, attention="sdpa").videos[0].float()
    assert (vsa - dense).abs().max() < 1e-4


def test_vsa_refused_where_it_does_not_fit(engine, tiny_wan, tiny_vsa):
    with pytest.raises(ConfigError, match="to_gate_compress") as e:
        engine.generate(**REQUEST, attention="vsa")  # a Wan checkpoint without VSA's gates
    assert e.value.field == "attention"
    with pytest.raises(ConfigError) as e:
        Engine.from_pretrained(str(tiny_wan), device="cpu", attention_backend="vsa:0.8")
    assert e.value.field == "attention_backend"
    for bad in ("vsa:1", "vsa:-0.1", "vsa:x"):
        with pytest.raises(ConfigError) as e:
            Engine.from_pretrained(str(tiny_vsa), device="cpu", attention_backend=bad)
        assert e.value.field == "attention_backend"


def test_engine_backends_under_ulysses_match_one_process(tiny_vsa):
    """Sparse backends per request over 2 Ulysses ranks equal one process's: sliding tiles and VSA on a (3, 3, 1)
    grid of 9 tokens (the second shard padded), and VSA over 4 cubes (its gate exchanged with q)."""
    cases = [(REQUEST, "sliding-tile:1,1,1"), (REQUEST, "vsa:0.5"), (VSA_REQUEST, "vsa:0.5")]

    def run(engine):
        return [np.asarray(torch.as_tensor(engine.generate(**r, attention=b).videos[0]).float()) for r, b in cases]

    with Engine.from_pretrained(str(tiny_vsa), device="cpu") as engine:
        one = run(engine)
    with Engine.from_pretrained(str(tiny_vsa), device="cpu", num_gpus=2, ulysses_degree=2) as engine:
        two = run(engine)
    for (_, backend), a, b in zip(cases, one, two, strict=True):
        assert np.abs(a - b).max() < 1e-3, backend
