"""Qwen-Image diffusion transformer (MMDiT, 60 double-stream blocks), built from ditserve layers.

Reads top to bottom: config → blocks → model → the key map from diffusers' checkpoint names to ours.

The arithmetic follows diffusers' QwenImageTransformer2DModel (0.42.1) operation for operation: RMS-normed text
features, LayerNorm-modulated streams with shift/scale/gate from a SiLU'd timestep embedding, per-head RMS norm of
q and k, complex RoPE on interleaved pairs over three axes (frame, row, column; rows and columns centred on the
image, text positions on the diagonal after the largest image extent), joint attention over [text | image], and the
same order of residual adds. What differs is layout:
- q, k and v of each stream are one fused GEMM.
- position ids come from the pipeline (`txt_ids`, `img_ids` [S, 3] integers); the model builds the RoPE tables
  from them, in float32 as diffusers' `QwenEmbedRope` does.
- the text may be padded: `text_mask` [B, L] (True = a real token) reaches attention as a key mask over the joint
  sequence, through the attention seam, so sequence parallelism carries it too. Padded text tokens never change an
  image token (their keys are masked; their own rows are discarded).
- Edit-2511 (`zero_cond_t`): the reference image tokens are modulated by the embedding of t = 0 and the noisy ones
  by that of t; `reference_tokens` [N] marks the former.
- Layered (`use_layer3d_rope`, `use_additional_t_cond`): its 3-D RoPE is in the ids the pipeline gives (layer i on
  frame i, the input image on frame −1); `additional_t_cond` [B] (0 or 1) adds a learned embedding to the
  timestep's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fp8_quant import QuantizedRows, quantized
from ditserve.kernels.fused_residual import gated_residual
from ditserve.layers.activation import gelu_tanh
from ditserve.layers.attention import Attention, write_heads
from ditserve.layers.embeddings import MLPEmbedder
from ditserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ditserve.layers.modulation import Modulation
from ditserve.layers.norm import QKNorm, RMSNorm, layer_norm_modulate
from ditserve.loader.names import BlockNames, DiffusersNames
from ditserve.parallel.sharding import SequenceSharding, Sharded
from ditserve.parallel.state import tp_group

NORM_EPS = 1e-6  # every norm of the model (diffusers' defaults for this class)
ROPE_THETA = 10000.0
TIMESTEP_CHANNELS = 256


@dataclass
class QwenImageConfig:
    """diffusers' transformer/config.json for QwenImageTransformer2DModel (unknown keys are ignored)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> QwenImageConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=true: no published Qwen-Image model is guidance-distilled")
        if self.use_additional_t_cond != self.use_layer3d_rope:
            raise ValueError("use_additional_t_cond and use_layer3d_rope go together (Qwen-Image-Layered)")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must be even and add up to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        if self.in_channels % (self.patch_size**2):
            raise ValueError(f"in_channels {self.in_channels} is not patch_size² × latent channels")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_dim(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)


# ---- position and time embeddings ---------------------------------------------------------------------------------
def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, head_dim] (float32, each frequency repeated for its pair) for integer positions ids [S, 3].

    As diffusers' QwenEmbedRope: inverse frequencies and angles in float32 (position × frequency rounded once)."""
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, device=ids.device).to(torch.float32).div(dim))
        angles = ids[:, axis].to(torch.float32)[:, None] * inv_freq[None, :]
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def timestep_embedding(t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps in [0, 1] → [N, 256] float32, cosines first: diffusers' Timesteps(256, flip_sin_to_cos=True,
    downscale_freq_shift=0, scale=1000), which scales the angles (not the timesteps) by 1000."""
    half = TIMESTEP_CHANNELS // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000 * (t[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ---- blocks -------------------------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """fc1 → GELU(tanh) → fc2 (diffusers' FeedForward with gelu-approximate), fc1 column- and fc2 row-parallel."""

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
        self.norm = QKNorm(head_dim, NORM_EPS)
        self.proj = RowParallelLinear(dim, dim)

    def qkv_heads(self, x: torch.Tensor | QuantizedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, S, H, D] views of one fused projection (q and k not yet normed)."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv.split(self.qkv(x)))
        return q, k, v


class ImageModulation:
    """The image stream's shift, scale and gate for each token: one [B, D] each, or with `zero_cond_t`, per token
    [B, N, D] (reference tokens take the t = 0 half of the doubled batch of modulation vectors)."""

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor, reference: torch.Tensor | None):
        if reference is None:
            self.shift, self.scale, self.gate, self.per_token = shift, scale, gate, False
        else:
            mask = reference[None, :, None]

            def pick(values: torch.Tensor) -> torch.Tensor:
                noisy, clean = values.chunk(2, dim=0)
                return torch.where(mask, clean[:, None], noisy[:, None])

            self.shift, self.scale, self.gate, self.per_token = pick(shift), pick(scale), pick(gate), True

    def modulate(self, x: torch.Tensor, quantize: bool = False) -> torch.Tensor | QuantizedRows:
        """LayerNorm(x)·(1 + scale) + shift; `quantize`: its rows quantised for the FP8 linear that reads them."""
        if not self.per_token:
            return layer_norm_modulate(x, self.shift, self.scale, NORM_EPS, quantize)
        out = F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS) * (1 + self.scale) + self.shift
        return quantized(out.to(x.dtype)) if quantize else out

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.gate * y if self.per_token else gated_residual(x, self.gate, y)


