"""SageAttention (`--attention-backend sage`): the `sageattention` package's Triton kernels, q·kᵀ in INT8 with one
scale per block of tokens and P·V in fp16. The package is optional (version 1.0.6, pure Triton): without it,
choosing `sage` is refused with the command that installs it.

How its kernel is called here, and why:
- Layout: our [B, S, H, D] is its "NHD"; its kernels take any strides whose last one is 1, so q, k and v go in as
  they are (views of a fused projection included) and the output comes back [B, S, H, D].
- Keys are smoothed here (k − mean over the sequence, which leaves every softmax row unchanged and keeps INT8's
  range on what differs between keys), out of place: the package's own `smooth_k` subtracts from the caller's k.
- Head dims: its kernels take 64, 96 and 128. A smaller head is zero-padded to the next of them (q·kᵀ and the
  per-block scales are unchanged by zero channels), and the output cut back.
- Key counts that are not a multiple of its key block (64): 1.0.6's non-causal kernel leaves the block's missing
  keys out of the numerator but not the softmax's denominator, where each adds exp(0) (score 0, value 0). With
  smoothed keys the row's true denominator is at least the key count (the mean score is 0; Jensen), so the output
  is shrunk by at most missing / keys. Where that is below half a bf16 step (2⁻⁹: Wan 480p×81's 32,760 keys miss
  56) it is left; otherwise, if the kernel's head has a spare channel, v carries ones there, which come out as
  (true denominator / the kernel's) for each row, and the output is divided by them: exact. Attentions that fit
  neither (head 128, few keys off a block) and inputs it cannot take (not CUDA, not bf16/fp16, heads over 128) run
  on the default attention instead (`sage_can_take`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SAGE_REQUIREMENT = "sageattention==1.0.6"
KERNEL_HEAD_DIMS = (64, 96, 128)
KEY_BLOCK = 64  # keys per block of the kernel's inner loop (its BLOCK_N) and of its key scales
MAX_DENOMINATOR_ERROR = 2**-9  # half a bf16 step: the shrink left uncorrected


class SageUnavailable(ValueError):
    """The `sageattention` package does not import."""


def load_sageattn():
    """The package's `sageattn` function; SageUnavailable saying how to install it when it does not import."""
    try:
        from sageattention import sageattn
    except ImportError as e:
        raise SageUnavailable(
            f"the sage attention backend needs the sageattention package ({e}): "
            f"pip install {SAGE_REQUIREMENT}, or choose another --attention-backend"
        ) from None
    return sageattn


def sage_available() -> bool:
    try:
        load_sageattn()
    except SageUnavailable:
        return False
    return True


def kernel_plan(head_dim: int, kv_len: int) -> tuple[int, bool] | None:
    """(the kernel head dim to run at, whether v carries a ones channel to correct the denominator), or None when
    the kernel cannot give this attention within MAX_DENOMINATOR_ERROR (see the module's docstring)."""
    missing = -kv_len % KEY_BLOCK
    correct = missing > kv_len * MAX_DENOMINATOR_ERROR
    fits = [d for d in KERNEL_HEAD_DIMS if d >= head_dim + correct]
    return (fits[0], correct) if fits else None


def sage_can_take(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `sage_attention` runs these [B, S, H, D] inputs (else the caller uses another kernel)."""
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.stride(-1) == v.stride(-1) == 1  # the kernel's rows are contiguous (k is smoothed into a new tensor)
        and kernel_plan(q.shape[-1], k.shape[1]) is not None
    )


# torch.compile leaves the package's Python and Triton launches to run as they are (one graph break per attention).
@torch.compiler.disable
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of [B, S, H, D] q, k, v through `sageattn`; the result is [B, S_q, H, D]."""
    sageattn = load_sageattn()
    head_dim = q.shape[-1]
    plan = kernel_plan(head_dim, k.shape[1])
    if plan is None:
        raise ValueError(f"sage attention cannot take head dim {head_dim} with {k.shape[1]} keys (see sage_can_take)")
    kernel_dim, correct = plan
    k = k - k.mean(dim=1, keepdim=True)
    if kernel_dim > head_dim:
        pad = (0, kernel_dim - head_dim)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        if correct:
            v[..., head_dim] = 1
    out = sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=head_dim**-0.5, smooth_k=False)
    if correct:
        return (out[..., :head_dim].float() / out[..., head_dim : head_dim + 1].float()).to(out.dtype)
    return out[..., :head_dim] if kernel_dim > head_dim else out
