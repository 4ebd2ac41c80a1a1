"""Wan (2.1 and 2.2) video diffusion transformer, built from ditserve layers.

Reads top to bottom: config → blocks → model → the key map from diffusers' checkpoint names to ours.

The arithmetic follows diffusers' WanTransformer3DModel (0.42.1) operation for operation: float32 LayerNorms with
1 + scale modulation from a learned table plus the timestep projection, float32 gated residuals, q and k RMS-normed
over the whole inner width (all heads at once, not per head), a 3D RoPE whose head channels split into frame,
height and width parts (interleaved pairs, angles in float64), cross-attention to the text without positions, a
GELU(tanh) feed-forward, so outputs match it to float rounding. What differs is layout:
- the model takes patch tokens [B, N, C·pt·ph·pw] (the pipeline patchifies; diffusers' Conv3d with kernel = stride
  is this one GEMM) and their (frame, row, column) positions, and returns tokens [B, N, pt·ph·pw·C_out] for the
  pipeline to unpatchify. Sequence parallelism splits the video tokens; the text stays whole on every rank.
- self-attention's q, k and v are one fused GEMM, cross-attention's k and v (and the image k and v of I2V) another.
- the per-block modulation table and the output table stay float32 (diffusers keeps them so), whatever the dtype.

The self-attention can run sparse (layers/sparse_attention.py): `sliding-tile` on any Wan, `sla` on checkpoints
fine-tuned with SLA (TurboWan: config `sparse_linear_attention`, one learned proj_l per block), `vsa` on checkpoints
trained with VSA (FastWan: `blocks.N.to_gate_compress`, fused into the block's qkv projection). The forward takes
the request's backend (`attention`) and the token grid (`token_grid`, which sequence parallelism cannot tell from
its shard of positions). The key map reads diffusers' names and the original Wan repository's (TurboDiffusion's
checkpoints are the latter, with SLA's proj_l).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fp8_quant import QuantizedRows, quantized
from ditserve.kernels.fused_norm import layer_norm_modulate, residual_layer_norm_modulate
from ditserve.kernels.fused_residual import gated_residual
from ditserve.layers.activation import gelu_tanh
from ditserve.layers.attention import Attention, attention_request, self_attentions, write_heads
from ditserve.layers.blocks import BlockLoop, Blocks, State
from ditserve.layers.embeddings import MLPEmbedder, PatchEmbedding, sinusoidal_embedding
from ditserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ditserve.layers.norm import FP32LayerNorm, HeadsRMSNorm
from ditserve.layers.rotary import multi_axis_rope
from ditserve.parallel.sharding import SequenceSharding, Sharded
from ditserve.parallel.state import tp_group

ROPE_THETA = 10000.0  # fixed in the reference
IMAGE_NORM_EPS = 1e-5  # the image embedder's LayerNorms (nn.LayerNorm's default there, not the config's eps)


@dataclass
class WanConfig:
    """diffusers' transformer/config.json for WanTransformer3DModel (unknown keys are ignored).

    `qk_norm` is read but, as in diffusers, every attention norms q and k across heads whatever it says."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # I2V: width of the CLIP image features
    added_kv_proj_dim: int | None = None  # I2V: width of the image tokens the cross-attention's extra k/v read
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # FLF2V's learned image-token positions
    # ditserve's key, not diffusers': the checkpoint was fine-tuned with SLA and carries each block's proj_l
    sparse_linear_attention: bool = False
    # ditserve's key: the checkpoint was trained with VSA and carries each block's to_gate_compress (FastWan's
    # folders say so only through those names: see `WanTransformer.config_from_checkpoint`)
    video_sparse_attention: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> WanConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (frames, height, width), got {list(self.patch_size)}")
        if self.attention_head_dim % 2 or self.rope_axes[0] <= 0:
            raise ValueError(f"attention_head_dim {self.attention_head_dim} is too small or odd for Wan's 3D RoPE")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim are set together (I2V) or not at all")
        if self.pos_embed_seq_len is not None:
            raise ValueError("pos_embed_seq_len (FLF2V) is not supported natively yet")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head channels of the frame, height and width rotations: height and width 2·(D // 6) each, frames the
        rest (128 → 44, 42, 42)."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    @property
    def token_dim(self) -> int:
        """Width of one input patch token: pt·ph·pw latent voxels of in_channels each."""
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @property
    def output_token_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return self.out_dim * pt * ph * pw


# ---- blocks -----------------------------------------------------------------------------------------------------
def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, quantize: bool = False
) -> torch.Tensor | QuantizedRows:
    """LayerNorm(x)·(1 + scale) + shift in float32, rounded to x's dtype; shift and scale [B, D] per sample, or
    [B, S, D] per token (Wan2.2 TI2V's per-token timesteps). `quantize`: its rows quantised for the FP8 linear
    that reads them, in the same pass where the kernel runs."""
    if shift.dim() == 2:
        out = layer_norm_modulate(x, shift, scale, eps, quantize)
        return out if quantize else out.to(x.dtype)
    out = (F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale) + shift).to(x.dtype)
    return quantized(out) if quantize else out


