"""Reading a LoRA from disk and converting any supported format to the canonical form.

Formats, told apart by their keys:
- diffusers / PEFT / ai-toolkit: `<module>.lora_A.weight`, `<module>.lora_B.weight` under `transformer.`,
  `base_model.model.` or no prefix, diffusers module names. Alphas from `<module>.alpha` keys, from diffusers'
  `lora_adapter_metadata` in the safetensors header, or from a PEFT folder's adapter_config.json; none means
  alpha = rank.
- kohya / sd-scripts: `lora_unet_<flattened module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; for FLUX the
  modules are Black Forest Labs' (fused `img_attn_qkv`, `single_blocks_N_linear1`).
- BFL names with PEFT keys (ai-toolkit / ComfyUI / fal): `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`.
- XLabs FLUX: `double_blocks.N.processor.qkv_lora1.down.weight` / `.up.weight`, no alpha.
- Wan (LightX2V, original repo): `diffusion_model.blocks.N.self_attn.q.lora_down.weight` (+ `.alpha`, or
  `lora_A`/`lora_B`); musubi-tuner's `lora_unet_blocks_N_self_attn_q`.
- Qwen-Image: diffusers names, optionally under `diffusion_model.` or kohya-flattened under `lora_unet_`.
- Z-Image: diffusers names, or the original repo's (fused `attention.qkv`, `attention.out`; ComfyUI under
  `diffusion_model.`, kohya flattened under `lora_unet_`).
Every format scales B(A x) by alpha/rank (rank = A's rows) when it stores an alpha, and by 1 when it does not.

Every tensor is checked finite as it is converted: a LoRA holding NaN or inf (a diverged training, a damaged file)
would turn every image black or garbled, so it is refused naming the tensor, before anything is placed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ditserve.lora.canonical import CanonicalLoRA, LoRAError, LoRAModule
from ditserve.lora.naming import Scheme, schemes_for

# Module-name prefixes written by the various trainers, longest first.
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
_FLATTENED_DIFFUSERS_PREFIX = "lora_transformer_"  # kohya trained on diffusers' FLUX (flattened diffusers names)
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.")
# key suffix → (role, key style)
_SUFFIXES = {
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora_down.weight": ("down", "kohya"),
    ".lora_up.weight": ("up", "kohya"),
    ".down.weight": ("down", "xlabs"),
    ".up.weight": ("up", "xlabs"),
    ".alpha": ("alpha", None),
}


def _first(items: list[str], n: int = 4) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---- reading ----------------------------------------------------------------------------------------------------
def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from a .safetensors file or a folder (PEFT's adapter_model.safetensors + adapter_config.json,
    or a folder holding one .safetensors, as diffusers' save_lora_weights writes). `config` carries what the format
    says about alphas: PEFT's adapter_config, or diffusers' lora_adapter_metadata."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoRAError("lora_path", f"{path}: no such file or folder")
    config: dict = {}
    if p.is_dir():
        if (p / "adapter_model.safetensors").is_file():
            if (p / "adapter_config.json").is_file():
                try:
                    config = {"peft": json.loads((p / "adapter_config.json").read_text())}
                except json.JSONDecodeError as e:
                    raise LoRAError("lora_path", f"{p / 'adapter_config.json'}: invalid JSON ({e})") from None
            p = p / "adapter_model.safetensors"
        else:
            files = sorted(p.glob("*.safetensors"))
            if len(files) != 1:
                found = "no .safetensors file" if not files else f"{len(files)} .safetensors files"
                raise LoRAError("lora_path", f"{path}: {found}; point at the LoRA file itself")
            p = files[0]
    if p.suffix != ".safetensors":
        raise LoRAError(
            "lora_path", f"{path}: only .safetensors LoRAs are loaded (pickled .bin/.pt files can run code); convert it"
        )
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
                tensors[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise LoRAError("lora_path", f"{path}: not a readable safetensors file ({e})") from None
    if "lora_adapter_metadata" in header and "peft" not in config:
        try:
            config = {"diffusers": json.loads(header["lora_adapter_metadata"])}
        except json.JSONDecodeError as e:  # its alphas would be lost: better to refuse than to scale wrongly
            raise LoRAError("lora_path", f"{path}: lora_adapter_metadata in the header is not JSON ({e})") from None
    if not tensors:
        raise LoRAError("lora_path", f"{path}: the file holds no tensors")
    return tensors, config


# ---- conversion -------------------------------------------------------------------------------------------------
def _split_key(key: str) -> tuple[str, str, str | None] | None:
    for suffix, (role, style) in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role, style
    return None


def _strip_prefix(module: str) -> str:
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    if module.startswith(_FLATTENED_DIFFUSERS_PREFIX):
        return module[len(_FLATTENED_DIFFUSERS_PREFIX) :]
    return module


def _config_alphas(config: dict) -> tuple[float | None, dict[str, float], dict[str, int], bool]:
    """(default alpha, alpha_pattern, rank_pattern, use_rslora) from a PEFT config or diffusers metadata."""
    if "peft" in config:
        c = config["peft"]
    elif "diffusers" in config:
        meta = config["diffusers"]
        # A pipeline's save_lora_weights prefixes each component's config; a model's save_lora_adapter does not.
        if any(k.startswith("transformer.") for k in meta):
            c = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
        else:
            c = meta
    else:
        return None, {}, {}, False
    if c.get("use_dora"):
        raise LoRAError("lora_path", "DoRA adapters (use_dora) are not supported; use a plain LoRA")
    alpha = c.get("lora_alpha")
    return (
        float(alpha) if alpha is not None else None,
        {k: float(v) for k, v in (c.get("alpha_pattern") or {}).items()},
        dict(c.get("rank_pattern") or {}),
        bool(c.get("use_rslora", False)),
    )


def _pattern_value(module: str, patterns: dict) -> object | None:
    # PEFT matches a pattern against the end of the module name, on a dot boundary.
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
        try:
            if re.fullmatch(f"(.*\\.)?{pattern}", module):
                return value
        except re.error:
            continue
    return None


def convert(
    tensors: dict[str, torch.Tensor], config: dict | None = None, prefer_architecture: str | None = None
) -> CanonicalLoRA:
    """Any supported format → CanonicalLoRA, or LoRAError naming the keys it cannot place."""
    config = config or {}
    modules: dict[str, dict] = {}
    keys: dict[str, dict[str, str]] = {}  # module → role → the file's key, to name a tensor at fault
    styles: set[str] = set()
    ignored: list[str] = []
    unknown: list[str] = []
    for key, tensor in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            ignored.append(key)  # text-encoder LoRA: the text encoders are not ours to adapt (yet)
            continue
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoRAError("lora_path", f"DoRA weights ({key}) are not supported; use a plain LoRA")
        if key.endswith((".diff", ".diff_b")):
            # Full-weight/bias differences (LightX2V). Norm ones are zeros in practice and diffusers drops them too.
            if "norm" in key and not tensor.any():
                ignored.append(key)
                continue
            raise LoRAError("lora_path", f"full-weight differences ({key}) are not supported, only low-rank pairs")
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, role, style = split
        if style == "xlabs" and ".processor." not in module:
            unknown.append(key)
            continue
        if style is not None:
            styles.add(style)
        modules.setdefault(module, {})[role] = tensor
        keys.setdefault(module, {})[role] = key
    if unknown:
        raise LoRAError(
            "lora_path",
            f"unknown LoRA format: keys {_first(unknown)} are not lora_A/lora_B, lora_down/lora_up or XLabs down/up "
            "pairs",
        )
    if not modules:
        raise LoRAError("lora_path", f"no transformer LoRA weights in the file (only {_first(ignored)})")
    incomplete = [m for m, parts in modules.items() if "down" not in parts or "up" not in parts]
    if incomplete:
        raise LoRAError("lora_path", f"modules without both halves of the low-rank pair: {_first(incomplete)}")

    names = {m: _strip_prefix(m) for m in modules}
    scheme, resolved = _pick_scheme(names, prefer_architecture)
    default_alpha, alpha_pattern, _, rslora = _config_alphas(config)

    out: list[LoRAModule] = []
    for module, parts in modules.items():
        down, up = parts["down"], parts["up"]
        for role in ("down", "up", "alpha"):
            if role in parts and not _finite(parts[role]):
                raise LoRAError(
                    "lora_path",
                    f"tensor {keys[module][role]} holds NaN or infinite values (a diverged training or a damaged "
                    "file); it would spoil every image",
                )
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoRAError(
                "lora_path",
                f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a low-rank pair (2-D, up's "
                "columns = down's rows); conv LoRAs are not supported",
            )
        if "alpha" in parts:
            alpha: float | None = float(parts["alpha"].float().item())
        else:
            pattern_alpha = _pattern_value(names[module], alpha_pattern)
            alpha = float(pattern_alpha) if pattern_alpha is not None else default_alpha  # type: ignore[arg-type]
        if alpha is not None and not math.isfinite(alpha):
            raise LoRAError("lora_path", f"{module}: alpha is {alpha}")
        targets, transform = resolved[module]
        if transform is not None:
            down, up = transform(down, up)
        out.append(LoRAModule(targets=targets, down=down, up=up, alpha=alpha, rslora=rslora))

    fmt = scheme.name
    if "peft" in config:
        fmt = "peft"
    elif "xlabs" in styles:
        fmt = "xlabs-flux"
    elif "kohya" in styles and scheme.architecture == "flux":
        fmt = "kohya-flux" if scheme.name == "bfl-flux" else "kohya-diffusers-flux"
    return CanonicalLoRA(format=fmt, architecture=scheme.architecture, modules=out, ignored=ignored)


def _finite(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    return bool(torch.isfinite(tensor).all())


def _pick_scheme(
    names: dict[str, str], prefer_architecture: str | None
) -> tuple[Scheme, dict[str, tuple[tuple[str, ...], object]]]:
    best: tuple[int, Scheme, list[str]] | None = None
    for scheme in schemes_for(prefer_architecture):
        resolved, missing = {}, []
        for original, name in names.items():
            r = scheme.resolve(name)
            if r is None:
                missing.append(original)
            else:
                resolved[original] = r
        if not missing:
            return scheme, resolved
        if best is None or len(missing) < len(best[2]):
            best = (len(missing), scheme, missing)
    assert best is not None
    _, scheme, missing = best
    raise LoRAError(
        "lora_path",
        f"unknown LoRA format: modules {_first(missing)} match no known naming (closest: {scheme.name} for "
        f"{scheme.architecture}). Supported: diffusers/PEFT, kohya, BFL/ai-toolkit, XLabs (FLUX), Wan/LightX2V, "
        "Qwen-Image, Z-Image",
    )


def load_canonical(path: str | Path, prefer_architecture: str | None = None) -> CanonicalLoRA:
    tensors, config = read_lora_file(path)
    return convert(tensors, config, prefer_architecture)
