"""FLUX.2 diffusion transformer (dev and klein), built from ditserve layers.

Reads top to bottom: config → blocks → model → the key map from diffusers' checkpoint names to ours.

The arithmetic follows diffusers' Flux2Transformer2DModel (0.42.1) operation for operation: no biases anywhere,
LayerNorms without affine parameters, per-head RMS norms of q and k, SwiGLU feed-forwards (silu of the first half of
one projection times its second half), RoPE over four position axes (t, h, w, l) with θ = 2000, and modulation that
is computed once per forward from the timestep (and guidance) embedding and shared by every block of a kind: one
set for the image stream of the double-stream blocks, one for their text stream, one for all single-stream blocks.
What differs from diffusers is layout only:
- q, k and v of each stream are one fused GEMM (diffusers keeps three); the single-stream projection is diffusers'
  one GEMM, its [q | k | v | gate | up] parts kept per tensor-parallel rank;
- single-stream blocks keep text and image tokens in one sequence, and the output projection reads
  [attention | SwiGLU(mlp)] in column pieces instead of a concatenation.

The model takes 2-D position ids ([tokens, 4]); reference images of an edit are more image tokens (the pipeline
appends them to the noisy latents' tokens with ids of their own), and the output covers every image token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fp8_quant import QuantizedRows
from ditserve.kernels.fused_residual import gated_residual
from ditserve.layers.activation import silu_and_mul
from ditserve.layers.attention import Attention, write_heads
from ditserve.layers.embeddings import MLPEmbedder, sinusoidal_embedding
from ditserve.layers.linear import (
    MergedColumnParallelLinear,
    PackedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ditserve.layers.norm import QKNorm, layer_norm_modulate
from ditserve.layers.rotary import multi_axis_rope
from ditserve.loader.names import BlockNames, DiffusersNames
from ditserve.parallel.sharding import SequenceSharding, Sharded
from ditserve.parallel.state import tp_group


@dataclass
class Flux2Config:
    """diffusers' transformer/config.json for Flux2Transformer2DModel (unknown keys are ignored)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> Flux2Config:
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
                f"FLUX.2 uses patch_size 1 (latents are packed 2×2 by the pipeline); got {self.patch_size}"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must be even and add up to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)