def add_then_modulate(
    x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, quantize: bool = False
) -> tuple[torch.Tensor, torch.Tensor | QuantizedRows]:
    """(x + y, `modulate` of that sum): the residual add and the next norm in one pass where the kernel runs."""
    if shift.dim() == 2:
        return residual_layer_norm_modulate(x, y, None, shift, scale, eps, quantize)
    x = x + y
    return x, modulate(x, shift, scale, eps, quantize)


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate·y in float32, rounded to x's dtype; gate [B, D] per sample or [B, S, D] per token."""
    if gate.dim() == 2:
        return gated_residual(x, gate, y).to(x.dtype)
    return (x.float() + y.float() * gate).to(x.dtype)


class WanBlock(nn.Module):
    """Self-attention over the video tokens (with RoPE), cross-attention to the text (and, for I2V, to the image
    tokens beside it), GELU(tanh) feed-forward; the first and last modulated and gated from the timestep."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.head_dim = cfg.attention_head_dim
        self.eps = cfg.eps
        # shift, scale, gate of self-attention, then of the feed-forward: added to the timestep projection
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim, dtype=torch.float32), requires_grad=False)
        # q, k, v and, for a VSA checkpoint, VSA's gate of the coarse branch (to_gate_compress: same input, one GEMM)
        self.qkv = MergedColumnParallelLinear(dim, [dim] * (4 if cfg.video_sparse_attention else 3))
        self.norm_q = HeadsRMSNorm(dim, cfg.eps)
        self.norm_k = HeadsRMSNorm(dim, cfg.eps)
        sla_dim = cfg.attention_head_dim if cfg.sparse_linear_attention else None
        self.self_attn = Attention(segments=("video",), sla_projection_dim=sla_dim)
        self.self_out = RowParallelLinear(dim, dim)
        self.norm2 = FP32LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else None
        self.cross_q = ColumnParallelLinear(dim, dim)
        self.cross_kv = MergedColumnParallelLinear(dim, [dim, dim])
        self.cross_norm_q = HeadsRMSNorm(dim, cfg.eps)
        self.cross_norm_k = HeadsRMSNorm(dim, cfg.eps)
        if cfg.added_kv_proj_dim is not None:
            self.image_kv = MergedColumnParallelLinear(cfg.added_kv_proj_dim, [dim, dim])
            self.image_norm_k = HeadsRMSNorm(dim, cfg.eps)
        else:
            self.image_kv = None
        self.cross_attn = Attention(segments=None)  # keys and values are the whole text on every rank
        self.cross_out = RowParallelLinear(dim, dim)
        self.ff_up = ColumnParallelLinear(dim, cfg.ffn_dim)
        self.ff_down = RowParallelLinear(cfg.ffn_dim, dim)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, self.head_dim))

    def self_attention(self, x: torch.Tensor | QuantizedRows, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v, *gate = (self.heads(t) for t in self.qkv.split(self.qkv(x)))
        q_in, k_in, v_in = self.self_attn.input_buffers(q, q.shape, value=v, fp8_qk=True)
        self.norm_q.norm_rope_into(q_in, q, rope)
        self.norm_k.norm_rope_into(k_in, k, rope)
        write_heads(v_in, v)
        head_dim = self.head_dim
        # The output projection taken over head groups, as they arrive (see `Attention`).
        projected = self.self_attn(
            q_in,
            k_in,
            v_in,
            project=lambda out, first_head, partial: self.self_out.add_columns(
                out.flatten(2), first_head * head_dim, partial
            ),
            gate=gate[0] if gate else None,
        )
        return self.self_out.finish(projected)

    def cross_attention(
        self, x: torch.Tensor | QuantizedRows, text: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.cross_norm_q(self.heads(self.cross_q(x)))
        k, v = (self.heads(t) for t in self.cross_kv.split(self.cross_kv(text)))
        out = self.cross_attn(q, self.cross_norm_k(k), v)
        if image is not None and self.image_kv is not None:
            k_img, v_img = (self.heads(t) for t in self.image_kv.split(self.image_kv(image)))
            out = out + self.cross_attn(q, self.image_norm_k(k_img), v_img)
        return self.cross_out(out.flatten(2))

    def modulations(self, timestep_proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mod = self.scale_shift_table.unsqueeze(0) if timestep_proj.dim() == 4 else self.scale_shift_table
        return (mod + timestep_proj.float()).unbind(-2)

    def modulated_input(self, x: torch.Tensor, timestep_proj: torch.Tensor) -> torch.Tensor:
        """The tokens as this block's self-attention reads them: normed and modulated by the timestep."""
        shift, scale = self.modulations(timestep_proj)[:2]
        return modulate(x, shift, scale, self.eps)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        timestep_proj: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, dim]; text [B, L, dim] (embedded); timestep_proj [B, 6, dim] or [B, S, 6, dim] (per token)."""
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulations(timestep_proj)
        # Each norm and the GELU write their rows quantised when the FP8 linear that reads them takes that.
        h = modulate(x, shift, scale, self.eps, self.qkv.takes_quantized_input)
        attended = self.self_attention(h, rope)
        # Each residual add that a norm follows runs in that norm's pass.
        if self.norm2 is not None and gate.dim() == 2:
            x, h = self.norm2.rounded_after_residual(x, attended, gate, self.cross_q.takes_quantized_input)
        else:
            x = gated_add(x, gate, attended)
            h = self.norm2.rounded(x, self.cross_q.takes_quantized_input) if self.norm2 is not None else x
        x, h = add_then_modulate(
            x, self.cross_attention(h, text, image), c_shift, c_scale, self.eps, self.ff_up.takes_quantized_input
        )
        ff = self.ff_down(gelu_tanh(self.ff_up(h), self.ff_down.takes_quantized_input))
        return gated_add(x, c_gate, ff)


class TextProjection(nn.Module):
    """linear → GELU(tanh) → linear: UMT5 features to the model width (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = ReplicatedLinear(in_dim, dim)
        self.linear_2 = ReplicatedLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu_tanh(self.linear_1(x)))


