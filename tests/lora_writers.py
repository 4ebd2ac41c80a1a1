"""LoRA files for the tiny FLUX, written the way each trainer writes them (keys, alphas, metadata).

Shared by the tests/test_lora_*.py modules. Every writer takes the tiny model's folder and returns the path of
what it wrote; weights are random but seeded, large enough that a LoRA visibly changes the picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

STD = 0.15  # A and B entries; with rank 4 the update is comparable to the tiny model's weights (std 0.05)


def flux_dims(folder: Path) -> dict:
    cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return {
        "dim": dim,
        "mlp": 4 * dim,
        "in": cfg["in_channels"],
        "text": cfg["joint_attention_dim"],
        "pooled": cfg["pooled_projection_dim"],
        "double": cfg["num_layers"],
        "single": cfg["num_single_layers"],
    }


def _pair(g: torch.Generator, out: int, inp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inp, generator=g) * STD, torch.randn(out, rank, generator=g) * STD


def diffusers_modules(d: dict) -> dict[str, tuple[int, int]]:
    """diffusers module name → (out, in) for every linear of the tiny FLUX transformer."""
    dim, mlp = d["dim"], d["mlp"]
    mods: dict[str, tuple[int, int]] = {}
    for i in range(d["double"]):
        b = f"transformer_blocks.{i}"
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            mods[f"{b}.attn.{n}"] = (dim, dim)
        for ff in ("ff", "ff_context"):
            mods[f"{b}.{ff}.net.0.proj"] = (mlp, dim)
            mods[f"{b}.{ff}.net.2"] = (dim, mlp)
        mods[f"{b}.norm1.linear"] = (6 * dim, dim)
        mods[f"{b}.norm1_context.linear"] = (6 * dim, dim)
    for i in range(d["single"]):
        b = f"single_transformer_blocks.{i}"
        for n in ("attn.to_q", "attn.to_k", "attn.to_v"):
            mods[f"{b}.{n}"] = (dim, dim)
        mods[f"{b}.proj_mlp"] = (mlp, dim)
        mods[f"{b}.proj_out"] = (dim, dim + mlp)
        mods[f"{b}.norm.linear"] = (3 * dim, dim)
    mods["x_embedder"] = (dim, d["in"])
    mods["context_embedder"] = (dim, d["text"])
    mods["norm_out.linear"] = (2 * dim, dim)
    mods["proj_out"] = (d["in"], dim)
    return mods


def write_ai_toolkit(folder: Path, out: Path, seed: int = 0, rank: int = 4) -> Path:
    """ai-toolkit's FLUX.1 output: diffusers names under `transformer.`, lora_A/lora_B, every linear, no alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in diffusers_modules(flux_dims(folder)).items():
        a, b = _pair(g, o, i, rank)
        sd[f"transformer.{name}.lora_A.weight"] = a
        sd[f"transformer.{name}.lora_B.weight"] = b
    save_file(sd, str(out), metadata={"format": "pt"})
    return out


def write_poisoned(folder: Path, out: Path, seed: int = 0) -> Path:
    """An ai-toolkit LoRA whose every lora_B is NaN (a diverged training): it must be refused, naming a tensor."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in diffusers_modules(flux_dims(folder)).items():
        a, _ = _pair(g, o, i, 4)
        sd[f"transformer.{name}.lora_A.weight"] = a
        sd[f"transformer.{name}.lora_B.weight"] = torch.full((o, 4), float("nan"))
    save_file(sd, str(out), metadata={"format": "pt"})
    return out


def _peft_transformer(folder: Path, seed: int, rank: int, alpha: float, targets: list[str], rank_pattern=None):
    """diffusers' own FLUX transformer with a PEFT LoRA injected and its LoRA weights randomised."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    model = FluxTransformer2DModel.from_pretrained(Path(folder) / "transformer")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        rank_pattern=rank_pattern or {},
        init_lora_weights=False,
    )
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * STD)
    return model, config


DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "add_k_proj", "to_add_out", "proj_mlp", "norm1.linear", "ff.net.2"]


