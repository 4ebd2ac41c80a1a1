"""Streaming safetensors checkpoints into models built on the meta device.

A model is created on `meta` (no memory), given real but uninitialised storage in the target dtype on the target
device (`to_empty`), and then filled one checkpoint tensor at a time: each tensor is read from disk, cast, and
copied into its place by the parameter's `weight_loader`. Nothing is ever held twice.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ditserve.accel.fp8 import ScaledFP8
from ditserve.errors import LoaderError
from ditserve.kernels.fp8_quant import FP8
from ditserve.layers.linear import LinearBase, ShapeMismatchError

KeyMap = Callable[[str], "tuple[str, int | None] | None"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_on_meta(factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """Construct a module without allocating: parameters are meta tensors of `dtype`."""
    with torch.device("meta"), default_dtype(dtype):
        return factory()


def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """Give a meta module uninitialised storage on `device` (to be filled by loading or dummy init)."""
    return module.to_empty(device=device)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder: the shards an index names, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise LoaderError(f"{folder}: more than one safetensors index ({', '.join(p.name for p in indexes)})")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoaderError(f"{indexes[0]}: not a safetensors index with a weight_map ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoaderError(f"{indexes[0]} names shards that are not in {folder}: {', '.join(missing[:5])}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        # A PyTorch state dict (the original repositories' .pth, e.g. TurboDiffusion's checkpoints), read mmapped
        # with weights_only (no code runs).
        files = sorted(p for suffix in ("*.pth", "*.pt") for p in folder.glob(suffix))
    if not files:
        raise LoaderError(f"{folder}: no .safetensors weights (pass load_format='dummy' for random weights)")
    if len(files) > 1:
        raise LoaderError(f"{folder}: several .safetensors files but no index: {', '.join(f.name for f in files[:5])}")
    return files


def checkpoint_names(folder: Path) -> list[str]:
    """The tensor names of a component folder's safetensors weights, from its index or the files' headers (no
    tensor is read); empty for a .pth checkpoint or a folder without readable weights (loading reports those)."""
    try:
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return list(json.loads(indexes[0].read_text())["weight_map"])
        names: list[str] = []
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names += list(f.keys())
        return names
    except (OSError, RuntimeError, ValueError, KeyError):
        return []


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time."""
    for path in files:
        if path.suffix in (".pth", ".pt"):
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except (OSError, RuntimeError, ValueError) as e:
                raise LoaderError(f"{path}: cannot read PyTorch state dict ({e})") from None
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise LoaderError(f"{path}: not a state dict of tensors")
            yield from _with_int8_linears_dequantized(state, path)
            continue
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as e:
            if isinstance(e, LoaderError):
                raise
            raise LoaderError(f"{path}: cannot read safetensors file ({e})") from None


# TurboDiffusion's `-quant` checkpoints store each block linear as its Int8Linear holds it
# (turbodiffusion/ops/core.py, quant/quant.hpp): `int8_weight` [out, in] int8, row-major, and `scale`
# [⌈out/128⌉, ⌈in/128⌉] float32, one per 128 × 128 block: W = int8 · scale of the block (amax / 128, rounded to
# nearest).
INT8_BLOCK = 128