class ImageProjection(nn.Module):
    """I2V: CLIP image features to the model width: LayerNorm → linear → GELU → linear → LayerNorm, the norms with
    learned scale and bias in float32 and torch's default eps (diffusers' WanImageEmbedding)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim, IMAGE_NORM_EPS)
        self.linear_1 = ReplicatedLinear(in_dim, in_dim)
        self.linear_2 = ReplicatedLinear(in_dim, dim)
        self.norm2 = FP32LayerNorm(dim, IMAGE_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = self.norm1(x).to(dtype)
        h = self.linear_2(F.gelu(self.linear_1(h)))
        return self.norm2(h).to(dtype)


def video_position_ids(frames: int, height: int, width: int, device: torch.device | str) -> torch.Tensor:
    """[F·H·W, 3] (frame, row, column) of each patch token, in the order diffusers flattens them (frames slowest)."""
    grid = torch.meshgrid(
        torch.arange(frames, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        indexing="ij",
    )
    return torch.stack(grid, dim=-1).reshape(-1, 3).to(torch.int32)


class WanTransformer(nn.Module):
    """diffusers' WanTransformer3DModel on patch tokens.

    forward(video_tokens [B, N, C·pt·ph·pw], timestep [B] (diffusers' t in [0, 1000]), text_states [B, L, text_dim],
    video_ids [N, 3], token_timestep [B, N] (per-token timesteps, Wan2.2 TI2V; then `timestep` is ignored),
    image_states [B, 257, image_dim] (I2V's CLIP features)) → [B, N, pt·ph·pw·C_out].
    """

    # Layerwise offload copies this many blocks ahead: a 14B block computes for about 80 ms at 480p × 81 frames
    # and copies in about 12 ms (0.66 GiB at 55 GB/s), so one block ahead hides every copy.
    offload_prefetch_size = 1

    # Each sequence-parallel rank holds a shard of the video tokens (and of their positions and per-token
    # timesteps); the text and image tokens stay whole (cross-attention needs no exchange).
    sequence_sharding = SequenceSharding(
        inputs={
            "video_tokens": Sharded(1, "video"),
            "video_ids": Sharded(0, "video"),
            "token_timestep": Sharded(1, "video"),
        },
        output=Sharded(1, "video"),
    )

    def __init__(self, cfg: WanConfig):
        super().__init__()
        cfg.validate()
        if cfg.num_attention_heads % tp_group().size:
            raise ValueError(f"{cfg.num_attention_heads} heads cannot be split over {tp_group().size} ranks")
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = PatchEmbedding(cfg.in_channels, cfg.patch_size, dim)
        self.time_embedder = MLPEmbedder(cfg.freq_dim, dim)
        self.time_proj = ReplicatedLinear(dim, 6 * dim)
        self.text_embedder = TextProjection(cfg.text_dim, dim)
        self.image_embedder = ImageProjection(cfg.image_dim, dim) if cfg.image_dim is not None else None
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim, dtype=torch.float32), requires_grad=False)
        self.proj_out = ReplicatedLinear(dim, cfg.output_token_dim)
        self.block_loop = BlockLoop()

    @classmethod
    def from_config(cls, config: dict) -> WanTransformer:
        """From diffusers' transformer/config.json contents."""
        return cls(WanConfig.from_dict(config))

    @staticmethod
    def attention_heads(config: dict) -> int:
        """The heads that tensor and Ulysses parallelism split, from the same config."""
        return WanConfig.from_dict(config).num_attention_heads

    @staticmethod
    def sparse_attention_backends(config: dict) -> tuple[str, ...]:
        """The sparse self-attention backends this config can run: sliding tiles always, SLA and VSA when trained
        with them."""
        offered = ["sliding-tile"]
        if config.get("sparse_linear_attention"):
            offered.append("sla")
        if config.get("video_sparse_attention"):
            offered.append("vsa")
        return tuple(sorted(offered))

    @staticmethod
    def config_from_checkpoint(config: dict, names: list[str]) -> dict:
        """The config plus what only the checkpoint's tensor names tell: a VSA-trained checkpoint (FastVideo's
        FastWan folders: `blocks.N.to_gate_compress`, no config key) gets `video_sparse_attention`."""
        if any(name.endswith("to_gate_compress.weight") for name in names):
            return {**config, "video_sparse_attention": True}
        return config

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks that offload, caching and regional compile work on, in execution order."""
        return list(self.blocks)

    def rope(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return multi_axis_rope(ids, list(self.config.rope_axes), ROPE_THETA)

    def forward(
        self,
        video_tokens: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        video_ids: torch.Tensor,
        token_timestep: torch.Tensor | None = None,
        image_states: torch.Tensor | None = None,
        attention: str | None = None,
        token_grid: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """`attention`: this forward's self-attention backend (None: the engine's); `token_grid`: the (frames, rows,
        columns) grid of the video tokens, which the sparse backends need."""
        dtype = video_tokens.dtype
        b, n = video_tokens.shape[:2]
        x = self.patch_embedding(video_tokens)
        t = timestep if token_timestep is None else token_timestep.flatten()
        t_freq = sinusoidal_embedding(t, self.config.freq_dim)
        temb = self.time_embedder(t_freq.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        timestep_proj = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))  # [B or B·N, 6, dim]
        if token_timestep is not None:
            temb, timestep_proj = temb.unflatten(0, (b, n)), timestep_proj.unflatten(0, (b, n))
        text = self.text_embedder(text_states.to(dtype))
        image = None
        if image_states is not None:
            if self.image_embedder is None:
                raise ValueError("image_states given to a model without an image embedder (not an I2V model)")
            image = self.image_embedder(image_states.to(dtype))
        rope = self.rope(video_ids)
        with attention_request(self_attentions(self), attention, token_grid):
            (x,) = self.block_loop(
                (x,),
                Blocks(self.blocks, _block, text, timestep_proj, rope, image),
                signal=lambda: self.blocks[0].modulated_input(x, timestep_proj),
            )
        table = self.scale_shift_table if token_timestep is None else self.scale_shift_table.unsqueeze(0)
        shift, scale = (table + temb.unsqueeze(-2)).unbind(-2)
        return self.proj_out(modulate(x, shift, scale, self.config.eps))


# ---- the block loop's steps (see layers/blocks.py): state (video tokens,) ----------------------------------------
def _block(block: WanBlock, state: State, text: torch.Tensor, timestep_proj: torch.Tensor, rope, image) -> State:
    return (block(state[0], text, timestep_proj, rope, image),)


# ---- diffusers checkpoint names → ours ------------------------------------------------------------------------
# diffusers' suffix → (our suffix, shard index inside a fused linear or None); norm scales and tables map whole.
_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
    "scale_shift_table": ("scale_shift_table", None),
    "attn1.to_q": ("qkv", 0),
    "attn1.to_k": ("qkv", 1),
    "attn1.to_v": ("qkv", 2),
    "attn1.norm_q": ("norm_q", None),
    "attn1.norm_k": ("norm_k", None),
    "attn1.to_out.0": ("self_out", None),
    "norm2": ("norm2", None),
    "attn2.to_q": ("cross_q", None),
    "attn2.to_k": ("cross_kv", 0),
    "attn2.to_v": ("cross_kv", 1),
    "attn2.norm_q": ("cross_norm_q", None),
    "attn2.norm_k": ("cross_norm_k", None),
    "attn2.add_k_proj": ("image_kv", 0),
    "attn2.add_v_proj": ("image_kv", 1),
    "attn2.norm_added_k": ("image_norm_k", None),
    "attn2.to_out.0": ("cross_out", None),
    "ffn.net.0.proj": ("ff_up", None),
    "ffn.net.2": ("ff_down", None),
    "attn1.proj_l": ("self_attn.sla_proj", None),  # SLA's projection (not a diffusers name: diffusers has no SLA)
    # VSA's gate (FastVideo's name, which its FastWan diffusers folders keep at the block's level: diffusers has no
    # VSA), fused after to_q, to_k, to_v
    "to_gate_compress": ("qkv", 3),
}
_TOP_LEVEL_KEYS: dict[str, tuple[str, int | None]] = {
    "patch_embedding": ("patch_embedding", None),
    "condition_embedder.time_embedder.linear_1": ("time_embedder.linear_1", None),
    "condition_embedder.time_embedder.linear_2": ("time_embedder.linear_2", None),
    "condition_embedder.time_proj": ("time_proj", None),
    "condition_embedder.text_embedder.linear_1": ("text_embedder.linear_1", None),
    "condition_embedder.text_embedder.linear_2": ("text_embedder.linear_2", None),
    "condition_embedder.image_embedder.norm1": ("image_embedder.norm1", None),
    "condition_embedder.image_embedder.ff.net.0.proj": ("image_embedder.linear_1", None),
    "condition_embedder.image_embedder.ff.net.2": ("image_embedder.linear_2", None),
    "condition_embedder.image_embedder.norm2": ("image_embedder.norm2", None),
    "proj_out": ("proj_out", None),
}
_TABLE = "scale_shift_table"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_TOP_KEY = re.compile(r"^(.+)\.(weight|bias)$")


# The original Wan repository's names (Wan-AI's .pth, TurboDiffusion's checkpoints) → diffusers': the linears as the
# LoRA naming has them, plus the norms, tables and SLA's projection (TurboDiffusion's SparseLinearAttention sits
# at self_attn.attn_op.local_attn).
_ORIGINAL_BLOCK_KEYS = {
    **{f"self_attn.{o}": f"attn1.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"cross_attn.{o}": f"attn2.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",  # the cross-attention's input norm
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": _TABLE,
    "self_attn.attn_op.local_attn.proj_l": "attn1.proj_l",
}
_ORIGINAL_TOP_KEYS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": _TABLE,
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_ORIGINAL_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def original_to_diffusers_key(name: str) -> str | None:
    """An original-Wan parameter name under diffusers' name (None: not an original name). A `net.` prefix (the
    training checkpoints' model prefix) is dropped."""
    name = name.removeprefix("net.")
    if m := _ORIGINAL_BLOCK_KEY.match(name):
        index, suffix, tensor = m.groups()
        if suffix in _ORIGINAL_BLOCK_KEYS:
            return f"blocks.{index}.{_ORIGINAL_BLOCK_KEYS[suffix]}" + (f".{tensor}" if tensor else "")
        return None
    module, _, tensor = name.rpartition(".")
    if module in _ORIGINAL_TOP_KEYS and tensor in ("weight", "bias"):
        return f"{_ORIGINAL_TOP_KEYS[module]}.{tensor}"
    if name in _ORIGINAL_TOP_KEYS:  # head.modulation: a bare parameter
        return _ORIGINAL_TOP_KEYS[name]
    return None


def diffusers_to_original_key(name: str) -> str:
    """The inverse of `original_to_diffusers_key` (for writing checkpoints in the original names, e.g. tiny ones)."""
    if m := _ORIGINAL_BLOCK_KEY.match(name):
        index, suffix, tensor = m.groups()
        inverse = {v: k for k, v in _ORIGINAL_BLOCK_KEYS.items()}
        if suffix in inverse:
            return f"blocks.{index}.{inverse[suffix]}" + (f".{tensor}" if tensor else "")
    if name == _TABLE:
        return "head.modulation"
    module, _, tensor = name.rpartition(".")
    inverse_top = {v: k for k, v in _ORIGINAL_TOP_KEYS.items() if v != _TABLE}
    if module in inverse_top:
        return f"{inverse_top[module]}.{tensor}"
    raise KeyError(f"{name}: no original Wan name")


def map_diffusers_key(name: str) -> tuple[str, int | None] | None:
    """diffusers parameter name (or the original Wan repository's) → (our parameter name, shard index), or None for
    a name we do not know."""
    mapped = _map_diffusers_name(name)
    if mapped is None and (original := original_to_diffusers_key(name)) is not None:
        mapped = _map_diffusers_name(original)
    return mapped


def _map_diffusers_name(name: str) -> tuple[str, int | None] | None:
    if name == _TABLE:
        return name, None
    if m := _BLOCK_KEY.match(name):
        index, suffix, tensor = m.groups()
        if suffix not in _BLOCK_KEYS or (tensor is None) != (suffix == _TABLE):
            return None
        target, shard = _BLOCK_KEYS[suffix]
        return (f"blocks.{index}.{target}" + (f".{tensor}" if tensor else "")), shard
    if (m := _TOP_KEY.match(name)) and m.group(1) in _TOP_LEVEL_KEYS:
        target, shard = _TOP_LEVEL_KEYS[m.group(1)]
        return f"{target}.{m.group(2)}", shard
    return None


def to_diffusers_state_dict(model: WanTransformer) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (fused linears split back, the patch embedding as its Conv3d weight), for
    loading into diffusers' model. Single rank only."""
    if tp_group().size != 1:
        raise RuntimeError("to_diffusers_state_dict works on an unsharded model only")
    ours = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def emit(diffusers_name: str, our_name: str, shard: int | None) -> None:
        tensor = ours[our_name]
        if shard is not None:
            layer = modules[our_name.rsplit(".", 1)[0]]
            tensor = tensor.split(layer.local_sizes, dim=0)[shard]
        out[diffusers_name] = tensor

    emit(_TABLE, _TABLE, None)
    for prefix, (target, shard) in _TOP_LEVEL_KEYS.items():
        for t in ("weight", "bias"):
            if f"{target}.{t}" in ours:
                emit(f"{prefix}.{t}", f"{target}.{t}", shard)
    out["patch_embedding.weight"] = model.patch_embedding.conv_weight()
    for i in range(len(model.blocks)):
        for suffix, (target, shard) in _BLOCK_KEYS.items():
            if suffix == _TABLE:
                emit(f"blocks.{i}.{_TABLE}", f"blocks.{i}.{_TABLE}", None)
                continue
            if suffix in ("attn1.proj_l", "to_gate_compress"):  # SLA's and VSA's: diffusers' model has no place
                continue
            for t in ("weight", "bias"):
                if f"blocks.{i}.{target}.{t}" in ours:
                    emit(f"blocks.{i}.{suffix}.{t}", f"blocks.{i}.{target}.{t}", shard)
    return out
