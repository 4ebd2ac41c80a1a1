"""Z-Image (S3-DiT, single-stream) diffusion transformer, built from ditserve layers.

Reads top to bottom: config → blocks → model → the key map from diffusers' checkpoint names to ours.

The arithmetic follows diffusers' ZImageTransformer2DModel (0.42.1) operation for operation: the same sandwich of
RMS norms around attention and feed-forward, the same tanh gates and 1 + scale modulation, the same RoPE (angles
rounded to float32 before cos/sin, interleaved pairs), so outputs match it to float rounding. What differs is layout:
- the model takes what diffusers' `patchify_and_embed` makes: patch tokens and caption features already padded to
  multiples of 32 as rectangular [B, N, ·] and [B, L, ·] tensors, with their position ids and pad masks. The
  pipeline patchifies, groups samples whose padded caption lengths agree (so no attention mask is ever needed) and
  unpatchifies the [B, N, p²·C] result.
- q, k and v are one fused GEMM, and so are SwiGLU's w1 and w3.
- the main layers keep [image | caption] in one sequence; the final layer runs on the image part only (it is per
  token, and diffusers discards the caption part after it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels.fused_norm import layer_norm_modulate
from ditserve.layers.activation import silu_and_mul
from ditserve.layers.attention import Attention, write_heads
from ditserve.layers.blocks import BlockLoop, Blocks, Glue, State
from ditserve.layers.embeddings import MLPEmbedder, sinusoidal_embedding
from ditserve.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ditserve.layers.norm import QKNorm, RMSNorm
from ditserve.layers.rotary import multi_axis_rope
from ditserve.loader.names import BlockNames, DiffusersNames
from ditserve.parallel.sharding import SequenceSharding, Sharded
from ditserve.parallel.state import tp_group

SEQ_MULTIPLE = 32  # image and caption token counts are padded to multiples of this (diffusers' SEQ_MULTI_OF)
ADALN_MAX_DIM = 256  # the timestep embedding is min(dim, 256) wide
TIMESTEP_HIDDEN = 1024  # the timestep MLP's hidden width (fixed in the reference, whatever the model width)
QK_NORM_EPS = 1e-5  # per-head RMS norm of q and k (fixed in the reference, not norm_eps)


@dataclass
class ZImageConfig:
    """diffusers' transformer/config.json for ZImageTransformer2DModel (unknown keys are ignored)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # ignored, as diffusers ignores it: attention is multi-head with n_heads for q, k and v
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    @classmethod
    def from_dict(cls, config: dict) -> ZImageConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            if name in values:
                values[name] = tuple(values[name])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if len(self.all_patch_size) != 1 or tuple(self.all_f_patch_size) != (1,):
            raise ValueError(
                "Z-Image text-to-image has one patch size and no frame patching (all_patch_size [2], "
                f"all_f_patch_size [1]); got {list(self.all_patch_size)} and {list(self.all_f_patch_size)}"
            )
        if self.siglip_feat_dim is not None:
            raise ValueError(
                "siglip_feat_dim is set: Z-Image-Omni is not supported natively (use the diffusers backend)"
            )
        if not self.qk_norm:
            raise ValueError("qk_norm=false is not supported: every published Z-Image model norms q and k")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(
                f"axes_dims {list(self.axes_dims)} must be even and add up to the head width {self.head_dim}"
            )
        if len(self.axes_lens) != len(self.axes_dims):
            raise ValueError(f"axes_lens {list(self.axes_lens)} and axes_dims {list(self.axes_dims)} differ in length")

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def patch_key(self) -> str:
        """The name diffusers gives the embedder and final layer of this patch size ("2-1")."""
        return f"{self.all_patch_size[0]}-{self.all_f_patch_size[0]}"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def token_dim(self) -> int:
        """Width of one patch token: p² latent pixels of in_channels each."""
        return self.patch_size**2 * self.in_channels

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_MAX_DIM)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), with w1 and w3 one column-parallel GEMM and w2 row-parallel."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = MergedColumnParallelLinear(dim, [hidden, hidden], bias=False)
        self.w2 = RowParallelLinear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_and_mul(self.w13(x)))  # [gate | up], this rank's share of each


