"""A DiT's norms and activations hand its FP8 linears their input quantised (`QuantizedRows`) and the forward equals
the one where each linear quantises its own input: shared by the families' tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ditserve.accel.fp8 import quantize_dit
from ditserve.kernels.fp8_quant import QuantizedRows
from ditserve.layers.linear import LinearBase


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
