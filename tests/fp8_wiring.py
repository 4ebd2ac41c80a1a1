"""A DiT's norms and activations hand its FP8 linears their input quantised (`QuantizedRows`) and the forward equals
the one where each linear quantises its own input; its q/k norms write q and k in e4m3 for cudnn-fp8 (`FP8Heads`):
shared by the families' tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ditserve.accel.fp8 import quantize_dit
from ditserve.kernels import cudnn_fp8_attention as ca
from ditserve.kernels.fp8_quant import QuantizedRows
from ditserve.layers.linear import LinearBase

FP8_HEADS = (ca.FP8Heads, ca.FP8Heads)  # what an attention that takes q and k from the norms in e4m3 receives


def check_producers_quantize_for_fp8_linears(dit: nn.Module, inputs: dict, consumers: list[str]) -> None:
    """On an FP8 copy of `dit`: each named linear (its path in the model) gets `QuantizedRows`, and the output
    equals, bit for bit, the forward with every linear quantising its own input."""
    model = copy.deepcopy(dit)
    assert quantize_dit(model) > 0
    seen = {}
    for name in consumers:
        layer = model.get_submodule(name)
        assert layer.weight_scale is not None, f"{name} is not FP8 (widths not multiples of 16?)"
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, type(args[0])))
    with torch.no_grad():
        fused = model(**inputs)
        assert seen == {name: QuantizedRows for name in consumers}
        with pytest.MonkeyPatch.context() as m:
            m.setattr(LinearBase, "takes_quantized_input", property(lambda self: False))
            separate = model(**inputs)
        assert seen == {name: torch.Tensor for name in consumers}
    assert torch.equal(fused, separate)


def check_norms_write_fp8_heads(model: nn.Module, inputs: dict, expected: list[tuple[type, type]]) -> None:
    """`model` on cudnn-fp8 as the CPU runs it (q and k quantised per tensor by the reference) and as a GPU that
    takes cuDNN's kernel does (q and k handed out as `FP8Heads` and written by the q/k norms, the kernel replaced by
    its reference): the attentions receive the `expected` types of q and k, in order, and the two forwards differ
    by FP8 rounding only: the one with the norms' e4m3 q and k is as close to dense attention in float32 as the
    one quantising them per tensor (within 1.5 times its distance: two roundings of the same size)."""
    import ditserve.layers.attention as attention_module
    from ditserve.layers.attention import Attention, set_attention_backend

    calls = []

    def recorded(q, k, v, scale=None):
        calls.append((type(q), type(k)))
        return ca.cudnn_fp8_attention_reference(q, k, v, scale)

    backends = [(module, module.backend) for module in model.modules() if isinstance(module, Attention)]
    try:
        set_attention_backend(model, "sdpa", torch.device("cpu"))
        with torch.no_grad():
            dense = model(**inputs)
        set_attention_backend(model, "cudnn-fp8", torch.device("cpu"))
        with torch.no_grad():
            plain = model(**inputs)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(attention_module, "cudnn_frontend_available", lambda: True)
            m.setattr(attention_module, "cudnn_fp8_takes_heads", lambda like, head_dim: True)
            m.setattr(attention_module, "cudnn_fp8_attention", recorded)
            with torch.no_grad():
                fp8_heads = model(**inputs)
    finally:
        for module, backend in backends:
            module.backend = backend
    assert calls == expected, calls

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert not torch.equal(plain, fp8_heads), "the norms' e4m3 q and k changed nothing"
    assert rel(fp8_heads, dense) < 1.5 * rel(plain, dense), (rel(fp8_heads, dense), rel(plain, dense))


def check_norms_write_fp8_heads_on_cuda(model: nn.Module, inputs: dict, expected: list[tuple[type, type]]) -> None:
    """`check_norms_write_fp8_heads` with the real kernels: a bf16 copy of `model` on the GPU runs cudnn-fp8, its q/k
    norm kernels writing q and k in e4m3 for cuDNN's FP8 attention. The attentions receive the `expected` types,
    and the output is as close to the float32 dense forward on the CPU as the CPU's per-tensor reference rounding
    is (within 1.5 times its distance, plus twice bf16's own distance: the dense bf16 GPU forward's)."""
    import ditserve.layers.attention as attention_module
    from ditserve.accel.fp8 import has_fp8_tensor_cores
    from ditserve.layers.attention import set_attention_backend

    if not torch.cuda.is_available() or not has_fp8_tensor_cores(torch.device("cuda")):
        pytest.skip("needs a GPU with FP8 tensor cores")
    if not ca.cudnn_frontend_available():
        pytest.skip("needs nvidia-cudnn-frontend (ditserve[cudnn])")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def rel(a, b):
        return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()

    def run(m: nn.Module, backend: str, device: torch.device, given: dict) -> torch.Tensor:
        set_attention_backend(m, backend, device)
        with torch.no_grad():
            return m(**given)

    reference = copy.deepcopy(model)
    dense, plain = run(reference, "sdpa", cpu, inputs), run(reference, "cudnn-fp8", cpu, inputs)
    gpu = copy.deepcopy(model).to(cuda, torch.bfloat16)
    gpu_inputs = {
        name: value.to(cuda, torch.bfloat16 if value.is_floating_point() else value.dtype)
        if isinstance(value, torch.Tensor)
        else value
        for name, value in inputs.items()
    }
    gpu_dense = run(gpu, "sdpa", cuda, gpu_inputs)
    calls = []
    real = attention_module.cudnn_fp8_attention

    def recorded(q, k, v, scale=None):
        calls.append((type(q), type(k)))
        assert ca.cudnn_fp8_can_take(q, k, v), "cuDNN's kernel would not take these inputs"
        return real(q, k, v, scale)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(attention_module, "cudnn_fp8_attention", recorded)
        gpu_fp8 = run(gpu, "cudnn-fp8", cuda, gpu_inputs)
    assert calls == expected, calls
    assert torch.isfinite(gpu_fp8).all()
    bound = 1.5 * rel(plain, dense) + 2 * rel(gpu_dense, dense)
    assert rel(gpu_fp8, dense) < bound, (rel(gpu_fp8, dense), rel(plain, dense), rel(gpu_dense, dense))
