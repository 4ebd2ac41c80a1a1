"""FP8 linears (accel/fp8.py): the product against full precision, the quantised weight's layout, and the FP8 DiT
through the engine on the trained digits model: it still draws the digits asked for, LoRA merges requantise and
unmerging restores the FP8 bytes exactly, tensor parallelism gives the one-process result. On the CPU the FP8
product runs as its float32 reference; the `gpu` test runs torch._scaled_mm on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digit_gate import cuda_digit_accuracy
from safetensors.torch import save_file

from ditserve import Engine
from ditserve.accel.fp8 import FP8, dequantize_weight, fp8_linear, has_fp8_tensor_cores, quantize_weight
from ditserve.config import ConfigError, EngineArgs
from ditserve.digits.data import prompt
from ditserve.digits.quality import score_images
from ditserve.layers.linear import LinearBase, RowParallelLinear


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_product_is_close_to_full_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    w[3] *= 100  # rows of very different size: each gets its own scale
    x = torch.randn(5, 7, 64, generator=g)
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.shape == (96,)
    assert rel(dequantize_weight(q, scale), w) < 0.04  # e4m3: 3 mantissa bits
    bias = torch.randn(96, generator=g)
    y = fp8_linear(x, q, scale, bias)
    assert y.shape == (5, 7, 96) and rel(y, x @ w.t() + bias) < 0.05
    # A column slice of the weight (row-parallel pieces): the per-row scales still apply.
    piece = fp8_linear(x[..., 16:48], q.narrow(1, 16, 32), scale, None)
    assert rel(piece, x[..., 16:48] @ w[:, 16:48].t()) < 0.05


@pytest.fixture(scope="module")
def digits_fp8():
    return Engine.from_pretrained(None, device="cpu", dtype="float32", quantization="fp8")


@pytest.fixture(scope="module")
def digits_plain():
    return Engine.from_pretrained(None, device="cpu", dtype="float32")


def _linears(engine: Engine) -> list[LinearBase]:
    dit = engine.pipeline.transformers()["transformer"]
    return [m for m in dit.modules() if isinstance(m, LinearBase)]


def test_fp8_dit_still_draws_the_digits(digits_fp8, digits_plain):
    quantised = [m for m in _linears(digits_fp8) if m.weight_scale is not None]
    assert quantised and all(m.weight.dtype == FP8 for m in quantised)
    dit = digits_fp8.pipeline.transformers()["transformer"]
    assert dit.proj_out.weight_scale is None and dit.x_embedder.weight_scale is None  # outside the blocks
    prompts = [prompt(d, 0) for d in range(10)]
    images = digits_fp8.generate(prompts, seed=0).images + digits_fp8.generate(prompts, seed=1).images
    plain = digits_plain.generate(prompts, seed=0).images
    assert score_images(images, list(range(10)) * 2).overall >= 0.9
    # Close to full precision, not equal: FP8 does change the pictures a little.
    difference = np.abs(np.asarray(images[:10], dtype=np.float32) - np.asarray(plain, dtype=np.float32)).mean()
    assert 0 < difference < 20


def _lora_file(engine: Engine, path) -> str:
    """A diffusers-named LoRA on the first double block's attention projections."""
    cfg = engine.pipeline.transformers()["transformer"].config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for module in ("to_q", "to_k", "to_v", "to_out.0"):
        tensors[f"transformer.transformer_blocks.0.attn.{module}.lora_A.weight"] = torch.randn(4, dim, generator=g)
        tensors[f"transformer.transformer_blocks.0.attn.{module}.lora_B.weight"] = torch.randn(dim, 4, generator=g)
    save_file(tensors, str(path))
    return str(path)


def test_lora_merge_requantises_and_unmerge_restores_the_fp8_bytes(digits_fp8, tmp_path):
    request = dict(prompt=prompt(3, 0), seed=4, output_type="np")
    base = digits_fp8.generate(**request).images[0]
    before = {
        id(m): (m.weight.detach().view(torch.uint8).clone(), m.weight_scale.clone())
        for m in _linears(digits_fp8)
        if m.weight_scale is not None
    }
    digits_fp8.set_lora("style", _lora_file(digits_fp8, tmp_path / "l.safetensors"), strength=0.05)
    dynamic = digits_fp8.generate(**request).images[0]
    assert np.abs(dynamic - base).max() > 1e-3
    digits_fp8.merge_lora_weights()
    changed = [
        m
        for m in _linears(digits_fp8)
        if id(m) in before and not torch.equal(m.weight.view(torch.uint8), before[id(m)][0])
    ]
    assert changed and all(m.weight.dtype == FP8 for m in changed)  # requantised, still FP8
    merged = digits_fp8.generate(**request).images[0]
    assert np.abs(merged - dynamic).mean() < 0.02  # FP8 rounding of W0 + ΔW against W0 and ΔW apart
    digits_fp8.unmerge_lora_weights()
    digits_fp8.set_lora([], [])
    for m in _linears(digits_fp8):
        if id(m) in before:
            assert torch.equal(m.weight.view(torch.uint8), before[id(m)][0])
            assert torch.equal(m.weight_scale, before[id(m)][1])
    assert np.array_equal(digits_fp8.generate(**request).images[0], base)


