"""FP8 checkpoints load without requantising: a FLUX.1 single file in ComfyUI's scaled-FP8 layout (e4m3 weights, a
`scale_weight` per tensor, the `scaled_fp8` marker) keeps its bytes and scales in our FP8 layers, and is multiplied
out where a layer is not FP8; a bf16/float32 file loads straight into FP8 layers, quantised as it loads, equal to
loading then quantising. CPU: the FP8 products run as their float32 reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditserve.accel.fp8 import FP8, ScaledFP8, fp8_linears, quantize_dit
from ditserve.kernels.fp8_quant import FP8_MAX

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "comfyui"))
from ditserve_nodes.checkpoint import load_dit  # noqa: E402

H, D, CTX, VEC = 128, 128, 32, 16  # one head of 128 (FLUX.1 single files fix the head size), widths divisible by 16


def bfl_flux_shapes() -> dict[str, tuple[int, ...]]:
    """A tiny FLUX.1 (1 double and 1 single block) under BFL names."""
    shapes: dict[str, tuple[int, ...]] = {
        "img_in.weight": (H, 64),
        "txt_in.weight": (H, CTX),
        "time_in.in_layer.weight": (H, 256),
        "time_in.out_layer.weight": (H, H),
        "vector_in.in_layer.weight": (H, VEC),
        "vector_in.out_layer.weight": (H, H),
        "guidance_in.in_layer.weight": (H, 256),
        "guidance_in.out_layer.weight": (H, H),
        "final_layer.linear.weight": (64, H),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "single_blocks.0.linear1.weight": (7 * H, H),
        "single_blocks.0.linear2.weight": (H, 5 * H),
        "single_blocks.0.modulation.lin.weight": (3 * H, H),
        "single_blocks.0.norm.query_norm.scale": (D,),
        "single_blocks.0.norm.key_norm.scale": (D,),
    }
    for side in ("img", "txt"):
        shapes |= {
            f"double_blocks.0.{side}_mod.lin.weight": (6 * H, H),
            f"double_blocks.0.{side}_attn.qkv.weight": (3 * H, H),
            f"double_blocks.0.{side}_attn.proj.weight": (H, H),
            f"double_blocks.0.{side}_attn.norm.query_norm.scale": (D,),
            f"double_blocks.0.{side}_attn.norm.key_norm.scale": (D,),
            f"double_blocks.0.{side}_mlp.0.weight": (4 * H, H),
            f"double_blocks.0.{side}_mlp.2.weight": (H, 4 * H),
        }
    for name, shape in list(shapes.items()):
        if name.endswith(".weight"):
            shapes[name.removesuffix("weight") + "bias"] = (shape[0],)
    return shapes


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in bfl_flux_shapes().items():
        if name.endswith("scale"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen) * (0.05 if len(shape) == 2 else 0.02)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random FLUX.1 as a float32 file and as ComfyUI's scaled FP8 (every 2-D weight in e4m3, as such
    files hold them, embedders and final layer included)."""
    folder = tmp_path_factory.mktemp("fp8-files")
    weights = random_weights()
    fp8: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(2, dtype=FP8)}
    for name, tensor in weights.items():
        if tensor.dim() == 2:
            scale = tensor.abs().amax() / FP8_MAX
            fp8[name] = (tensor / scale).to(FP8)
            fp8[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            fp8[name] = tensor
    prefix = "model.diffusion_model."
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(folder / "flux-f32.safetensors"))
    save_file({prefix + k: v.contiguous() for k, v in fp8.items()}, str(folder / "flux-fp8.safetensors"))
    return folder / "flux-f32.safetensors", folder / "flux-fp8.safetensors", fp8