def dequantize_block_int8(q: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """W (float32) of a block-scaled int8 weight in TurboDiffusion's layout (above)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise LoaderError(f"{name}: an int8 matrix was expected, not {q.dtype} of shape {tuple(q.shape)}")
    rows, cols = q.shape
    blocks = (-(-rows // INT8_BLOCK), -(-cols // INT8_BLOCK))
    if tuple(scale.shape) != blocks:
        raise LoaderError(
            f"{name}: its scale is {tuple(scale.shape)}, a [{rows}, {cols}] weight in 128 × 128 blocks needs {blocks}"
        )
    per_value = scale.float().repeat_interleave(INT8_BLOCK, 0)[:rows].repeat_interleave(INT8_BLOCK, 1)[:, :cols]
    return q.float() * per_value


def _with_int8_linears_dequantized(state: dict, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict's tensors, each `X.int8_weight` with its `X.scale` given as `X.weight` (multiplied out: the
    model computes in its own dtype, or requantises to FP8 as it loads)."""
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if name.endswith(".int8_weight"):
            prefix = name.removesuffix("int8_weight")
            scale = state.get(prefix + "scale")
            if not isinstance(scale, torch.Tensor):
                raise LoaderError(f"{path}: {name} has no {prefix}scale beside it")
            yield prefix + "weight", dequantize_block_int8(t, scale, f"{path}: {name}")
        elif not (name.endswith(".scale") and name.removesuffix("scale") + "int8_weight" in state):
            yield name, t


def _first(items: list[str], n: int = 5) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_checkpoint(
    model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], key_map: KeyMap, where: str = "checkpoint"
) -> None:
    """Copy checkpoint tensors into a materialised model; raise one LoaderError listing every problem found.

    A tensor may be an `accel.fp8.ScaledFP8` (an FP8 checkpoint's weight with its scale): layers made FP8 before
    loading (`prepare_fp8_dit`) keep its bytes, others get it multiplied out."""
    params = dict(model.named_parameters())
    owners = {
        name: module for module_name, module in model.named_modules() for name in _param_names(module_name, module)
    }
    filled: dict[str, set[int | None]] = {}
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for name, tensor in tensors:
        mapped = key_map(name)
        if mapped is None or mapped[0] not in params:
            unexpected.append(name)
            continue
        target, shard = mapped
        param, owner = params[target], owners[target]
        try:
            if isinstance(owner, LinearBase) and param is owner.weight and owner.weight_scale is not None:
                # an FP8 layer (accel.fp8.prepare_fp8_dit): FP8 bytes kept, other weights quantised as they load
                owner.load_fp8_weight(_as_scaled_fp8(tensor), shard)
                filled.setdefault(target, set()).add(shard)
                continue
            if isinstance(tensor, ScaledFP8):  # an FP8 checkpoint weight where the layer is not FP8
                tensor = tensor.dequantize()
            if isinstance(owner, LinearBase) or hasattr(owner, "weight_loader"):  # a layer that shards or reshapes
                owner.weight_loader(param, tensor.to(param.dtype), shard)
            else:
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ShapeMismatchError(f"checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
                param.data.copy_(tensor)
        except ShapeMismatchError as e:
            mis_shaped.append(f"{name} ({e})")
            continue
        filled.setdefault(target, set()).add(shard)

    missing = []
    for target in params:
        owner = owners.get(target)
        needed = owner.expected_shards() if isinstance(owner, LinearBase) else 1
        if len(filled.get(target, ())) < needed:
            missing.append(target)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weights: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_first(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped: {_first(mis_shaped, 3)}")
    if problems:
        raise LoaderError(f"{where} does not fit the model: " + "; ".join(problems))


def _as_scaled_fp8(tensor):
    """A plain e4m3 checkpoint tensor is an FP8 weight with scale 1; anything else stays as it is."""
    if isinstance(tensor, torch.Tensor) and tensor.dtype == FP8:
        return ScaledFP8(tensor, torch.ones(()))
    return tensor


def _param_names(module_name: str, module: nn.Module) -> Iterator[str]:
    for pname, _ in module.named_parameters(recurse=False):
        yield f"{module_name}.{pname}" if module_name else pname


HOST_DRAW_VALUES = 1 << 22


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights for speed measurement: N(0, std) for matrices, zeros for biases, ones for norm scales.

    The values keep activations finite through deep stacks, so timings are those of real data, not of NaNs.
    On the host, where drawing normals costs about 5 ns a value on one core (a minute for a 5.7B-parameter text
    encoder), a matrix larger than HOST_DRAW_VALUES repeats one drawn block of that many values instead.
    """
    for name, param in model.named_parameters():
        # A stable per-name seed: the same weights in every process and run.
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if param.dim() >= 2 and param.device.type == "cpu" and param.numel() > HOST_DRAW_VALUES:
            block = torch.empty(HOST_DRAW_VALUES, dtype=param.dtype).normal_(0.0, std, generator=gen)
            flat = param.view(-1)
            for start in range(0, flat.numel(), HOST_DRAW_VALUES):
                part = flat[start : start + HOST_DRAW_VALUES]
                part.copy_(block[: part.numel()])
        elif param.dim() >= 2:
            param.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