class QwenImageBlock(nn.Module):
    """Text and image tokens keep their own weights and attend jointly over [text | image]."""

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.img_mod = Modulation(dim, 6)
        self.txt_mod = Modulation(dim, 6)
        self.img_attn = StreamAttention(dim, cfg.attention_head_dim)
        self.txt_attn = StreamAttention(dim, cfg.attention_head_dim)
        self.attn = Attention(segments=("text", "image"))
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None = None,
        reference_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_params = self.img_mod(temb)
        # With zero_cond_t temb is [t | 0] (2B rows); the text stream takes the first half.
        txt_temb = temb if reference_tokens is None else temb.chunk(2, dim=0)[0]
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(txt_temb)
        img_mod1 = ImageModulation(*img_params[:3], reference_tokens)
        img_mod2 = ImageModulation(*img_params[3:], reference_tokens)

        # The norms (and the MLPs' GELU) write their rows quantised when the FP8 linear that reads them takes that.
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(img, self.img_attn.qkv.takes_quantized_input))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            layer_norm_modulate(txt, txt_shift1, txt_scale1, NORM_EPS, self.txt_attn.qkv.takes_quantized_input)
        )
        # The joint sequence is [text, image], the order of the RoPE tables; norm and RoPE write straight into it.
        txt_len, img_len = txt.shape[1], img.shape[1]
        joint_shape = (img.shape[0], txt_len + img_len, *img_q.shape[2:])
        # q and k in e4m3 from the norms only where cudnn-fp8 then runs (a masked text batch runs SDPA in bf16)
        q, k, v = self.attn.input_buffers(img_q, joint_shape, fp8_qk=key_mask is None)
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

        txt_sum, img_sum = self.attn(q, k, v, project=project, key_mask=key_mask)
        txt_attn_out = self.txt_attn.proj.finish(txt_sum)
        img_attn_out = self.img_attn.proj.finish(img_sum)

        img = img_mod1.residual(img, img_attn_out)
        img = img_mod2.residual(img, self.img_mlp(img_mod2.modulate(img, self.img_mlp.fc1.takes_quantized_input)))
        txt = gated_residual(txt, txt_gate1, txt_attn_out)
        txt_mlp_in = layer_norm_modulate(txt, txt_shift2, txt_scale2, NORM_EPS, self.txt_mlp.fc1.takes_quantized_input)
        txt = gated_residual(txt, txt_gate2, self.txt_mlp(txt_mlp_in))
        if txt.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            txt = txt.clip(-65504, 65504)
            img = img.clip(-65504, 65504)
        return img, txt