def write_diffusers(folder: Path, out_dir: Path, seed: int = 1, rank: int = 4, alpha: float = 8.0) -> Path:
    """What diffusers' training scripts write: FluxPipeline.save_lora_weights with the adapter config as metadata
    (so lora_alpha ≠ rank is honoured), keys `transformer.<module>.lora_A.weight`."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    model, config = _peft_transformer(folder, seed, rank, alpha, DIFFUSERS_TARGETS, rank_pattern={"to_k": 2})
    FluxPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def write_peft_folder(folder: Path, out_dir: Path, seed: int = 2, rank: int = 4, alpha: float = 2.0):
    """PEFT's save_pretrained: adapter_model.safetensors (`base_model.model.` keys) + adapter_config.json.

    Returns (folder, the PEFT-wrapped diffusers transformer), the latter to run diffusers with PEFT's own forward.
    """
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model

    model = FluxTransformer2DModel.from_pretrained(Path(folder) / "transformer")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["to_q", "to_v", "add_q_proj", "to_out.0", "proj_out", "ff_context.net.0.proj"],
        alpha_pattern={"proj_out": 6.0},
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * STD)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir), peft_model


def kohya_modules(d: dict, fused_single: bool, top_level: bool) -> dict[str, tuple[int, int]]:
    """kohya sd-scripts' FLUX module names (BFL's, flattened) → (out, in)."""
    dim, mlp = d["dim"], d["mlp"]
    mods: dict[str, tuple[int, int]] = {}
    for i in range(d["double"]):
        for s in ("img", "txt"):
            mods[f"lora_unet_double_blocks_{i}_{s}_attn_qkv"] = (3 * dim, dim)
            mods[f"lora_unet_double_blocks_{i}_{s}_attn_proj"] = (dim, dim)
            mods[f"lora_unet_double_blocks_{i}_{s}_mlp_0"] = (mlp, dim)
            mods[f"lora_unet_double_blocks_{i}_{s}_mlp_2"] = (dim, mlp)
            mods[f"lora_unet_double_blocks_{i}_{s}_mod_lin"] = (6 * dim, dim)
    for i in range(d["single"]):
        if fused_single:
            mods[f"lora_unet_single_blocks_{i}_linear1"] = (3 * dim + mlp, dim)
        mods[f"lora_unet_single_blocks_{i}_linear2"] = (dim, dim + mlp)
        mods[f"lora_unet_single_blocks_{i}_modulation_lin"] = (3 * dim, dim)
    if top_level:
        mods.update({k: (o(d), i(d)) for k, (_, o, i) in KOHYA_TOP_LEVEL.items()})
    return mods


# kohya top-level module → (diffusers module, out, in). diffusers' kohya converter emits these without the
# `transformer.` prefix, so its load_lora_weights silently drops them; the tests check ours against the same update
# written in diffusers' format instead.
KOHYA_TOP_LEVEL = {
    "lora_unet_img_in": ("x_embedder", lambda d: d["dim"], lambda d: d["in"]),
    "lora_unet_txt_in": ("context_embedder", lambda d: d["dim"], lambda d: d["text"]),
    "lora_unet_time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1", lambda d: d["dim"], lambda d: 256),
    "lora_unet_time_in_out_layer": (
        "time_text_embed.timestep_embedder.linear_2",
        lambda d: d["dim"],
        lambda d: d["dim"],
    ),
    "lora_unet_guidance_in_in_layer": (
        "time_text_embed.guidance_embedder.linear_1",
        lambda d: d["dim"],
        lambda d: 256,
    ),
    "lora_unet_vector_in_in_layer": (
        "time_text_embed.text_embedder.linear_1",
        lambda d: d["dim"],
        lambda d: d["pooled"],
    ),
    "lora_unet_vector_in_out_layer": ("time_text_embed.text_embedder.linear_2", lambda d: d["dim"], lambda d: d["dim"]),
    "lora_unet_final_layer_linear": ("proj_out", lambda d: d["in"], lambda d: d["dim"]),
    "lora_unet_final_layer_adaLN_modulation_1": ("norm_out.linear", lambda d: 2 * d["dim"], lambda d: d["dim"]),
}


def write_kohya(
    folder: Path,
    out: Path,
    seed: int = 3,
    rank: int = 4,
    alpha: float = 2.0,
    fused_single: bool = False,
    top_level: bool = False,
) -> Path:
    """sd-scripts' FLUX LoRA: `lora_unet_<flattened BFL module>.lora_down/.lora_up.weight` + `.alpha` (alpha/rank
    scaling). `fused_single` adds single blocks' `linear1` (q, k, v and MLP fused), which diffusers' converter can
    only split at full FLUX size (it hard-codes 3072/12288); `top_level` adds the embedders and final layer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in kohya_modules(flux_dims(folder), fused_single, top_level).items():
        a, b = _pair(g, o, i, rank)
        sd[f"{name}.lora_down.weight"] = a
        sd[f"{name}.lora_up.weight"] = b
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(out), metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank)})
    return out