def forward(model, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 16, 64, generator=gen)
    text = torch.randn(1, 8, CTX, generator=gen)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    with torch.no_grad():
        return model(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=torch.randn(1, VEC, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        )


def test_fp8_file_keeps_its_bytes_and_scales(files):
    _, fp8_file, stored = files
    kept = load_dit(str(fp8_file), torch.device("cpu"), torch.float32, fp8=True).model
    plain = load_dit(str(fp8_file), torch.device("cpu"), torch.float32).model  # multiplied out
    # Fused layers hold the file's fused tensors' bytes row for row, and its one scale on every row.
    modules = dict(kept.named_modules())
    for ours, theirs in (
        ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv"),
        ("double_blocks.0.txt_mlp.fc2", "double_blocks.0.txt_mlp.2"),
        ("single_blocks.0.qkv_mlp", "single_blocks.0.linear1"),
        ("single_blocks.0.proj_out", "single_blocks.0.linear2"),
    ):
        layer = modules[ours]
        assert layer.weight.dtype == FP8, ours
        assert torch.equal(layer.weight.view(torch.uint8), stored[f"{theirs}.weight"].view(torch.uint8)), ours
        assert torch.equal(layer.weight_scale, stored[f"{theirs}.scale_weight"].expand(layer.weight.shape[0])), ours
    # Every layer FP8 covers holds the file's values exactly; the blocks' modulation is not FP8 (multiplied out).
    linears = fp8_linears(plain)
    assert len(linears) == sum(getattr(m, "weight_scale", None) is not None for m in kept.modules())
    for name, module in plain.named_modules():
        if module in linears:
            mine = modules[name]
            torch.testing.assert_close(mine.weight.float() * mine.weight_scale[:, None], module.weight, rtol=0, atol=0)
    assert modules["double_blocks.0.img_mod.linear"].weight.dtype == torch.float32
    # Outside the blocks the FP8 weights were multiplied out, as in the plain load.
    assert kept.x_embedder.weight.dtype == torch.float32
    torch.testing.assert_close(kept.x_embedder.weight, plain.x_embedder.weight, rtol=0, atol=0)
    # The FP8 products differ from the float32 ones only by the activations' rounding.
    ours, reference = forward(kept), forward(plain)
    assert (ours - reference).norm() / reference.norm() < 0.05


def test_a_float_file_quantised_as_it_loads_equals_quantising_after(files):
    f32_file, _, _ = files
    at_load = load_dit(str(f32_file), torch.device("cpu"), torch.float32, fp8=True).model
    after = load_dit(str(f32_file), torch.device("cpu"), torch.float32).model
    assert quantize_dit(after) == len([m for m in at_load.modules() if getattr(m, "weight_scale", None) is not None])
    mine = dict(at_load.named_modules())
    for name, module in after.named_modules():
        if getattr(module, "weight_scale", None) is not None:
            assert torch.equal(mine[name].weight.view(torch.uint8), module.weight.view(torch.uint8)), name
            assert torch.equal(mine[name].weight_scale, module.weight_scale), name
    torch.testing.assert_close(forward(at_load), forward(after), rtol=0, atol=0)


def test_scaled_fp8_pieces():
    data = (torch.randn(6, 16) * 10).to(FP8)
    whole = ScaledFP8(data, torch.tensor(0.5))
    torch.testing.assert_close(whole.dequantize(), data.float() * 0.5, rtol=0, atol=0)
    assert torch.equal(whole.row_scales(), torch.full((6,), 0.5))
    rows = ScaledFP8(data, torch.arange(1.0, 7.0))
    torch.testing.assert_close(rows.dequantize(), data.float() * torch.arange(1.0, 7.0)[:, None], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows"):
        ScaledFP8(data, torch.ones(4))
    with pytest.raises(ValueError, match="e4m3"):
        ScaledFP8(data.float(), torch.ones(()))


@pytest.mark.parametrize("kind", ["row", "column", "merged"])
def test_a_ranks_shard_of_an_fp8_weight_is_its_slice_with_every_rows_scale(kind, monkeypatch):
    """Rank 1 of 2 (no processes: the layer only reads its rank): the bytes it keeps are its slice of the file's, the
    scales those of its rows (a row-parallel rank holds every row: every scale, none zeroed as its bias would be)."""
    from types import SimpleNamespace

    from ditserve.accel.fp8 import prepare_fp8_dit
    from ditserve.layers import linear

    monkeypatch.setattr(linear, "tp_group", lambda: SimpleNamespace(size=2, rank=1))
    layer = {
        "row": lambda: linear.RowParallelLinear(64, 32),
        "column": lambda: linear.ColumnParallelLinear(32, 64),
        "merged": lambda: linear.MergedColumnParallelLinear(32, [32, 64]),
    }[kind]()
    holder = torch.nn.Module()
    holder.block = layer
    holder.repeated_blocks = lambda: [holder.block]
    assert prepare_fp8_dit(holder) == 1
    gen = torch.Generator().manual_seed(0)
    parts = [32, 64] if kind == "merged" else [None]
    for shard, rows in enumerate(parts):
        out = rows or (32 if kind == "row" else 64)
        data = (torch.randn(out, 64 if kind == "row" else 32, generator=gen) * 50).to(FP8)
        scales = torch.rand(out, generator=gen) + 0.5
        layer.load_fp8_weight(ScaledFP8(data, scales), shard if kind == "merged" else None)
        if kind == "row":  # columns 32..63, every row
            assert torch.equal(layer.weight.view(torch.uint8), data[:, 32:].view(torch.uint8))
            assert torch.equal(layer.weight_scale, scales)
        else:  # this rank's rows of each part, side by side
            local = out // 2
            offset = 0 if shard == 0 else 16
            mine = layer.weight[offset : offset + local] if kind == "merged" else layer.weight
            mine_scales = layer.weight_scale[offset : offset + local] if kind == "merged" else layer.weight_scale
            assert torch.equal(mine.view(torch.uint8), data[local:].view(torch.uint8))
            assert torch.equal(mine_scales, scales[local:])
    assert not layer.weight_scale.isnan().any()
