"""The sage attention backend (layers/sage_attention.py). On the CPU the package's `sageattn` is replaced by a
float64 stand-in that behaves as 1.0.6's does (its checks, the block's missing keys counted in the denominator), so
the adapter's layout, padding and correction are checked against the reference; the `gpu` tests run the package."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from digit_gate import cuda_digit_accuracy

from ditserve import Engine
from ditserve.config import ConfigError
from ditserve.layers.attention import attention, attention_reference
from ditserve.layers.sage_attention import (
    MAX_DENOMINATOR_ERROR,
    SageUnavailable,
    kernel_plan,
    sage_attention,
    sage_can_take,
)
from ditserve.pipelines.base import check_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def stand_in_sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
    """sageattention 1.0.6's `sageattn` without the INT8 rounding: its input checks, its in-place smoothing, and its
    non-causal kernel's last key block, whose missing keys score 0 against every query and have value 0."""
    assert tensor_layout == "NHD" and not is_causal
    assert q.shape[-1] in (64, 96, 128)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    stand_in_sageattn.calls.append((q, k, v))
    if smooth_k:
        k -= k.mean(dim=1, keepdim=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * (sm_scale or q.shape[-1] ** -0.5)
    missing = -k.shape[1] % 64
    weights = F.pad(scores, (0, missing)).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, F.pad(v.double(), (0, 0, 0, 0, 0, missing))).to(q.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    stand_in_sageattn.calls = []
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=stand_in_sageattn))
    return stand_in_sageattn


def test_kernel_plan():
    assert kernel_plan(128, 4608) == (128, False)  # FLUX 1024²: whole blocks
    assert kernel_plan(128, 32760) == (128, False)  # Wan 480p×81: 56 of 32,816 missing, within half a bf16 step
    assert kernel_plan(128, 300) is None  # no spare channel to correct with
    assert kernel_plan(32, 88) == (64, True)  # the digits model: padded, corrected in channel 32
    assert kernel_plan(64, 300) == (96, True)
    assert kernel_plan(64, 512) == (64, False)
    assert kernel_plan(256, 512) is None


def test_our_layout_goes_in_as_it_is(stand_in):
    """q and v of a fused projection ([B, S, 3, H, D] views) reach the kernel uncopied; k is smoothed into a new
    tensor, the caller's left alone."""
    qkv = torch.randn(2, 128, 3, 4, 128, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    k_before = k.clone()
    out = sage_attention(q, k, v)
    assert out.shape == q.shape
    assert rel(out, attention_reference(q, k, v)) < 1e-6
    (cq, ck, cv), *others = stand_in.calls
    assert not others and cq is q and cv is v and ck is not k
    assert torch.equal(k, k_before)


def test_small_heads_are_padded_and_missing_keys_corrected(stand_in):
    """The digits model's joint attention: heads of 32, 88 keys (40 missing from the second block)."""
    q, k, v = (torch.randn(2, 88, 2, 32, dtype=torch.float64) for _ in range(3))
    out = sage_attention(q, k, v)
    assert out.shape == q.shape
    assert rel(out, attention_reference(q, k, v)) < 1e-6
    ((cq, _, cv),) = stand_in.calls
    assert cq.shape[-1] == 64 and torch.equal(cv[..., 32], torch.ones_like(cv[..., 32]))
    # What the correction undoes: the same padded call without it is far off.
    pad = (0, 32)
    uncorrected = stand_in(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), tensor_layout="NHD")[..., :32]
    assert rel(uncorrected, attention_reference(q, k, v)) > 0.05


def test_long_sequences_leave_a_shrink_below_half_a_bf16_step(stand_in):
    q, k, v = (torch.randn(1, s, 1, 128, dtype=torch.float64) for s in (4, 32712, 32712))
    err = rel(sage_attention(q, k, v), attention_reference(q, k, v))
    assert 1e-5 < err < MAX_DENOMINATOR_ERROR


def test_inputs_it_cannot_take_run_sdpa(stand_in):
    q, k, v = (torch.randn(1, 128, 2, 64) for _ in range(3))
    assert not sage_can_take(q, k, v)  # not CUDA
    assert torch.allclose(attention(q, k, v, "sage"), attention(q, k, v, "sdpa"))
    assert not stand_in.calls


def test_without_the_package_sage_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)  # its import raises ImportError
    q = torch.randn(1, 8, 1, 64)
    with pytest.raises(SageUnavailable, match="pip install sageattention==1.0.6"):
        attention(q, q, q, "sage")
    with pytest.raises(ConfigError) as info:
        check_attention("sage", (), "attention", "digits")
    assert info.value.field == "attention" and "sageattention" in info.value.message
    with pytest.raises(ConfigError) as info:
        Engine.from_pretrained(None, device="cpu", attention_backend="sage")
    assert info.value.field == "attention_backend" and "pip install" in info.value.message


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,queries,keys,heads,head_dim",
    [
        (2, 512, 512, 4, 128),  # whole blocks
        (1, 1024, 32760, 2, 128),  # Wan 480p×81's key count: the shrink left in
        (2, 300, 300, 4, 64),  # padded to 96, corrected
        (2, 88, 88, 2, 32),  # the digits model: padded to 64, corrected
    ],
)
def test_sage_on_cuda_is_close_to_the_reference(batch, queries, keys, heads, head_dim):
    pytest.importorskip("sageattention")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, queries, heads, head_dim, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(batch, keys, heads, head_dim, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    assert sage_can_take(q, k, v)
    out = attention(q, k, v, "sage")
    ref = attention_reference(q.double(), k.double(), v.double())
    assert out.shape == q.shape and out.dtype == q.dtype
    # INT8 q·kᵀ: about 1% here; bf16 SDPA is about 0.3%.
    assert rel(out, ref) < 4e-2, (rel(out, ref), rel(attention(q, k, v, "sdpa"), ref))


@pytest.mark.gpu
def test_sage_keeps_digit_accuracy_within_two_points():
    pytest.importorskip("sageattention")
    scores = {backend: cuda_digit_accuracy(attention_backend=backend) for backend in ("auto", "sage")}
    assert scores["sage"] >= scores["auto"] - 0.02, scores


def test_the_diffusers_backend_refuses_our_own_kernels_by_name():
    from ditserve.config import EngineArgs
    from ditserve.pipelines.diffusers_backend import DiffusersBackendPipeline

    with pytest.raises(ConfigError) as info:
        DiffusersBackendPipeline.check_engine_args(EngineArgs(attention_backend="sage", backend="diffusers"), None)
    assert info.value.field == "attention_backend" and "native families" in info.value.message