def test_tensor_parallel_fp8_is_one_process_up_to_activation_rounding(digits_fp8, digits_plain):
    """Row-parallel layers take each row's weight scale over every rank's columns, so the shards are slices of the
    one-process FP8 weight; each rank quantises the activations of its own columns per token (no exchange in the
    forward), so TP=2 rounds a little differently: far closer to the one-process FP8 image than FP8 is to float32."""
    request = dict(prompt=prompt(7, 0), seed=2, output_type="np")
    want = digits_fp8.generate(**request).images[0]
    full = digits_plain.generate(**request).images[0]
    with Engine.from_pretrained(None, device="cpu", dtype="float32", quantization="fp8", num_gpus=2, tp_size=2) as tp:
        got = tp.generate(**request).images[0]
    assert np.abs(got - want).mean() < 0.5 * np.abs(want - full).mean()


def test_row_parallel_layer_has_global_row_scales():
    layer = RowParallelLinear(32, 16)
    assert layer.row_max_over_ranks(torch.ones(16, 1)).shape == (16, 1)  # one rank: the local max


def test_bad_quantization_is_refused_by_name():
    with pytest.raises(ConfigError) as info:
        EngineArgs(quantization="int4")
    assert info.value.field == "quantization" and "fp8" in info.value.message


@pytest.mark.gpu
def test_fp8_on_cuda_keeps_digit_accuracy_within_two_points():
    """torch._scaled_mm and the Triton quantiser in bf16 under CUDA graphs: accuracy over ten digits × both prompt
    forms × three seeds within 2 points of bf16."""
    if not has_fp8_tensor_cores(torch.device("cuda")):
        pytest.skip("needs FP8 tensor cores")
    scores = {quantization: cuda_digit_accuracy(quantization=quantization) for quantization in (None, "fp8")}
    assert scores["fp8"] >= scores[None] - 0.02, scores


@pytest.mark.gpu
def test_fp8_product_on_cuda_is_close_to_its_reference():
    """torch._scaled_mm with fast accumulation at a DiT's width (K = 3,072 and 12,288): within 5e-3 of the float32
    product of the same FP8 values (Hopper measured 2.0-3.4e-3; e4m3's own rounding of the inputs is ~3e-2)."""
    from ditserve.accel.fp8 import scaled_mm_reference
    from ditserve.kernels.fp8_quant import quantize_rows

    if not has_fp8_tensor_cores(torch.device("cuda")):
        pytest.skip("needs FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in ((3072, 9216), (12288, 3072)):
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16, generator=g)
        q, scale = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
        xq, x_scale = quantize_rows(x)
        reference = scaled_mm_reference(xq, x_scale, q, scale, bias, torch.float32)
        assert rel(fp8_linear(x, q, scale, bias), reference) < 5e-3


def test_norms_and_gelu_hand_fp8_linears_their_input_quantised():
    """Wan's norms and GELU write their rows quantised for the FP8 linear that reads them (`QuantizedRows`); the
    forward is bit for bit the one where each linear quantises its own input. A linear with a dynamic LoRA
    adapter takes its input unquantised, and refuses a quantised one by name."""
    from fp8_wiring import check_producers_quantize_for_fp8_linears

    from ditserve.accel.fp8 import quantize_dit
    from ditserve.kernels.fp8_quant import QuantizedRows
    from ditserve.layers.linear import LinearLoRA
    from ditserve.loader.weights import build_on_meta, materialize
    from ditserve.models.wan import WanTransformer, video_position_ids

    config = dict(
        patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    model = materialize(build_on_meta(lambda: WanTransformer.from_config(config), torch.float32), "cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    inputs = dict(
        video_tokens=torch.randn(1, 2 * 3 * 4, 16, generator=g),
        timestep=torch.tensor([500.0]),
        text_states=torch.randn(1, 5, 32, generator=g),
        video_ids=video_position_ids(2, 3, 4, "cpu"),
    )
    consumers = [f"blocks.0.{name}" for name in ("qkv", "cross_q", "ff_up", "ff_down")]
    check_producers_quantize_for_fp8_linears(model, inputs, consumers)

    assert quantize_dit(model) == 2 * 7
    block = model.blocks[0]
    seen = {}
    for name in ("ff_up", "ff_down"):
        block.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, type(args[0]))
        )
    block.ff_up.lora = [LinearLoRA(torch.randn(2, 32, generator=g), torch.randn(64, 2, generator=g), 0.5)]
    with torch.no_grad():
        model(**inputs)
    assert seen == {"ff_up": torch.Tensor, "ff_down": QuantizedRows}
    with pytest.raises(TypeError, match="takes_quantized_input"):
        block.ff_up(QuantizedRows(*quantize_weight(torch.randn(3, 32)), torch.float32))
