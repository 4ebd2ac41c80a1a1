"""Attention: the one place models reach scaled-dot-product attention.

`attention(q, k, v, backend)` takes and returns [batch, seq, heads, head_dim]. Models hold an `Attention` module,
so the engine can choose the backend per model, and sequence parallelism (Ulysses all-to-all, Ring K/V passing)
can wrap the module without touching model code.

Backends are PyTorch's attention kernels chosen explicitly. On Hopper the cuDNN kernel runs about twice as fast
as the flash kernel at DiT shapes (0.40 vs 0.80 ms at FLUX 1024² on H200). torch 2.11's SDPA picks cuDNN there by
default, but that default has moved between torch releases and any `sdpa_kernel(..., set_priority=True)` elsewhere
in the process changes it (seen here: diffusers fell back to flash after one). So `auto` resolves, per device, to
`cudnn` on CUDA and `sdpa` elsewhere (`resolve_attention_backend`), and `cudnn` calls the cuDNN op directly, which
torch.compile also keeps, falling back to SDPA for inputs cuDNN cannot take.

`sage` (optional: the `sageattention` package) quantises q·kᵀ to INT8 (layers/sage_attention.py); it too falls back
to SDPA for inputs it cannot take, and is refused by name when the package does not import.

`fp8` runs both products of flash attention in float8 e4m3 on FP8 tensor cores (kernels/fp8_attention.py: our Triton
kernels); the engine refuses it on GPUs without them, the CPU runs its torch reference (the same rounding of q, k
and v, float32 attention), and masked attentions (a padded text batch) run the device's default kernel.
`cudnn-fp8` (optional: the `nvidia-cudnn-frontend` package) is the same idea through cuDNN's fused FP8 kernel, with
one scale per tensor (kernels/cudnn_fp8_attention.py); it runs its reference on the CPU, masks as `fp8` does, and is
refused by name when the package does not import.

Sparse backends (`sliding-tile`, `sla`, `vsa`: layers/sparse_attention.py) apply to self-attentions over one
video's token grid. A model that offers them says which (`sparse_attention_backends` on its class) and, on each
forward, hands its self-attentions the request's backend and the token grid (`attention_request`); an `Attention`
given SLA's learned projection (`sla_projection_dim`) holds it as `sla_proj`; VSA's learned gate is computed by the
model (beside q, k, v) and handed to the call (`gate`). Cross-attentions stay dense.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditserve.kernels.cudnn_fp8_attention import (
    FP8Heads,
    cudnn_fp8_attention,
    cudnn_fp8_takes_heads,
    cudnn_frontend_available,
    load_cudnn_frontend,
)
from ditserve.kernels.fp8_attention import fp8_attention
from ditserve.kernels.row_copy import copy_rows
from ditserve.layers.linear import ReplicatedLinear
from ditserve.layers.sage_attention import load_sageattn, sage_attention, sage_can_take
from ditserve.layers.sparse_attention import (
    SLA,
    VSA,
    parse_sparse_backend,
    sla_attention,
    sliding_tile_attention,
    vsa_attention,
)

_SDPA_BACKENDS: dict[str, list[SDPBackend]] = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain softmax(q kᵀ / √d) v in float32, [B, S, H, D]; what every backend is tested against. `key_mask`
    [B, S_k] (True = attend) leaves out the keys it marks False."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights @ vf).transpose(1, 2).to(q.dtype)


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "cudnn" if device.type == "cuda" else "sdpa"


def _cudnn_can_take(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-causal attention; q, k, v and the result are [B, S, H, D]. `key_mask` [B, S_k] bool (True = attend; None:
    every key) leaves out padded keys (a padded text of a batch); every query must keep at least one key."""
    if isinstance(q, FP8Heads) and (backend != "cudnn-fp8" or key_mask is not None):
        q, k = q.dequantize(v.dtype), k.dequantize(v.dtype)  # handed out for cudnn-fp8 (`input_buffers`)
    if backend == "reference":
        return attention_reference(q, k, v, key_mask)
    if backend == "sage":
        load_sageattn()  # refused by name without the package, wherever these inputs would run
        if key_mask is None and sage_can_take(q, k, v):
            return sage_attention(q, k, v)
    if backend in ("fp8", "cudnn-fp8"):
        if key_mask is None:
            return fp8_attention(q, k, v) if backend == "fp8" else cudnn_fp8_attention(q, k, v)
        backend = resolve_attention_backend("auto", q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_mask is not None:
        # A kernel that takes a mask: SDPA picks one unless efficient or math is asked for (flash takes none, and
        # cuDNN's op as called below would need a float bias).
        kernels = _SDPA_BACKENDS.get(backend) if backend in ("efficient", "math") else None
        with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=key_mask[:, None, None, :])
    elif backend == "cudnn" and _cudnn_can_take(q):
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, False)[0]
    elif backend in _SDPA_BACKENDS and backend != "cudnn":
        with sdpa_kernel(_SDPA_BACKENDS[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    else:  # "sdpa", "auto" not yet resolved, or cuDNN unable to take these inputs
        out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)


def write_heads(dst: torch.Tensor, src: torch.Tensor, seq_offset: int = 0) -> torch.Tensor:
    """dst[:, seq_offset : seq_offset + S] = src [B, S, H, D], for a dst from `Attention.input_buffers` (its heads
    possibly in groups). Nothing to do when dst is src."""
    if dst is src:
        return dst
    target = dst[:, seq_offset : seq_offset + src.shape[1]]
    return copy_rows(target, src.view(*src.shape[:2], *target.shape[2:]))


def run_alongside(attend, alongside, project=None):
    """How an attention with nothing to wait on takes the work handed to it (see `Attention`): alongside() first,
    then attend(), then the whole output projected at once."""
    side = alongside() if alongside is not None else None
    out = attend()
    if project is not None:
        return project(out, 0, side)
    return out if alongside is None else (out, side)


class Attention(nn.Module):
    """Holds the backend choice; sequence-parallel wrappers replace these modules.

    Two kinds of work can be handed to the call, so that an attention that communicates can run them while its
    messages travel (here they simply run in order):
    - `alongside`: work that does not depend on this attention (a model's other branch). The call then returns
      (attention output, alongside()).
    - `project(out, first_head, partial)`: the output projection, taken over head groups. It adds the product of
      `out` ([B, S, h, D]: heads first_head … first_head + h − 1 of the output) to `partial` (None: it starts the
      sum) and returns the new sum. The call then returns that sum over all heads instead of the output, starting
      from alongside()'s result when both are given (alongside computes the projection's other input part).
      Here it is called once, on the whole output; a sequence-parallel attention projects the heads it holds while
      the others are still on their way.

    `segments` names the token segments (see parallel/sharding.py) the sequence of q, k and v consists of, in order:
    sequence parallelism splits each of them and wraps this module; None marks a cross-attention, whose keys and
    values are not split and which runs unwrapped on each rank's queries.

    `key_mask` [B, S] bool (True = attend) marks the keys of the model's joint sequence that count (the real tokens
    of a padded text); under sequence parallelism the wrapper takes the whole sequence's mask from the inputs the
    model declares in `SequenceSharding.key_masks`."""

    def __init__(self, segments: tuple[str, ...] | None, backend: str = "sdpa", sla_projection_dim: int | None = None):
        super().__init__()
        self.segments = segments
        self.backend = backend
        # Set by `attention_request` for one forward: the request's backend (None: `backend`) and the (frames, rows,
        # columns) token grid the sequence is (for the sparse backends).
        self.request_backend: str | None = None
        self.token_grid: tuple[int, int, int] | None = None
        # SLA's learned projection of the linear branch (head_dim → head_dim, shared by the heads), when the
        # checkpoint was fine-tuned with SLA.
        self.sla_proj = ReplicatedLinear(sla_projection_dim, sla_projection_dim) if sla_projection_dim else None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alongside=None, project=None, key_mask=None, gate=None
    ):
        """`gate` [B, S, H, D]: VSA's learned gate of the coarse branch (read by the vsa backend only)."""
        return run_alongside(lambda: self.attend(q, k, v, key_mask, gate), alongside, project)

    @property
    def effective_backend(self) -> str:
        return self.request_backend or self.backend

    @property
    def is_sparse(self) -> bool:
        """Whether this forward's backend is a sparse pattern over the token grid (its queries must then be exactly
        the grid's tokens: sequence parallelism hands it no padded rows)."""
        return parse_sparse_backend(self.effective_backend) is not None

    @property
    def reads_gate(self) -> bool:
        """Whether this forward's backend reads a gate (VSA)."""
        return isinstance(parse_sparse_backend(self.effective_backend), VSA)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask=None, gate=None) -> torch.Tensor:
        """Attention over the whole sequence with this forward's backend (`key_mask`: keys that count, dense only)."""
        backend = self.effective_backend
        pattern = parse_sparse_backend(backend)
        if pattern is None:
            return attention(q, k, v, resolve_attention_backend(backend, v.device), key_mask)
        if key_mask is not None:
            raise ValueError(f"the {backend} attention backend takes no key mask (masked text is dense attention)")
        if isinstance(pattern, SLA):
            if self.sla_proj is None:
                raise ValueError("the sla attention backend needs a model fine-tuned with SLA (its proj_l weights)")
            return sla_attention(q, k, v, pattern, self.sla_proj)
        if self.token_grid is None:
            raise ValueError(f"the {backend} attention backend needs the token grid of a video model's self-attention")
        if isinstance(pattern, VSA):
            if gate is None:
                raise ValueError("the vsa attention backend needs a model trained with VSA (its to_gate_compress)")
            return vsa_attention(q, k, v, gate, self.token_grid, pattern)
        return sliding_tile_attention(q, k, v, self.token_grid, pattern)

    def input_buffers(
        self, like: torch.Tensor, shape: tuple[int, ...], value: torch.Tensor | None = None, fp8_qk: bool = False
    ) -> tuple[torch.Tensor | FP8Heads, torch.Tensor | FP8Heads, torch.Tensor]:
        """Where a model writes this attention's q, k and v of `shape` [B, S, H, D] (with `rms_norm_rope_into` and
        `write_heads`) before calling it with them. Here: new tensors, and `value` itself for v when the model
        has v whole already. A sequence-parallel attention hands out views of its outgoing message instead, so
        nothing is copied into the message afterwards; its views may hold the heads as groups
        ([B, S, *groups, h, D]), which is why models write through those two functions.

        `fp8_qk`: the model writes q and k through norm kernels that can write e4m3 (their output is bounded by
        their weights, kernels/fused_norm.py); with `cudnn-fp8` running on these inputs, q and k are then handed
        out as `FP8Heads`, and cuDNN's kernel takes them without a pass of its own over them."""
        if (
            fp8_qk
            and self.effective_backend == "cudnn-fp8"
            and cudnn_fp8_takes_heads(like, shape[-1])
            and cudnn_frontend_available()
        ):
            q, k = FP8Heads.empty(shape, like.device)
            return q, k, value if value is not None else like.new_empty(shape)
        q, k = like.new_empty(shape), like.new_empty(shape)
        return q, k, value if value is not None else like.new_empty(shape)

    def extra_repr(self) -> str:
        return f"segments={self.segments}, backend={self.backend}"


