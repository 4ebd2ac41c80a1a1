"""Module names of each LoRA naming scheme → diffusers module names.

A scheme is a table of patterns; `{i}` is a block index. A pattern matches its dotted form
(`double_blocks.0.img_attn.qkv`) and kohya's flattened form (`double_blocks_0_img_attn_qkv`) alike, so one table
serves every trainer that writes that model's names. A row's right side is one diffusers name, or several when the
source module is a fused projection whose output is those modules' outputs concatenated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (down, up) → (down, up): a change of output-row order between the two namings.
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def swap_halves(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BFL's final modulation outputs (shift, scale); diffusers' norm_out.linear outputs (scale, shift)."""
    shift, scale = up.chunk(2, dim=0)
    return down, torch.cat([scale, shift], dim=0)


@dataclass(frozen=True)
class Rule:
    pattern: str
    targets: tuple[str, ...]
    transform: Transform | None = None


@dataclass
class Scheme:
    name: str  # format label, e.g. "bfl-flux"
    architecture: str
    rules: list[Rule]

    def __post_init__(self) -> None:
        self._compiled = [(_compile(r.pattern), r) for r in self.rules]

    def resolve(self, module: str) -> tuple[tuple[str, ...], Transform | None] | None:
        for regex, rule in self._compiled:
            if m := regex.fullmatch(module):
                i = m.group(1) if m.groups() else None
                return tuple(t.format(i=i) for t in rule.targets), rule.transform
        return None


def _compile(pattern: str) -> re.Pattern[str]:
    parts = [re.escape(p).replace(r"\{i\}", r"(\d+)") for p in pattern.split(".")]
    return re.compile("[._]".join(parts))


def _rules(table: dict[str, str | tuple[str, ...]]) -> list[Rule]:
    return [Rule(k, (v,) if isinstance(v, str) else v) for k, v in table.items()]


# ---- FLUX.1 -----------------------------------------------------------------------------------------------------
_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
FLUX_DIFFUSERS = Scheme(
    "diffusers",
    "flux",
    _rules(
        {
            f"{_D}.norm1.linear": f"{_D}.norm1.linear",
            f"{_D}.norm1_context.linear": f"{_D}.norm1_context.linear",
            **{f"{_D}.attn.{n}": f"{_D}.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "to_add_out")},
            **{f"{_D}.attn.{n}": f"{_D}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")},
            **{f"{_D}.{n}": f"{_D}.{n}" for n in ("ff.net.0.proj", "ff.net.2")},
            **{f"{_D}.{n}": f"{_D}.{n}" for n in ("ff_context.net.0.proj", "ff_context.net.2")},
            f"{_S}.norm.linear": f"{_S}.norm.linear",
            **{f"{_S}.attn.{n}": f"{_S}.attn.{n}" for n in ("to_q", "to_k", "to_v")},
            f"{_S}.proj_mlp": f"{_S}.proj_mlp",
            f"{_S}.proj_out": f"{_S}.proj_out",
            **{
                n: n
                for n in (
                    "x_embedder",
                    "context_embedder",
                    "norm_out.linear",
                    "proj_out",
                    *(
                        f"time_text_embed.{e}.linear_{j}"
                        for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
                        for j in (1, 2)
                    ),
                )
            },
        }
    ),
)

