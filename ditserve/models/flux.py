"""FLUX.1 diffusion transformer (dev and schnell), built from ditserve layers.

Reads top to bottom: config → blocks → model → the key map from diffusers' checkpoint names to ours.

The arithmetic follows diffusers' FluxTransformer2DModel operation for operation (same norms, same float32 RoPE,
same order of residual adds), so outputs match it to float rounding. What differs is layout:
- q, k and v of each stream are one fused GEMM; in single-stream blocks q, k, v and the MLP up-projection are one.
- single-stream blocks keep text and image tokens in one sequence instead of concatenating and splitting them
  in every block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
from torch import nn

from ditserve.kernels.fp8_quant import QuantizedRows
from ditserve.kernels.fused_residual import gated_residual
from ditserve.layers.activation import gelu_tanh
from ditserve.layers.attention import Attention, write_heads
from ditserve.layers.blocks import BlockLoop, Blocks, Glue, State
from ditserve.layers.embeddings import MLPEmbedder, sinusoidal_embedding
from ditserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ditserve.layers.modulation import Modulation
from ditserve.layers.norm import QKNorm, layer_norm_modulate
from ditserve.layers.rotary import multi_axis_rope
from ditserve.loader.names import BlockNames, DiffusersNames
from ditserve.parallel.sharding import SequenceSharding, Sharded
from ditserve.parallel.state import tp_group


@dataclass
class FluxConfig:
    """diffusers' transformer/config.json for FluxTransformer2DModel (unknown keys are ignored)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_dict(cls, config: dict) -> FluxConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.patch_size != 1:
            raise ValueError(
                f"FLUX.1 uses patch_size 1 (latents are packed 2×2 by the pipeline); got {self.patch_size}"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must add up to attention_head_dim {self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class FeedForward(nn.Module):
    """fc1 → GELU(tanh) → fc2, with fc1 column- and fc2 row-parallel."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden)
        self.fc2 = RowParallelLinear(hidden, dim)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x), self.fc2.takes_quantized_input))


class StreamAttention(nn.Module):
    """One stream's share of joint attention: fused QKV projection, QK-norm, output projection."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = MergedColumnParallelLinear(dim, [dim, dim, dim])
        self.norm = QKNorm(head_dim)
        self.proj = RowParallelLinear(dim, dim)

    def qkv_heads(self, x: torch.Tensor | QuantizedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, S, H, D] views of one fused projection (q and k not yet normed)."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv.split(self.qkv(x)))
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Text and image tokens keep their own weights and attend jointly (MMDiT block)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.img_mod = Modulation(dim, 6)
        self.txt_mod = Modulation(dim, 6)
        self.img_attn = StreamAttention(dim, cfg.attention_head_dim)
        self.txt_attn = StreamAttention(dim, cfg.attention_head_dim)
        self.attn = Attention(segments=("text", "image"))
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def modulated_input(self, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The image stream as this block's attention reads it: normed and modulated by the timestep."""
        shift, scale = self.img_mod(temb)[:2]
        return layer_norm_modulate(img, shift, scale)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(temb)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(temb)

        # The norms (and the MLPs' GELU) write their rows quantised when the FP8 linear that reads them takes that.
        img_q, img_k, img_v = self.img_attn.qkv_heads(
            layer_norm_modulate(img, img_shift1, img_scale1, quantize=self.img_attn.qkv.takes_quantized_input)
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            layer_norm_modulate(txt, txt_shift1, txt_scale1, quantize=self.txt_attn.qkv.takes_quantized_input)
        )
        # Joint sequence is [text, image], the order the RoPE ids were built in. Norm and RoPE write straight
        # into the joint q and k (wherever attention wants them), so the concatenation costs no extra pass.
        txt_len = txt.shape[1]
        joint_shape = (img.shape[0], txt_len + img.shape[1], *img_q.shape[2:])
        q, k, v = self.attn.input_buffers(img_q, joint_shape, fp8_qk=True)
        self.txt_attn.norm.norm_rope_into(q, k, txt_q, txt_k, rope, 0, joint=self.img_attn.norm)
        self.img_attn.norm.norm_rope_into(q, k, img_q, img_k, rope, txt_len, joint=self.txt_attn.norm)
        write_heads(v, txt_v, 0)
        write_heads(v, img_v, txt_len)
        img_len, head_dim = img.shape[1], self.img_attn.head_dim

        def project(out: torch.Tensor, first_head: int, partial):
            """Both streams' output projections of heads first_head… of the joint output (see `Attention`)."""
            txt_out, img_out = out.flatten(2).split([txt_len, img_len], dim=1)
            txt_sum, img_sum = partial if partial is not None else (None, None)
            start = first_head * head_dim
            return (
                self.txt_attn.proj.add_columns(txt_out, start, txt_sum),
                self.img_attn.proj.add_columns(img_out, start, img_sum),
            )

        txt_sum, img_sum = self.attn(q, k, v, project=project)
        # Finished in the order the sums were started: with the two-shot all-reduce the first one may lie in the
        # reduction's buffer and is then summed there without a copy (the other order is correct too; the
        # second sum would go through NCCL, see parallel/reduce.py).
        txt_attn_out = self.txt_attn.proj.finish(txt_sum)
        img_attn_out = self.img_attn.proj.finish(img_sum)

        img = gated_residual(img, img_gate1, img_attn_out)
        img_mlp_in = layer_norm_modulate(img, img_shift2, img_scale2, quantize=self.img_mlp.fc1.takes_quantized_input)
        img = gated_residual(img, img_gate2, self.img_mlp(img_mlp_in))
        txt = gated_residual(txt, txt_gate1, txt_attn_out)
        txt_mlp_in = layer_norm_modulate(txt, txt_shift2, txt_scale2, quantize=self.txt_mlp.fc1.takes_quantized_input)
        txt = gated_residual(txt, txt_gate2, self.txt_mlp(txt_mlp_in))
        if txt.dtype == torch.float16:  # as the reference: keep fp16 text activations finite
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One sequence of [text, image] tokens; attention and MLP run in parallel off one fused projection."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim, mlp_dim = cfg.inner_dim, 4 * cfg.inner_dim
        self.head_dim = cfg.attention_head_dim
        self.mod = Modulation(dim, 3)
        self.qkv_mlp = MergedColumnParallelLinear(dim, [dim, dim, dim, mlp_dim])
        self.norm = QKNorm(cfg.attention_head_dim)
        self.attn = Attention(segments=("text", "image"))
        self.proj_out = RowParallelLinear(dim + mlp_dim, dim, input_sizes=[dim, mlp_dim])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift, scale, gate = self.mod(temb)
        # The norm and the GELU write their rows quantised when the FP8 linear that reads them takes that.
        h = layer_norm_modulate(x, shift, scale, quantize=self.qkv_mlp.takes_quantized_input)
        q, k, v, mlp = self.qkv_mlp.split(self.qkv_mlp(h))
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        q_roped, k_roped, v_in = self.attn.input_buffers(q, q.shape, value=v, fp8_qk=True)
        self.norm.norm_rope_into(q_roped, k_roped, q, k, rope)
        write_heads(v_in, v)
        # proj_out reads [attention | gelu(mlp)], taken in column pieces: no concatenation, and the mlp part (GELU
        # and 80% of proj_out's product) needs no attention, so attention may run it while it communicates; its
        # heads' products are added as it has them. The GELU goes there too: issued before attention's exchange,
        # the exchange would wait for it, and then the GEMM after it would take every SM first.
        head_dim, mlp_start = self.head_dim, self.proj_out.part_start(1)
        projected = self.attn(
            q_roped,
            k_roped,
            v_in,
            alongside=lambda: self.proj_out.add_columns(gelu_tanh(mlp, self.proj_out.takes_quantized_input), mlp_start),
            project=lambda out, first_head, partial: self.proj_out.add_columns(
                out.flatten(2), first_head * head_dim, partial
            ),
        )
        x = gated_residual(x, gate, self.proj_out.finish(projected))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class FluxTransformer(nn.Module):
    """Inputs and outputs as diffusers' FluxTransformer2DModel.forward (packed latents, 2-D ids)."""

    # Text and image tokens split over sequence-parallel ranks each on its own; the joint sequence is
    # [text | image] (see parallel/sharding.py); the image tokens are gathered back.
    sequence_sharding = SequenceSharding(
        inputs={
            "hidden_states": Sharded(1, "image"),
            "encoder_hidden_states": Sharded(1, "text"),
            "img_ids": Sharded(0, "image"),
            "txt_ids": Sharded(0, "text"),
        },
        output=Sharded(1, "image"),
    )

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        cfg.validate()
        if cfg.num_attention_heads % tp_group().size:
            raise ValueError(f"{cfg.num_attention_heads} heads cannot be split over {tp_group().size} ranks")
        self.config = cfg
        dim = cfg.inner_dim
        self.x_embedder = ReplicatedLinear(cfg.in_channels, dim)
        self.context_embedder = ReplicatedLinear(cfg.joint_attention_dim, dim)
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if cfg.guidance_embeds else None
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, dim)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out = Modulation(dim, 2)
        self.proj_out = ReplicatedLinear(dim, cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels))
        self.block_loop = BlockLoop()

    @classmethod
    def from_config(cls, config: dict) -> FluxTransformer:
        """From diffusers' transformer/config.json contents."""
        return cls(FluxConfig.from_dict(config))

    @staticmethod
    def attention_heads(config: dict) -> int:
        """The heads that tensor and Ulysses parallelism split, from the same config."""
        return FluxConfig.from_dict(config).num_attention_heads

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks that offload, caching and regional compile work on, in execution order."""
        return [*self.double_blocks, *self.single_blocks]

    def conditioning(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        # Timesteps arrive in [0, 1]; rounding to the activation dtype before scaling matches the reference.
        t = timestep.to(dtype) * 1000
        temb = self.timestep_embedder(sinusoidal_embedding(t).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (dev): pass `guidance`")
            g = guidance.to(dtype) * 1000
            temb = temb + self.guidance_embedder(sinusoidal_embedding(g).to(pooled.dtype))
        return temb + self.text_embedder(pooled)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        img = self.x_embedder(hidden_states)
        temb = self.conditioning(timestep, guidance, pooled_projections, img.dtype)
        txt = self.context_embedder(encoder_hidden_states)
        rope = multi_axis_rope(torch.cat([txt_ids, img_ids], dim=0), list(self.config.axes_dims_rope))

        txt_len = txt.shape[1]
        (x,) = self.block_loop(
            (img, txt),
            Blocks(self.double_blocks, _double_block, temb, rope),
            Glue(_join_streams),
            Blocks(self.single_blocks, _single_block, temb, rope),
            signal=lambda: self.double_blocks[0].modulated_input(img, temb),
        )
        img = x[:, txt_len:]

        scale, shift = self.norm_out(temb.to(img.dtype))  # diffusers' AdaLayerNormContinuous: scale first
        return self.proj_out(layer_norm_modulate(img, shift, scale))


# ---- the block loop's steps (see layers/blocks.py): state (img, txt), then ([txt | img],) ------------------------
def _double_block(block: DoubleStreamBlock, state: State, temb: torch.Tensor, rope) -> State:
    return block(*state, temb, rope)


def _join_streams(state: State) -> State:
    img, txt = state
    return (torch.cat([txt, img], dim=1),)


def _single_block(block: SingleStreamBlock, state: State, temb: torch.Tensor, rope) -> State:
    return (block(state[0], temb, rope),)


# ---- diffusers checkpoint names → ours ------------------------------------------------------------------------
# One table per block kind: diffusers' suffix → (our suffix, shard index inside a fused linear or None).
_DOUBLE_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
    "norm1.linear": ("img_mod.linear", None),
    "norm1_context.linear": ("txt_mod.linear", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.norm_q": ("img_attn.norm.norm_q", None),
    "attn.norm_k": ("img_attn.norm.norm_k", None),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.norm_added_q": ("txt_attn.norm.norm_q", None),
    "attn.norm_added_k": ("txt_attn.norm.norm_k", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.fc1", None),
    "ff.net.2": ("img_mlp.fc2", None),
    "ff_context.net.0.proj": ("txt_mlp.fc1", None),
    "ff_context.net.2": ("txt_mlp.fc2", None),
}
_SINGLE_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
    "norm.linear": ("mod.linear", None),
    "attn.to_q": ("qkv_mlp", 0),
    "attn.to_k": ("qkv_mlp", 1),
    "attn.to_v": ("qkv_mlp", 2),
    "proj_mlp": ("qkv_mlp", 3),
    "attn.norm_q": ("norm.norm_q", None),
    "attn.norm_k": ("norm.norm_k", None),
    "proj_out": ("proj_out", None),
}
_TOP_LEVEL_KEYS: dict[str, tuple[str, int | None]] = {
    "x_embedder": ("x_embedder", None),
    "context_embedder": ("context_embedder", None),
    "time_text_embed.timestep_embedder.linear_1": ("timestep_embedder.linear_1", None),
    "time_text_embed.timestep_embedder.linear_2": ("timestep_embedder.linear_2", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_embedder.linear_1", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_embedder.linear_2", None),
    "time_text_embed.text_embedder.linear_1": ("text_embedder.linear_1", None),
    "time_text_embed.text_embedder.linear_2": ("text_embedder.linear_2", None),
    "norm_out.linear": ("norm_out.linear", None),
    "proj_out": ("proj_out", None),
}
_NAMES = DiffusersNames(
    blocks=(
        BlockNames("transformer_blocks", "double_blocks", _DOUBLE_BLOCK_KEYS),
        BlockNames("single_transformer_blocks", "single_blocks", _SINGLE_BLOCK_KEYS),
    ),
    top=_TOP_LEVEL_KEYS,
)


def map_diffusers_key(name: str) -> tuple[str, int | None] | None:
    """diffusers parameter name → (our parameter name, shard index), or None for a name we do not know."""
    return _NAMES.map(name)


def to_diffusers_state_dict(model: FluxTransformer) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (fused linears split back), for loading into diffusers' model: to run
    diffusers on exactly our weights in benchmarks and parity checks. Single rank only."""
    return _NAMES.state_dict(model)


# ---- Black Forest Labs' checkpoint names (the original repo's, ComfyUI's single files) → diffusers' ---------------
# The module renames and fused-projection splits are the LoRA naming table's (lora/naming.py FLUX_BFL); what LoRAs
# never touch, the QK-norm scales, is named here.
_BFL_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
# Prefixes a whole-model file puts before the DiT's names (ComfyUI's checkpoints; some exports).
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def bfl_to_diffusers(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """One BFL-named tensor → its diffusers-named tensor(s); None for a name that is not FLUX.1's.

    Fused projections split into their parts (qkv → q, k, v; a single block's linear1 → q, k, v, mlp) and the final
    modulation's (shift, scale) halves swap into diffusers' (scale, shift)."""
    from ditserve.lora.naming import FLUX_BFL

    module, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias", "scale"):
        return None
    if m := _BFL_BLOCK.match(module):
        blocks, index, inner = m.groups()
        if inner in _BFL_NORMS and kind == "scale":
            prefix = "transformer_blocks" if blocks == "double_blocks" else "single_transformer_blocks"
            return [(f"{prefix}.{index}.{_BFL_NORMS[inner]}.weight", tensor)]
    if kind == "scale":
        return None
    resolved = FLUX_BFL.resolve(module)
    if resolved is None or ".processor." in module:  # XLabs' LoRA-only module names never appear in a checkpoint
        return None
    targets, transform = resolved
    if transform is not None:
        tensor = transform(tensor, tensor)[1]  # the same row reordering as a LoRA's up matrix
    if len(targets) == 1:
        return [(f"{targets[0]}.{kind}", tensor)]
    # q, k, v (and a single block's MLP input, the rest) are equal parts of the hidden size, stacked by rows.
    hidden = tensor.shape[0] // 3 if len(targets) == 3 else _single_block_hidden(tensor, name)
    sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(targets) == 4 else [])
    return [(f"{t}.{kind}", part) for t, part in zip(targets, tensor.split(sizes, dim=0))]


def _single_block_hidden(tensor: torch.Tensor, name: str) -> int:
    """A single block's linear1 has rows [q, k, v, mlp] = [h, h, h, 4h] (mlp_ratio 4): 7h rows."""
    if tensor.shape[0] % 7:
        raise ValueError(f"{name}: {tensor.shape[0]} rows is not 7 × hidden (q, k, v and a 4 × hidden MLP)")
    return tensor.shape[0] // 7


def is_bfl_flux(names: set[str]) -> bool:
    """Whether a checkpoint's (prefix-stripped) names are FLUX.1's in BFL layout."""
    return (
        "img_in.weight" in names
        and "double_blocks.0.img_attn.qkv.weight" in names
        and "double_stream_modulation_img.lin.weight" not in names  # FLUX.2
        and not any(n.startswith("distilled_guidance_layer.") for n in names)  # Chroma
    )


def config_from_bfl_shapes(shapes: dict[str, tuple[int, ...]]) -> FluxConfig:
    """diffusers' FluxTransformer2DModel config of a BFL-named FLUX.1 checkpoint, from its tensor shapes alone."""
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim != 128:
        # The RoPE split over (time, row, column) is not in the file: FLUX.1's (16, 56, 56) assumes heads of 128.
        raise ValueError(
            f"heads of {head_dim} channels: FLUX.1 single files have heads of 128; load a model with other "
            "heads from its diffusers folder (transformer/config.json names its RoPE axes)"
        )

    def count(prefix: str) -> int:
        return len({n.split(".")[1] for n in shapes if n.startswith(prefix)})

    config = FluxConfig(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        num_layers=count("double_blocks."),
        num_single_layers=count("single_blocks."),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
        axes_dims_rope=(16, 56, 56),
    )
    config.validate()
    return config