def kohya_as_diffusers(kohya_file: Path, out_dir: Path, d: dict) -> list[Path]:
    """A kohya file as files diffusers applies exactly: the block modules it converts itself (kept as kohya), and
    single blocks' linear1 and the top-level modules re-expressed in diffusers' format (A shared by the parts of a
    fused module, B split by rows, alpha/rank folded into A, the final modulation's (shift, scale) rows swapped to
    diffusers' (scale, shift)). Mathematically the same update."""
    from safetensors.torch import load_file

    sd = load_file(str(kohya_file))
    dim, mlp = d["dim"], d["mlp"]
    blocks = {k: v for k, v in sd.items() if "linear1" not in k and not k.startswith(tuple(KOHYA_TOP_LEVEL))}
    rest: dict[str, torch.Tensor] = {}

    def emit(kohya: str, targets: list[str], sizes: list[int], swap: bool = False) -> None:
        if f"{kohya}.lora_down.weight" not in sd:
            return
        a, b = sd[f"{kohya}.lora_down.weight"], sd[f"{kohya}.lora_up.weight"]
        a = a * (sd[f"{kohya}.alpha"].item() / a.shape[0])
        if swap:
            b = torch.cat(b.chunk(2)[::-1])
        for name, rows in zip(targets, b.split(sizes)):
            rest[f"transformer.{name}.lora_A.weight"] = a.clone()
            rest[f"transformer.{name}.lora_B.weight"] = rows.clone()

    for i in range(d["single"]):
        parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
        emit(
            f"lora_unet_single_blocks_{i}_linear1",
            [f"single_transformer_blocks.{i}.{p}" for p in parts],
            [dim, dim, dim, mlp],
        )
    for kohya, (name, o, _) in KOHYA_TOP_LEVEL.items():
        emit(kohya, [name], [o(d)], swap=kohya.endswith("adaLN_modulation_1"))
    paths = [out_dir / "blocks.safetensors", out_dir / "rest.safetensors"]
    save_file(blocks, str(paths[0]))
    save_file(rest, str(paths[1]))
    return paths


def write_xlabs(folder: Path, out: Path, seed: int = 4, rank: int = 4) -> Path:
    """XLabs' FLUX LoRA: attention-processor LoRAs `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`
    and `single_blocks.N.processor.{qkv,proj}_lora.*`, no alpha."""
    d = flux_dims(folder)
    dim, mlp = d["dim"], d["mlp"]
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(name: str, o: int, i: int) -> None:
        a, b = _pair(g, o, i, rank)
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = a, b

    for i in range(d["double"]):
        for s in ("1", "2"):
            put(f"double_blocks.{i}.processor.qkv_lora{s}", 3 * dim, dim)
            put(f"double_blocks.{i}.processor.proj_lora{s}", dim, dim)
    for i in range(d["single"]):
        put(f"single_blocks.{i}.processor.qkv_lora", 3 * dim, dim)
        put(f"single_blocks.{i}.processor.proj_lora", dim, dim + mlp)
    save_file(sd, str(out))
    return out