class SwiGLUFeedForward(nn.Module):
    """w_out(silu(gate) · up) with [gate | up] one packed column-parallel GEMM (diffusers' `linear_in`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = PackedColumnParallelLinear(dim, [hidden, hidden], bias=False)
        self.w2 = RowParallelLinear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        return self.w2(silu_and_mul(self.w13(x)))


class StreamAttention(nn.Module):
    """One stream's share of joint attention: fused QKV projection, QK-norm, output projection."""

    def __init__(self, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = MergedColumnParallelLinear(dim, [dim, dim, dim], bias=False)
        self.norm = QKNorm(head_dim, eps)
        self.proj = RowParallelLinear(dim, dim, bias=False)

    def qkv_heads(self, x: torch.Tensor | QuantizedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, S, H, D] views of one fused projection (q and k not yet normed)."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv.split(self.qkv(x)))
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Text and image tokens keep their own weights and attend jointly; modulation comes from outside."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        dim = cfg.inner_dim
        self.eps = cfg.eps
        self.img_attn = StreamAttention(dim, cfg.attention_head_dim, cfg.eps)
        self.txt_attn = StreamAttention(dim, cfg.attention_head_dim, cfg.eps)
        self.attn = Attention(segments=("text", "image"))
        self.img_mlp = SwiGLUFeedForward(dim, cfg.mlp_hidden)
        self.txt_mlp = SwiGLUFeedForward(dim, cfg.mlp_hidden)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        img_mod: tuple[torch.Tensor, ...],
        txt_mod: tuple[torch.Tensor, ...],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod
        eps = self.eps

        # The norms write their rows quantised when the FP8 linear that reads them takes that.
        img_q, img_k, img_v = self.img_attn.qkv_heads(
            layer_norm_modulate(img, img_shift1, img_scale1, eps, self.img_attn.qkv.takes_quantized_input)
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            layer_norm_modulate(txt, txt_shift1, txt_scale1, eps, self.txt_attn.qkv.takes_quantized_input)
        )
        # The joint sequence is [text, image], the order of the RoPE ids; norm and RoPE write straight into it.
        txt_len, img_len = txt.shape[1], img.shape[1]
        joint_shape = (img.shape[0], txt_len + img_len, *img_q.shape[2:])
        q, k, v = self.attn.input_buffers(img_q, joint_shape, fp8_qk=True)
        self.txt_attn.norm.norm_rope_into(q, k, txt_q, txt_k, rope, 0, joint=self.img_attn.norm)
        self.img_attn.norm.norm_rope_into(q, k, img_q, img_k, rope, txt_len, joint=self.txt_attn.norm)
        write_heads(v, txt_v, 0)
        write_heads(v, img_v, txt_len)
        head_dim = self.img_attn.head_dim

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
        txt_attn_out = self.txt_attn.proj.finish(txt_sum)
        img_attn_out = self.img_attn.proj.finish(img_sum)

        img = gated_residual(img, img_gate1, img_attn_out)
        img_mlp_in = layer_norm_modulate(img, img_shift2, img_scale2, eps, self.img_mlp.w13.takes_quantized_input)
        img = gated_residual(img, img_gate2, self.img_mlp(img_mlp_in))
        txt = gated_residual(txt, txt_gate1, txt_attn_out)
        txt_mlp_in = layer_norm_modulate(txt, txt_shift2, txt_scale2, eps, self.txt_mlp.w13.takes_quantized_input)
        txt = gated_residual(txt, txt_gate2, self.txt_mlp(txt_mlp_in))
        if txt.dtype == torch.float16:  # as the reference: keep fp16 text activations finite
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One sequence of [text, image] tokens; attention and a SwiGLU MLP run in parallel off one projection."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        dim, mlp = cfg.inner_dim, cfg.mlp_hidden
        self.head_dim = cfg.attention_head_dim
        self.eps = cfg.eps
        self.qkv_mlp = PackedColumnParallelLinear(dim, [dim, dim, dim, mlp, mlp], bias=False)
        self.norm = QKNorm(cfg.attention_head_dim, cfg.eps)
        self.attn = Attention(segments=("text", "image"))
        self.proj_out = RowParallelLinear(dim + mlp, dim, bias=False, input_sizes=[dim, mlp])

    def forward(
        self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        shift, scale, gate = mod
        projected_in = self.qkv_mlp(layer_norm_modulate(x, shift, scale, self.eps, self.qkv_mlp.takes_quantized_input))
        q, k, v, gate_part, up_part = self.qkv_mlp.split(projected_in)
        # [gate | up] of this rank lie side by side: one strided view for the SwiGLU kernel.
        mlp = projected_in.narrow(-1, 3 * q.shape[-1], gate_part.shape[-1] + up_part.shape[-1])
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        q_roped, k_roped, v_in = self.attn.input_buffers(q, q.shape, value=v, fp8_qk=True)
        self.norm.norm_rope_into(q_roped, k_roped, q, k, rope)
        write_heads(v_in, v)
        # proj_out reads [attention | swiglu(mlp)] in column pieces: the mlp part needs no attention, so it runs
        # alongside attention's communication; attention's heads are projected as they arrive.
        head_dim, mlp_start = self.head_dim, self.proj_out.part_start(1)
        projected = self.attn(
            q_roped,
            k_roped,
            v_in,
            alongside=lambda: self.proj_out.add_columns(silu_and_mul(mlp), mlp_start),
            project=lambda out, first_head, partial: self.proj_out.add_columns(
                out.flatten(2), first_head * head_dim, partial
            ),
        )
        x = gated_residual(x, gate, self.proj_out.finish(projected))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class Flux2Transformer(nn.Module):
    """Inputs and outputs as diffusers' Flux2Transformer2DModel.forward, with 2-D position ids [tokens, 4].

    hidden_states [B, N, in_channels] (noisy latent tokens, then any reference-image tokens), encoder_hidden_states
    [B, L, joint_attention_dim], timestep [B] in [0, 1], img_ids [N, 4], txt_ids [L, 4], guidance [B] (guidance-
    distilled models; ignored by the others, as diffusers ignores it) → [B, N, out_channels].
    """

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

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        cfg.validate()
        if cfg.num_attention_heads % tp_group().size:
            raise ValueError(f"{cfg.num_attention_heads} heads cannot be split over {tp_group().size} ranks")
        self.config = cfg
        dim = cfg.inner_dim
        channels = cfg.timestep_guidance_channels
        self.x_embedder = ReplicatedLinear(cfg.in_channels, dim, bias=False)
        self.context_embedder = ReplicatedLinear(cfg.joint_attention_dim, dim, bias=False)
        self.timestep_embedder = MLPEmbedder(channels, dim, bias=False)
        self.guidance_embedder = MLPEmbedder(channels, dim, bias=False) if cfg.guidance_embeds else None
        # Shared by every block of a kind: (shift, scale, gate) for attention and for the MLP, or one set.
        self.double_mod_img = ReplicatedLinear(dim, 6 * dim, bias=False)
        self.double_mod_txt = ReplicatedLinear(dim, 6 * dim, bias=False)
        self.single_mod = ReplicatedLinear(dim, 3 * dim, bias=False)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out = ReplicatedLinear(dim, 2 * dim, bias=False)
        self.proj_out = ReplicatedLinear(dim, cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels), bias=False)

    @classmethod
    def from_config(cls, config: dict) -> Flux2Transformer:
        """From diffusers' transformer/config.json contents."""
        return cls(Flux2Config.from_dict(config))

    @staticmethod
    def attention_heads(config: dict) -> int:
        """The heads that tensor and Ulysses parallelism split, from the same config."""
        return Flux2Config.from_dict(config).num_attention_heads

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks that offload, caching and regional compile work on, in execution order."""
        return [*self.double_blocks, *self.single_blocks]

    def conditioning(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The timestep (plus guidance) embedding; timesteps arrive in [0, 1] and are scaled in the activation
        dtype, as the reference does."""
        channels = self.config.timestep_guidance_channels
        t = timestep.to(dtype) * 1000
        temb = self.timestep_embedder(sinusoidal_embedding(t, channels).to(dtype))
        if self.guidance_embedder is not None and guidance is not None:
            g = guidance.to(dtype) * 1000
            temb = temb + self.guidance_embedder(sinusoidal_embedding(g, channels).to(dtype))
        return temb

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        img = self.x_embedder(hidden_states)
        txt = self.context_embedder(encoder_hidden_states)
        temb = self.conditioning(timestep, guidance, img.dtype)
        silu_temb = F.silu(temb)
        img_mod = self.double_mod_img(silu_temb).chunk(6, dim=-1)
        txt_mod = self.double_mod_txt(silu_temb).chunk(6, dim=-1)
        single_mod = self.single_mod(silu_temb).chunk(3, dim=-1)
        cfg = self.config
        rope = multi_axis_rope(torch.cat([txt_ids, img_ids], dim=0), list(cfg.axes_dims_rope), float(cfg.rope_theta))

        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, rope)
        txt_len = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, single_mod, rope)
        img = x[:, txt_len:]

        scale, shift = self.norm_out(silu_temb.to(img.dtype)).chunk(2, dim=-1)  # diffusers' order: scale first
        return self.proj_out(layer_norm_modulate(img, shift, scale, cfg.eps))