# Black Forest Labs' own module names (the original flux repo, ComfyUI, kohya's sd-scripts, ai-toolkit's BFL
# output), plus XLabs' attention-processor LoRAs, which sit on the same blocks.
FLUX_BFL = Scheme(
    "bfl-flux",
    "flux",
    [
        *_rules(
            {
                "double_blocks.{i}.img_attn.qkv": (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v"),
                "double_blocks.{i}.img_attn.proj": f"{_D}.attn.to_out.0",
                "double_blocks.{i}.img_mlp.0": f"{_D}.ff.net.0.proj",
                "double_blocks.{i}.img_mlp.2": f"{_D}.ff.net.2",
                "double_blocks.{i}.img_mod.lin": f"{_D}.norm1.linear",
                "double_blocks.{i}.txt_attn.qkv": (
                    f"{_D}.attn.add_q_proj",
                    f"{_D}.attn.add_k_proj",
                    f"{_D}.attn.add_v_proj",
                ),
                "double_blocks.{i}.txt_attn.proj": f"{_D}.attn.to_add_out",
                "double_blocks.{i}.txt_mlp.0": f"{_D}.ff_context.net.0.proj",
                "double_blocks.{i}.txt_mlp.2": f"{_D}.ff_context.net.2",
                "double_blocks.{i}.txt_mod.lin": f"{_D}.norm1_context.linear",
                "single_blocks.{i}.linear1": (
                    f"{_S}.attn.to_q",
                    f"{_S}.attn.to_k",
                    f"{_S}.attn.to_v",
                    f"{_S}.proj_mlp",
                ),
                "single_blocks.{i}.linear2": f"{_S}.proj_out",
                "single_blocks.{i}.modulation.lin": f"{_S}.norm.linear",
                "img_in": "x_embedder",
                "txt_in": "context_embedder",
                "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
                "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
                "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                "final_layer.linear": "proj_out",
                # XLabs: LoRA on the attention processor; qkv_lora1/proj_lora1 image stream, *2 text stream.
                "double_blocks.{i}.processor.qkv_lora1": (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v"),
                "double_blocks.{i}.processor.proj_lora1": f"{_D}.attn.to_out.0",
                "double_blocks.{i}.processor.qkv_lora2": (
                    f"{_D}.attn.add_q_proj",
                    f"{_D}.attn.add_k_proj",
                    f"{_D}.attn.add_v_proj",
                ),
                "double_blocks.{i}.processor.proj_lora2": f"{_D}.attn.to_add_out",
                # A single block's qkv_lora covers q, k, v only: the first three parts of linear1.
                "single_blocks.{i}.processor.qkv_lora": (f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v"),
                "single_blocks.{i}.processor.proj_lora": f"{_S}.proj_out",
            }
        ),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves),
    ],
)

# ---- Qwen-Image (its native names are diffusers' names) ----------------------------------------------------------
_Q = "transformer_blocks.{i}"
QWEN_IMAGE = Scheme(
    "qwen-image",
    "qwen-image",
    _rules(
        {
            **{
                f"{_Q}.{n}": f"{_Q}.{n}"
                for n in (
                    "img_mod.1",
                    "txt_mod.1",
                    "attn.to_q",
                    "attn.to_k",
                    "attn.to_v",
                    "attn.to_out.0",
                    "attn.add_q_proj",
                    "attn.add_k_proj",
                    "attn.add_v_proj",
                    "attn.to_add_out",
                    "img_mlp.net.0.proj",
                    "img_mlp.net.2",
                    "txt_mlp.net.0.proj",
                    "txt_mlp.net.2",
                )
            },
            **{
                n: n
                for n in (
                    "img_in",
                    "txt_in",
                    "norm_out.linear",
                    "proj_out",
                    "time_text_embed.timestep_embedder.linear_1",
                    "time_text_embed.timestep_embedder.linear_2",
                )
            },
        }
    ),
)

# ---- Wan 2.x: the original repo's names (LightX2V, musubi-tuner, ComfyUI) → diffusers' WanTransformer3DModel ----
_W = "blocks.{i}"
_WAN_NATIVE_TO_DIFFUSERS: dict[str, str] = {
    **{f"{_W}.self_attn.{o}": f"{_W}.attn1.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"{_W}.cross_attn.{o}": f"{_W}.attn2.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    f"{_W}.cross_attn.k_img": f"{_W}.attn2.add_k_proj",
    f"{_W}.cross_attn.v_img": f"{_W}.attn2.add_v_proj",
    f"{_W}.ffn.0": f"{_W}.ffn.net.0.proj",
    f"{_W}.ffn.2": f"{_W}.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
WAN_NATIVE = Scheme("wan", "wan", _rules(_WAN_NATIVE_TO_DIFFUSERS))
WAN_DIFFUSERS = Scheme("diffusers", "wan", _rules({v: v for v in _WAN_NATIVE_TO_DIFFUSERS.values()}))

# ---- Z-Image: diffusers' ZImageTransformer2DModel names; the original repo's (ComfyUI, kohya) fuse q, k and v -----
_ZIMAGE_BLOCKS = ("layers.{i}", "noise_refiner.{i}", "context_refiner.{i}")
_ZIMAGE_BLOCK_MODULES = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
)
_ZIMAGE_TOP_MODULES = (
    "all_x_embedder.2-1",
    "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1",
    "cap_embedder.1",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
)
_ZIMAGE_DIFFUSERS_NAMES = {f"{b}.{m}": f"{b}.{m}" for b in _ZIMAGE_BLOCKS for m in _ZIMAGE_BLOCK_MODULES} | {
    n: n for n in _ZIMAGE_TOP_MODULES
}
ZIMAGE_DIFFUSERS = Scheme("diffusers", "zimage", _rules(_ZIMAGE_DIFFUSERS_NAMES))
ZIMAGE_ORIGINAL = Scheme(
    "zimage",
    "zimage",
    _rules(
        {f"{b}.attention.qkv": tuple(f"{b}.attention.to_{x}" for x in "qkv") for b in _ZIMAGE_BLOCKS}
        | {f"{b}.attention.out": f"{b}.attention.to_out.0" for b in _ZIMAGE_BLOCKS}
        | _ZIMAGE_DIFFUSERS_NAMES
    ),
)

# ---- FLUX.2 ([dev] and [klein]): diffusers' Flux2Transformer2DModel names; BFL's own (the flux2 repo, ComfyUI,
# kohya, ai-toolkit's BFL output) fuse each stream's q, k and v and name the shared modulations `.lin` --------------
_F2D, _F2S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_FLUX2_TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
_FLUX2_BLOCKS = {
    "double_blocks.{i}.img_attn.proj": f"{_F2D}.attn.to_out.0",
    "double_blocks.{i}.img_mlp.0": f"{_F2D}.ff.linear_in",
    "double_blocks.{i}.img_mlp.2": f"{_F2D}.ff.linear_out",
    "double_blocks.{i}.txt_attn.proj": f"{_F2D}.attn.to_add_out",
    "double_blocks.{i}.txt_mlp.0": f"{_F2D}.ff_context.linear_in",
    "double_blocks.{i}.txt_mlp.2": f"{_F2D}.ff_context.linear_out",
    "single_blocks.{i}.linear1": f"{_F2S}.attn.to_qkv_mlp_proj",
    "single_blocks.{i}.linear2": f"{_F2S}.attn.to_out",
}
_FLUX2_FUSED_QKV = {
    "double_blocks.{i}.img_attn.qkv": tuple(f"{_F2D}.attn.to_{x}" for x in "qkv"),
    "double_blocks.{i}.txt_attn.qkv": tuple(f"{_F2D}.attn.add_{x}_proj" for x in "qkv"),
}
_FLUX2_DIFFUSERS_NAMES = [
    *_FLUX2_TOP_LEVEL.values(),
    "norm_out.linear",
    *_FLUX2_BLOCKS.values(),
    *(t for targets in _FLUX2_FUSED_QKV.values() for t in targets),
]
FLUX2_DIFFUSERS = Scheme("diffusers", "flux2", _rules({n: n for n in _FLUX2_DIFFUSERS_NAMES}))
FLUX2_BFL = Scheme(
    "bfl-flux2",
    "flux2",
    [
        *_rules({**_FLUX2_TOP_LEVEL, **_FLUX2_BLOCKS, **_FLUX2_FUSED_QKV}),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves),
    ],
)

SCHEMES: list[Scheme] = [
    FLUX_DIFFUSERS,
    FLUX_BFL,
    QWEN_IMAGE,
    WAN_NATIVE,
    WAN_DIFFUSERS,
    ZIMAGE_DIFFUSERS,
    ZIMAGE_ORIGINAL,
    FLUX2_DIFFUSERS,
    FLUX2_BFL,
]


def schemes_for(preferred_architecture: str | None) -> list[Scheme]:
    """Every scheme, the loaded model's architecture first: names some families share (Qwen-Image and FLUX both
    have `transformer_blocks.N.attn.to_q`) resolve to the same diffusers names either way, only the label differs."""
    return sorted(SCHEMES, key=lambda s: s.architecture != preferred_architecture)