class ZImageBlock(nn.Module):
    """Self-attention and SwiGLU, each between two RMS norms; modulated blocks scale the input of each and gate
    its output with tanh gates from the timestep (the context refiner's blocks are not modulated)."""

    def __init__(self, cfg: ZImageConfig, segments: tuple[str, ...], modulated: bool):
        super().__init__()
        dim = cfg.dim
        self.head_dim = cfg.head_dim
        self.modulation = ReplicatedLinear(cfg.adaln_dim, 4 * dim) if modulated else None
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.qkv = MergedColumnParallelLinear(dim, [dim, dim, dim], bias=False)
        self.qk_norm = QKNorm(cfg.head_dim, QK_NORM_EPS)
        self.attn = Attention(segments=segments)
        self.attn_out = RowParallelLinear(dim, dim, bias=False)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ff = FeedForward(dim, cfg.ffn_dim)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)

    def attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv.split(self.qkv(x)))
        q_in, k_in, v_in = self.attn.input_buffers(q, q.shape, value=v, fp8_qk=True)
        self.qk_norm.norm_rope_into(q_in, k_in, q, k, rope)
        write_heads(v_in, v)
        head_dim = self.head_dim
        # The output projection taken over head groups, as they arrive (see `Attention`).
        projected = self.attn(
            q_in,
            k_in,
            v_in,
            project=lambda out, first_head, partial: self.attn_out.add_columns(
                out.flatten(2), first_head * head_dim, partial
            ),
        )
        return self.attn_out.finish(projected)

    def modulated_input(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        """The tokens as this (modulated) block's attention reads them: normed and scaled by the timestep."""
        scale_msa = self.modulation(adaln).chunk(4, dim=-1)[0]  # type: ignore[misc]
        return self.attention_norm1.scaled(x, scale_msa)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], adaln: torch.Tensor | None = None
    ) -> torch.Tensor:
        # norm.scaled(x, s) is norm(x) · (1 + s) and norm.residual(x, y, g) is x + g · norm(y), each one pass.
        if self.modulation is None:
            x = self.attention_norm2.residual(x, self.attend(self.attention_norm1(x), rope))
            return self.ffn_norm2.residual(x, self.ff(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(adaln).chunk(4, dim=-1)
        attn_out = self.attend(self.attention_norm1.scaled(x, scale_msa), rope)
        x = self.attention_norm2.residual(x, attn_out, gate_msa.tanh())
        ff_out = self.ff(self.ffn_norm1.scaled(x, scale_mlp))
        return self.ffn_norm2.residual(x, ff_out, gate_mlp.tanh())


class ZImageTransformer(nn.Module):
    """diffusers' ZImageTransformer2DModel on already patchified, padded, rectangular inputs.

    forward(image_tokens [B, N, p²·C], caption_feats [B, L, cap_feat_dim], timestep [B] (diffusers' t in [0, 1],
    1 = clean), image_ids [N, 3], caption_ids [L, 3], image_pad [N] bool, caption_pad [B, L] bool) → [B, N, p²·C].
    N and L are multiples of 32; pad positions are replaced by the learned pad tokens after embedding. Every sample
    of a batch has the same image size and the same padded caption length (the real caption lengths may differ:
    each sample's own pads are marked in its row of caption_pad), which is what diffusers runs without a mask.
    """

    # Each sequence-parallel rank holds a shard of the image tokens and of the caption tokens; the main layers'
    # sequence is then [its image shard | its caption shard].
    sequence_sharding = SequenceSharding(
        inputs={
            "image_tokens": Sharded(1, "image"),
            "caption_feats": Sharded(1, "text"),
            "image_ids": Sharded(0, "image"),
            "caption_ids": Sharded(0, "text"),
            "image_pad": Sharded(0, "image"),
            "caption_pad": Sharded(1, "text"),
        },
        output=Sharded(1, "image"),
    )

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        cfg.validate()
        if cfg.n_heads % tp_group().size:
            raise ValueError(f"{cfg.n_heads} heads cannot be split over {tp_group().size} ranks")
        self.config = cfg
        dim = cfg.dim
        self.x_embedder = ReplicatedLinear(cfg.token_dim, dim)
        self.x_pad_token = nn.Parameter(torch.empty(1, dim), requires_grad=False)
        self.t_embedder = MLPEmbedder(256, TIMESTEP_HIDDEN, cfg.adaln_dim)
        self.cap_norm = RMSNorm(cfg.cap_feat_dim, cfg.norm_eps)
        self.cap_embedder = ReplicatedLinear(cfg.cap_feat_dim, dim)
        self.cap_pad_token = nn.Parameter(torch.empty(1, dim), requires_grad=False)
        self.noise_refiner = nn.ModuleList(
            [ZImageBlock(cfg, ("image",), modulated=True) for _ in range(cfg.n_refiner_layers)]
        )
        self.context_refiner = nn.ModuleList(
            [ZImageBlock(cfg, ("text",), modulated=False) for _ in range(cfg.n_refiner_layers)]
        )
        self.layers = nn.ModuleList([ZImageBlock(cfg, ("image", "text"), modulated=True) for _ in range(cfg.n_layers)])
        self.final_modulation = ReplicatedLinear(cfg.adaln_dim, dim)
        self.final_linear = ReplicatedLinear(dim, cfg.token_dim)
        self.block_loop = BlockLoop()

    @classmethod
    def from_config(cls, config: dict) -> ZImageTransformer:
        """From diffusers' transformer/config.json contents."""
        return cls(ZImageConfig.from_dict(config))

    @staticmethod
    def attention_heads(config: dict) -> int:
        """The heads that tensor and Ulysses parallelism split, from the same config."""
        return ZImageConfig.from_dict(config).n_heads

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks that offload, caching and regional compile work on, in execution order."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]

    def rope(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return multi_axis_rope(ids, list(self.config.axes_dims), self.config.rope_theta, float32_angles=True)

    def forward(
        self,
        image_tokens: torch.Tensor,
        caption_feats: torch.Tensor,
        timestep: torch.Tensor,
        image_ids: torch.Tensor,
        caption_ids: torch.Tensor,
        image_pad: torch.Tensor,
        caption_pad: torch.Tensor,
    ) -> torch.Tensor:
        dtype = image_tokens.dtype
        t_freq = sinusoidal_embedding(timestep * self.config.t_scale)
        adaln = self.t_embedder(t_freq.to(self.t_embedder.linear_1.weight.dtype)).to(dtype)

        img = torch.where(image_pad[None, :, None], self.x_pad_token, self.x_embedder(image_tokens))
        cap = self.cap_embedder(self.cap_norm(caption_feats))
        cap = torch.where(caption_pad[:, :, None], self.cap_pad_token, cap)
        img_rope, cap_rope = self.rope(image_ids), self.rope(caption_ids)

        img_len = img.shape[1]
        rope = (torch.cat([img_rope[0], cap_rope[0]]), torch.cat([img_rope[1], cap_rope[1]]))
        (x,) = self.block_loop(
            (img, cap),
            Blocks(self.noise_refiner, _image_refiner_block, img_rope, adaln),
            Blocks(self.context_refiner, _caption_refiner_block, cap_rope),
            Glue(_join_streams),
            Blocks(self.layers, _joint_block, rope, adaln),
            signal=lambda: self.noise_refiner[0].modulated_input(img, adaln),
        )
        img = x[:, :img_len]
        scale = self.final_modulation(F.silu(adaln))
        return self.final_linear(layer_norm_modulate(img, torch.zeros_like(scale), scale))


# ---- the block loop's steps (see layers/blocks.py): state (img, cap), then ([img | cap],) ------------------------
def _image_refiner_block(block: ZImageBlock, state: State, rope, adaln: torch.Tensor) -> State:
    return (block(state[0], rope, adaln), state[1])


def _caption_refiner_block(block: ZImageBlock, state: State, rope) -> State:
    return (state[0], block(state[1], rope))


def _join_streams(state: State) -> State:
    return (torch.cat(state, dim=1),)


def _joint_block(block: ZImageBlock, state: State, rope, adaln: torch.Tensor) -> State:
    return (block(state[0], rope, adaln),)


# ---- diffusers checkpoint names → ours ------------------------------------------------------------------------
# diffusers' suffix → (our suffix, shard index inside a fused linear or None). Parameters outside linears
# (norm scales, pad tokens) map whole, like any other.
_BLOCK_KEYS: dict[str, tuple[str, int | None]] = {
    "adaLN_modulation.0": ("modulation", None),
    "attention_norm1": ("attention_norm1", None),
    "attention.to_q": ("qkv", 0),
    "attention.to_k": ("qkv", 1),
    "attention.to_v": ("qkv", 2),
    "attention.norm_q": ("qk_norm.norm_q", None),
    "attention.norm_k": ("qk_norm.norm_k", None),
    "attention.to_out.0": ("attn_out", None),
    "attention_norm2": ("attention_norm2", None),
    "ffn_norm1": ("ffn_norm1", None),
    "feed_forward.w1": ("ff.w13", 0),
    "feed_forward.w3": ("ff.w13", 1),
    "feed_forward.w2": ("ff.w2", None),
    "ffn_norm2": ("ffn_norm2", None),
}
_TOP_LEVEL_KEYS: dict[str, tuple[str, int | None]] = {
    "t_embedder.mlp.0": ("t_embedder.linear_1", None),
    "t_embedder.mlp.2": ("t_embedder.linear_2", None),
    "cap_embedder.0": ("cap_norm", None),
    "cap_embedder.1": ("cap_embedder", None),
}
# Under all_x_embedder.<p>-<f>. and all_final_layer.<p>-<f>. (one patch size: see ZImageConfig.validate).
_PATCH_KEYS: dict[str, tuple[str, int | None]] = {
    "all_x_embedder": ("x_embedder", None),
    "all_final_layer.linear": ("final_linear", None),
    "all_final_layer.adaLN_modulation.1": ("final_modulation", None),
}
_PAD_TOKENS = ("x_pad_token", "cap_pad_token")
_NAMES = DiffusersNames(
    blocks=tuple(BlockNames(kind, kind, _BLOCK_KEYS) for kind in ("noise_refiner", "context_refiner", "layers")),
    top=_TOP_LEVEL_KEYS,
    whole={name: name for name in _PAD_TOKENS},
)
_PATCH_TAG = re.compile(r"^(all_x_embedder|all_final_layer)\.\d+-\d+\.")  # the "<p>-<f>." after the module


def map_diffusers_key(name: str) -> tuple[str, int | None] | None:
    """diffusers parameter name → (our parameter name, shard index), or None for a name we do not know."""
    if m := _PATCH_TAG.match(name):
        prefix, _, tensor = f"{m.group(1)}.{name[m.end() :]}".rpartition(".")
        if prefix in _PATCH_KEYS and tensor in ("weight", "bias"):
            target, shard = _PATCH_KEYS[prefix]
            return f"{target}.{tensor}", shard
        return None
    return _NAMES.map(name)


def to_diffusers_state_dict(model: ZImageTransformer) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (fused linears split back), for loading into diffusers' model: to run
    diffusers on exactly our weights in benchmarks and parity checks. Single rank only."""
    patch = model.config.patch_key
    top = {**_TOP_LEVEL_KEYS}
    for key, value in _PATCH_KEYS.items():
        kind, _, rest = key.partition(".")
        top[f"{kind}.{patch}.{rest}" if rest else f"{kind}.{patch}"] = value
    return _NAMES.state_dict(model, top)