# ---- diffusers checkpoint names → ours ------------------------------------------------------------------------
# One table per block kind: diffusers' suffix → (our suffix, shard index inside a fused linear or None).
_DOUBLE_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
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
    "ff.linear_in": ("img_mlp.w13", None),
    "ff.linear_out": ("img_mlp.w2", None),
    "ff_context.linear_in": ("txt_mlp.w13", None),
    "ff_context.linear_out": ("txt_mlp.w2", None),
}
_SINGLE_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
    "attn.to_qkv_mlp_proj": ("qkv_mlp", None),
    "attn.norm_q": ("norm.norm_q", None),
    "attn.norm_k": ("norm.norm_k", None),
    "attn.to_out": ("proj_out", None),
}
_TOP_LEVEL_KEYS: dict[str, tuple[str, int | None]] = {
    "x_embedder": ("x_embedder", None),
    "context_embedder": ("context_embedder", None),
    "time_guidance_embed.timestep_embedder.linear_1": ("timestep_embedder.linear_1", None),
    "time_guidance_embed.timestep_embedder.linear_2": ("timestep_embedder.linear_2", None),
    "time_guidance_embed.guidance_embedder.linear_1": ("guidance_embedder.linear_1", None),
    "time_guidance_embed.guidance_embedder.linear_2": ("guidance_embedder.linear_2", None),
    "double_stream_modulation_img.linear": ("double_mod_img", None),
    "double_stream_modulation_txt.linear": ("double_mod_txt", None),
    "single_stream_modulation.linear": ("single_mod", None),
    "norm_out.linear": ("norm_out", None),
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


def to_diffusers_state_dict(model: Flux2Transformer) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (fused linears split back), for loading into diffusers' model: to run
    diffusers on exactly our weights in benchmarks and parity checks. Single rank only."""
    return _NAMES.state_dict(model)