class QwenImageTransformer(nn.Module):
    """diffusers' QwenImageTransformer2DModel on packed latents with position ids in place of `img_shapes`.

    forward(hidden_states [B, N, in_channels], encoder_hidden_states [B, L, joint_attention_dim], timestep [B]
    (diffusers' t / 1000), img_ids [N, 3], txt_ids [L, 3], text_mask [B, L] bool or None (all real),
    reference_tokens [N] bool (zero_cond_t models only), additional_t_cond [B] int (use_additional_t_cond models
    only)) → [B, N, patch² · out_channels].
    """

    # Text and image tokens split over sequence-parallel ranks each on its own; the joint sequence is
    # [text | image]; the text mask travels with the text, and reaches every attention as a key mask.
    sequence_sharding = SequenceSharding(
        inputs={
            "hidden_states": Sharded(1, "image"),
            "encoder_hidden_states": Sharded(1, "text"),
            "img_ids": Sharded(0, "image"),
            "txt_ids": Sharded(0, "text"),
            "text_mask": Sharded(1, "text"),
            "reference_tokens": Sharded(0, "image"),
        },
        output=Sharded(1, "image"),
        key_masks={"text": "text_mask"},
    )

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        cfg.validate()
        if cfg.num_attention_heads % tp_group().size:
            raise ValueError(f"{cfg.num_attention_heads} heads cannot be split over {tp_group().size} ranks")
        self.config = cfg
        dim = cfg.inner_dim
        self.img_in = ReplicatedLinear(cfg.in_channels, dim)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, NORM_EPS)
        self.txt_in = ReplicatedLinear(cfg.joint_attention_dim, dim)
        self.time_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        # Qwen-Image-Layered: an embedding of `additional_t_cond` (0 or 1) added to the timestep's.
        self.addition_t_embedding = (
            nn.Parameter(torch.empty(2, dim), requires_grad=False) if cfg.use_additional_t_cond else None
        )
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = Modulation(dim, 2)
        self.proj_out = ReplicatedLinear(dim, cfg.output_dim)

    @classmethod
    def from_config(cls, config: dict) -> QwenImageTransformer:
        """From diffusers' transformer/config.json contents."""
        return cls(QwenImageConfig.from_dict(config))

    @staticmethod
    def attention_heads(config: dict) -> int:
        """The heads that tensor and Ulysses parallelism split, from the same config."""
        return QwenImageConfig.from_dict(config).num_attention_heads

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks that offload, caching and regional compile work on, in execution order."""
        return list(self.transformer_blocks)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        reference_tokens: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.config.zero_cond_t != (reference_tokens is not None):
            raise ValueError("reference_tokens are given exactly for zero_cond_t models (Qwen-Image-Edit-2511)")
        if self.config.use_additional_t_cond != (additional_t_cond is not None):
            raise ValueError("additional_t_cond is given exactly for use_additional_t_cond models (Qwen-Image-Layered)")
        if (len(txt_ids), len(img_ids)) != (encoder_hidden_states.shape[1], hidden_states.shape[1]):
            raise ValueError("txt_ids and img_ids must have one row per text and image token")
        img = self.img_in(hidden_states)
        dtype = img.dtype
        t = timestep.to(dtype)
        if reference_tokens is not None:
            t = torch.cat([t, t * 0])
        temb = self.time_embedder(timestep_embedding(t).to(dtype))
        if self.addition_t_embedding is not None:
            temb = temb + self.addition_t_embedding[additional_t_cond].to(dtype)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        rope = rope_tables(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope)
        key_mask = None
        if text_mask is not None:
            image_keys = text_mask.new_ones((text_mask.shape[0], img.shape[1]), dtype=torch.bool)
            key_mask = torch.cat([text_mask.bool(), image_keys], dim=1)

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope, key_mask, reference_tokens)

        if reference_tokens is not None:
            temb = temb.chunk(2, dim=0)[0]
        scale, shift = self.norm_out(temb)  # diffusers' AdaLayerNormContinuous: scale first
        return self.proj_out(layer_norm_modulate(img, shift, scale, NORM_EPS))


# ---- diffusers checkpoint names → ours ------------------------------------------------------------------------
# diffusers' suffix → (our suffix, shard index inside a fused linear or None).
_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
    "img_mod.1": ("img_mod.linear", None),
    "txt_mod.1": ("txt_mod.linear", None),
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
    "img_mlp.net.0.proj": ("img_mlp.fc1", None),
    "img_mlp.net.2": ("img_mlp.fc2", None),
    "txt_mlp.net.0.proj": ("txt_mlp.fc1", None),
    "txt_mlp.net.2": ("txt_mlp.fc2", None),
}
_TOP_LEVEL_KEYS: dict[str, tuple[str, int | None]] = {
    "img_in": ("img_in", None),
    "txt_norm": ("txt_norm", None),
    "txt_in": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_embedder.linear_1", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_embedder.linear_2", None),
    "norm_out.linear": ("norm_out.linear", None),
    "proj_out": ("proj_out", None),
}
_EMBEDDINGS = {"time_text_embed.addition_t_embedding.weight": "addition_t_embedding"}
_NAMES = DiffusersNames(
    blocks=(BlockNames("transformer_blocks", "transformer_blocks", _BLOCK_KEYS),),
    top=_TOP_LEVEL_KEYS,
    whole=_EMBEDDINGS,
)


def map_diffusers_key(name: str) -> tuple[str, int | None] | None:
    """diffusers parameter name → (our parameter name, shard index), or None for a name we do not know."""
    return _NAMES.map(name)


def to_diffusers_state_dict(model: QwenImageTransformer) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (fused linears split back), for loading into diffusers' model: to run
    diffusers on exactly our weights in benchmarks and parity checks. Single rank only."""
    return _NAMES.state_dict(model)
