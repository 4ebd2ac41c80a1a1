"""The fp8 and cudnn-fp8 attention backends: their references, their place in `attention`, the engine and the request
field, the refusal of GPUs without FP8 tensor cores (and of cudnn-fp8 without its package). The kernels themselves
are checked in tests/kernel_checks.py (CPU interpreter and CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digit_gate import cuda_digit_accuracy

from ditserve.accel.fp8 import has_fp8_tensor_cores
from ditserve.config import ConfigError
from ditserve.kernels import cudnn_fp8_attention as ca
from ditserve.kernels import fp8_attention as fa
from ditserve.kernels.fp8_quant import FP8_MAX
from ditserve.layers.attention import attention, attention_reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_reference_rounds_each_operand_to_e4m3_with_its_scales():
    g = torch.Generator().manual_seed(0)
    b, n, nk, h, d = 2, 150, 300, 3, 32
    q = torch.randn(b, n, h, d, generator=g)
    q[:, 128:] *= 100  # the second query tile of each head gets a scale of its own
    k_blocks = torch.tensor([1e-2, 1.0, 1e2]).repeat_interleave(fa.KEY_BLOCK)[:nk]  # each key block its own scale
    k = torch.randn(b, nk, h, d, generator=g) * k_blocks[None, :, None, None]
    v = torch.randn(b, nk, h, d, generator=g) * torch.logspace(-2, 2, d)  # per-channel scales
    ops = fa.quantize_heads_reference(q, k, v, d**-0.5)
    assert ops.q8.shape == (b, h, n, d) and ops.k8.shape == (b, h, nk, d) and ops.vt8.shape == (b, h, d, 304)
    assert ops.q_scale.shape == (b, h, 2) and ops.k_scale.shape == (b, h, 3) and ops.v_scale.shape == (b, h, d)
    assert (ops.q_scale[..., 1] > 50 * ops.q_scale[..., 0]).all()
    assert (ops.k_scale[..., 1] > 50 * ops.k_scale[..., 0]).all() and (
        ops.k_scale[..., 2] > 50 * ops.k_scale[..., 1]
    ).all()
    for x8 in (ops.q8, ops.k8, ops.vt8):
        assert x8.float().abs().amax() <= FP8_MAX
    qf, kf, vf = fa.dequantized(ops, n, nk, d**-0.5)
    # e4m3 keeps 3 mantissa bits: every value within 2⁻⁴ of itself (relative), small and large alike
    for got, want in ((qf, q), (kf, k), (vf, v)):
        want = want.transpose(1, 2)
        assert ((got - want).abs() <= want.abs() * 2**-4 + 1e-6 * want.abs().amax()).all()
    # on unscaled inputs the rounding costs a few percent of the output (P's rounding, in the kernel, adds ~2%)
    q, k, v = (torch.randn(b, nk, h, d, generator=g) for _ in range(3))
    assert rel(fa.fp8_attention_reference(q, k, v), attention_reference(q, k, v)) < 0.05


def test_the_backend_runs_the_reference_on_the_cpu_and_masks_on_the_default():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    assert not fa.fp8_attention_can_take(q, k, v)  # heads under MIN_HEAD_DIM run the reference on every device
    torch.testing.assert_close(attention(q, k, v, "fp8"), fa.fp8_attention_reference(q, k, v), rtol=0, atol=0)
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[:, 30:] = False
    torch.testing.assert_close(attention(q, k, v, "fp8", mask), attention(q, k, v, "sdpa", mask))


def test_gpus_without_fp8_tensor_cores_are_refused_by_name(monkeypatch):
    from ditserve.accel.fp8 import FP8Unsupported, check_fp8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(FP8Unsupported, match="A100 has 8.0. Choose another --attention-backend"):
        check_fp8_device(torch.device("cuda"), "Choose another --attention-backend.")
    check_fp8_device(torch.device("cpu"))  # the CPU runs the reference


def test_engines_and_video_requests_take_fp8_attention(tiny_dev, tiny_wan):
    from ditserve import Engine
    from ditserve.config import SamplingParams

    with pytest.raises(ConfigError) as info:
        SamplingParams(prompt="a", attention="fp9").validate()
    assert info.value.field == "attention" and "fp8" in info.value.message
    kwargs = dict(height=32, width=32, num_inference_steps=2, seed=0, output_type="np")
    images = {}
    for backend in ("fp8", "sdpa"):
        with Engine.from_pretrained(str(tiny_dev), device="cpu", attention_backend=backend) as engine:
            images[backend] = engine.generate("a cat", **kwargs).images[0]
            if backend == "fp8":  # image families run the engine's backend: a request's own is refused, not ignored
                with pytest.raises(ConfigError) as info:
                    engine.generate("a cat", attention="sdpa", **kwargs)
                assert info.value.field == "attention" and "--attention-backend" in info.value.message
    assert not np.array_equal(images["fp8"], images["sdpa"])
    assert np.abs(images["fp8"] - images["sdpa"]).mean() < 0.05
    video = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=0, output_type="np")
    with Engine.from_pretrained(str(tiny_wan), device="cpu") as engine:
        dense = engine.generate("a cat", **video).videos[0]
        fp8 = engine.generate("a cat", attention="fp8", **video).videos[0]
    assert not np.array_equal(fp8, dense) and np.abs(fp8 - dense).mean() < 0.05


def test_the_cudnn_reference_rounds_each_tensor_to_e4m3_with_one_scale():
    g = torch.Generator().manual_seed(2)
    b, n, h, d = 2, 70, 3, 32
    q, k, v = (torch.randn(b, n, h, d, generator=g) * torch.logspace(-2, 2, d) for _ in range(3))
    q8, descale = ca.quantize_per_tensor_reference(q)
    assert q8.dtype == ca.FP8 and descale.dim() == 0
    assert q8.float().abs().amax() == ca.FP8_MAX  # the largest value lands on e4m3's largest
    back = q8.float() * descale
    assert ((back - q).abs() <= q.abs() * 2**-4 + 2**-9 * descale).all()  # relative 2⁻⁴, subnormals absolute
    zeros, zero_descale = ca.quantize_per_tensor_reference(torch.zeros(4, 8))
    assert not zeros.float().any() and zero_descale > 0
    # on unscaled inputs: the operands' rounding and the output's (e4m3 as well, on Hopper) cost about 5%
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    assert rel(ca.cudnn_fp8_attention_reference(q, k, v), attention_reference(q, k, v)) < 0.08


def test_cudnn_fp8_runs_its_reference_on_the_cpu_and_is_refused_without_its_package(monkeypatch, tiny_dev):
    from ditserve import Engine
    from ditserve.layers.attention import check_attention_backend

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=g) for _ in range(3))
    assert not ca.cudnn_fp8_can_take(q, k, v)
    torch.testing.assert_close(attention(q, k, v, "cudnn-fp8"), ca.cudnn_fp8_attention_reference(q, k, v))
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[:, 30:] = False
    torch.testing.assert_close(attention(q, k, v, "cudnn-fp8", mask), attention(q, k, v, "sdpa", mask))
    monkeypatch.setitem(__import__("sys").modules, "cudnn", None)  # as without the package
    with pytest.raises(ca.CudnnFrontendUnavailable, match="pip install nvidia-cudnn-frontend==1.32.0"):
        check_attention_backend("cudnn-fp8", (), "FLUX.1")
    with pytest.raises(ConfigError) as info:
        Engine.from_pretrained(str(tiny_dev), device="cpu", attention_backend="cudnn-fp8")
    assert info.value.field == "attention_backend" and "nvidia-cudnn-frontend" in info.value.message


def test_norms_write_q_and_k_in_fp8_for_cudnn_fp8():
    """FLUX.1 and Wan write q and k through their norms straight into e4m3 (`FP8Heads`, scaled by the norms'
    bound) for cudnn-fp8: every joint or self attention takes them, cross-attentions take bf16, and the forward
    stays within FP8 rounding of the one quantising q and k per tensor."""
    from fp8_wiring import FP8_HEADS, check_norms_write_fp8_heads

    from ditserve.loader.weights import build_on_meta, materialize
    from ditserve.models.flux import FluxConfig, FluxTransformer
    from ditserve.models.wan import WanTransformer, video_position_ids

    g = torch.Generator().manual_seed(4)
    flux_config = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False,
        axes_dims_rope=[4, 6, 6],
    )  # fmt: skip
    wan_config = dict(
        patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    flux = materialize(build_on_meta(lambda: FluxTransformer(FluxConfig.from_dict(flux_config)), torch.float32), "cpu")
    wan = materialize(build_on_meta(lambda: WanTransformer.from_config(wan_config), torch.float32), "cpu")
    for model in (flux, wan):
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    flux_inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        pooled_projections=torch.randn(1, 24, generator=g),
        timestep=torch.tensor([0.6]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(6, 3),
    )
    wan_inputs = dict(
        video_tokens=torch.randn(1, 2 * 3 * 4, 16, generator=g),
        timestep=torch.tensor([500.0]),
        text_states=torch.randn(1, 5, 32, generator=g),
        video_ids=video_position_ids(2, 3, 4, "cpu"),
    )
    check_norms_write_fp8_heads(flux, flux_inputs, [FP8_HEADS] * 4)  # two double blocks, two single ones
    check_norms_write_fp8_heads(wan, wan_inputs, [FP8_HEADS, (torch.Tensor, torch.Tensor)] * 2)  # self, cross


@pytest.mark.gpu
def test_fp8_attention_keeps_digit_accuracy_within_two_points():
    if not has_fp8_tensor_cores(torch.device("cuda")):
        pytest.skip("FP8 attention needs FP8 tensor cores")
    backends = ("auto", "fp8", "cudnn-fp8") if ca.cudnn_frontend_available() else ("auto", "fp8")
    scores = {backend: cuda_digit_accuracy(attention_backend=backend) for backend in backends}
    for backend in backends[1:]:
        assert scores[backend] >= scores["auto"] - 0.02, scores


def test_ring_attention_refuses_fp8_and_sage():
    """Ring merges its blocks through its own log-sum-exp kernel: a backend it would not run is refused, not
    ignored."""
    from ditserve.config import EngineArgs

    for backend in ("fp8", "cudnn-fp8", "sage"):
        with pytest.raises(ConfigError) as info:
            EngineArgs(attention_backend=backend, num_gpus=2, ring_degree=2)
        assert info.value.field == "attention_backend" and "--ring-degree 1" in info.value.message
    EngineArgs(attention_backend="fp8", num_gpus=2, ulysses_degree=2)