def self_attentions(model: nn.Module) -> list[Attention]:
    """The model's `Attention` modules over its own tokens (segments set), wrapped by sequence parallelism or not."""
    return [m for m in model.modules() if isinstance(m, Attention) and m.segments is not None]


@contextlib.contextmanager
def attention_request(
    modules: list[Attention], backend: str | None, token_grid: tuple[int, int, int] | None
) -> Iterator[None]:
    """For one forward: `modules` run with `backend` (None: their own) and know their sequence is `token_grid`."""
    for module in modules:
        module.request_backend, module.token_grid = backend, token_grid
    try:
        yield
    finally:
        for module in modules:
            module.request_backend, module.token_grid = None, None


def set_attention_backend(model: nn.Module, backend: str, device: torch.device) -> None:
    """Every attention of `model` on `backend`; a sparse one goes to the self-attentions only (the model must offer
    it: see `sparse_attention_backends`), the cross-attentions taking the device's dense default."""
    sparse = parse_sparse_backend(backend) is not None
    dense = resolve_attention_backend("auto" if sparse else backend, device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend if sparse and module.segments is not None else dense


def sparse_attention_backends(model_cls, config: dict) -> tuple[str, ...]:
    """The sparse backends (their names before any ':') a DiT class offers for this config: its
    `sparse_attention_backends(config)`, none if it has no such method."""
    offered = getattr(model_cls, "sparse_attention_backends", None)
    return tuple(offered(config)) if offered is not None else ()


def needs_fp8_tensor_cores(backend: str | None) -> bool:
    """Whether an attention backend runs its products in FP8 (`fp8`, `cudnn-fp8`, `sla-fp8`): GPUs without FP8
    tensor cores refuse it."""
    return backend is not None and backend.partition(":")[0] in ("fp8", "cudnn-fp8", "sla-fp8")


def check_attention_backend(backend: str | None, offered: tuple[str, ...], model_name: str) -> None:
    """Refuse (ValueError) a sparse backend that the model does not offer, and `sage` or `cudnn-fp8` without its
    package."""
    if backend == "sage":
        load_sageattn()
    if backend == "cudnn-fp8":
        load_cudnn_frontend()
    if backend is None or parse_sparse_backend(backend) is None:
        return
    kind = backend.partition(":")[0].removesuffix("-fp8")  # sla-fp8: a model that offers sla
    if kind not in offered:
        why = {
            "sla": "it needs a checkpoint fine-tuned with SLA, whose proj_l weights it reads",
            "sliding-tile": "it needs a video model whose self-attention runs over one token grid",
            "vsa": "it needs a checkpoint trained with VSA, whose to_gate_compress weights it reads",
        }.get(kind, "")
        offers = ", ".join(offered) or "none"
        raise ValueError(f"{model_name} cannot run {kind} attention ({why}); its sparse backends: {offers}")
