"""cuDNN's FP8 attention (`--attention-backend cudnn-fp8`): NVIDIA's fused FP8 flash-attention kernel through the
cuDNN frontend (the optional `nvidia-cudnn-frontend` package), fed by our per-tensor quantisation kernels, beside the
torch reference it is tested against.

At Wan 480p × 81 (32,760 tokens, 40 heads of 128) on an H200 the cuDNN FP8 kernel takes 26.5 ms where our Triton FP8
kernel (kernels/fp8_attention.py) takes 28.2 and cuDNN's bf16 kernel 38.1 (docs/fp8.md). Its contract on Hopper:
- q, k and v in e4m3 with one scale each for the whole tensor (`descale_*`, float32 device scalars): ours come from
  two passes over each tensor, the maximum of |x| (an atomic max per program) and the quantising write; e4m3's
  rounding is relative to each value (2⁻⁴), so one scale only has to keep the tensor inside e4m3's range;
- P (the softmax numerators) rounded to e4m3 with the scale 448 (P ≤ 1);
- the output in e4m3 too (bf16 output is Blackwell-only): a row of the output is a convex combination of v's rows,
  so |o| ≤ max |v| and o is written with the scale 448 / max |v|, never overflowing; one more pass turns it into
  the caller's dtype.

`cudnn_fp8_attention_reference` quantises q, k and v as the kernels do, runs float32 attention over the dequantised
values and rounds the output as cuDNN writes it: the kernel equals it up to P's rounding and the order of sums.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ditserve.kernels.dispatch import use_triton
from ditserve.kernels.fp8_quant import FP8, FP8_MAX, to_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None

MIN_AMAX = 1e-12  # an all-zero tensor quantises to zeros instead of dividing by zero
REQUIREMENT = "nvidia-cudnn-frontend==1.32.0"


class CudnnFrontendUnavailable(ValueError):
    """The cuDNN frontend (`nvidia-cudnn-frontend`) does not import."""


def load_cudnn_frontend():
    """The cuDNN frontend module; CudnnFrontendUnavailable saying how to install it when it does not import."""
    try:
        import cudnn
    except (ImportError, OSError) as e:
        raise CudnnFrontendUnavailable(
            f"the cudnn-fp8 attention backend needs the nvidia-cudnn-frontend package ({e}): "
            f"pip install {REQUIREMENT}, or choose another --attention-backend"
        ) from None
    return cudnn


def cudnn_frontend_available() -> bool:
    try:
        load_cudnn_frontend()
    except CudnnFrontendUnavailable:
        return False
    return True


def quantize_per_tensor_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x → (e4m3 x / descale, float32 descale), descale = max |x| / 448 (a 0-dim tensor)."""
    descale = (x.float().abs().amax().clamp(min=MIN_AMAX) / FP8_MAX).float()
    return to_fp8(x.float(), descale), descale


@dataclass(frozen=True)
class FP8Heads:
    """q or k [B, S, H, D] already in e4m3 with one scale for the tensor: the values are data · descale. Written by
    the kernel that produced them (the q/k norm + RoPE kernels, whose output is bounded by their weights: see
    `rms_norm_rope_into`) so that `cudnn_fp8_attention` skips both passes over them; descale is a one-element
    float32 tensor at a 16-byte aligned address (cuDNN's scalar operand), filled by that kernel."""

    data: torch.Tensor
    descale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @staticmethod
    def empty(shape: tuple[int, ...], device: torch.device) -> tuple[FP8Heads, FP8Heads]:
        """Two of them (q's and k's) to be written, their descales in one small buffer."""
        descales = torch.empty(2, ROW, dtype=torch.float32, device=device)
        return tuple(FP8Heads(torch.empty(shape, dtype=FP8, device=device), descales[i, :1]) for i in range(2))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.descale).to(dtype)


def cudnn_fp8_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v in float32 over q, k, v [B, S, H, D] rounded to their per-tensor e4m3 operands, the
    result rounded to e4m3 with the scale 448 / max |v| as cuDNN writes it, returned in q's dtype."""
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    (q8, dq), (k8, dk) = (
        (t.data, t.descale.view(())) if isinstance(t, FP8Heads) else quantize_per_tensor_reference(t) for t in (q, k)
    )
    v8, dv = quantize_per_tensor_reference(v)
    qf, kf, vf = ((t8.float() * d).transpose(1, 2) for t8, d in ((q8, dq), (k8, dk), (v8, dv)))
    out = torch.softmax(qf @ kf.transpose(-1, -2) * sm_scale, dim=-1) @ vf
    out8 = to_fp8(out, dv)
    return (out8.float() * dv).transpose(1, 2).to(v.dtype)


def cudnn_fp8_can_take(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cuDNN's kernel runs these [B, S, H, D] inputs (else `cudnn_fp8_attention` runs the reference): an
    FP8-capable GPU (Hopper or newer), a head of 16…256 channels in steps of 16, the same heads and head size in
    q, k and v, unit stride along the head; q and k may be `FP8Heads` (both or neither)."""
    if isinstance(q, FP8Heads) or isinstance(k, FP8Heads):
        return isinstance(q, FP8Heads) and isinstance(k, FP8Heads) and cudnn_fp8_can_take(q.data, k.data, v)
    d = q.shape[-1]
    return (
        cudnn_fp8_takes_heads(v, d)
        and k.shape[-1] == d
        and v.shape[-1] == d
        and q.shape[2] == k.shape[2] == v.shape[2]
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and q.dtype in (v.dtype, FP8)
    )


def cudnn_fp8_takes_heads(like: torch.Tensor, head_dim: int) -> bool:
    """Whether cuDNN's kernel runs heads of `head_dim` channels in `like`'s dtype on `like`'s device: an FP8-capable
    GPU (Hopper or newer) and a head of 16…256 channels in steps of 16 in bf16 or fp16."""
    return (
        like.is_cuda
        and use_triton(like)
        and torch.cuda.get_device_capability(like.device) >= (9, 0)
        and head_dim % 16 == 0
        and head_dim <= 256
        and like.dtype in (torch.bfloat16, torch.float16)
    )


# The scalars of one call, rows of 4 floats (16-byte aligned, as cuDNN's scalar operands want) in this order: the
# maxima of q, k, v (zeros on entry), their descales, P's scale (448: P ≤ 1) and descale, the output's scale (448 /
# max |v|), and the maxima of P and the output that the kernel writes (unused here).
SCALARS = (
    "amax_q", "amax_k", "amax_v", "descale_q", "descale_k", "descale_v", "scale_s", "descale_s", "scale_o",
    "amax_s", "amax_o",
)  # fmt: skip
ROW = 4  # floats a scalar's row

if triton is not None:

    @triton.jit
    def _abs_max_rows(
        X, AMAX, pid, n_rows, s_outer, s_row, inner_rows, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """max |x| over rows pid · BLOCK_R … of x (rows of WIDTH contiguous values; row r at (r // inner_rows) ·
        s_outer + (r % inner_rows) · s_row), into AMAX by an atomic max."""
        if pid * BLOCK_R < n_rows:
            rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            base = (rows // inner_rows).to(tl.int64) * s_outer + (rows % inner_rows).to(tl.int64) * s_row
            top = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)  # one reduction at the end, none per chunk
            for start in range(0, WIDTH, BLOCK_W):
                cols = start + tl.arange(0, BLOCK_W)
                mask = row_ok[:, None] & (cols < WIDTH)[None, :]
                top = tl.maximum(top, tl.abs(tl.load(X + base[:, None] + cols[None, :], mask=mask, other=0.0)))
            tl.atomic_max(AMAX, tl.max(tl.max(top, axis=1), axis=0))

    @triton.jit
    def _abs_max_kernel(
        Q, K, V, SCALARS, n_q, n_kv, sq0, sq1, sk0, sk1, sv0, sv1, q_tokens, kv_tokens, WIDTH: tl.constexpr,
        FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """The maxima of q, k and v (program_id(1) + FIRST picks the tensor: FIRST 2 takes v alone) into SCALARS'
        first three rows."""
        pid = tl.program_id(0)
        which = tl.program_id(1) + FIRST
        if which == 0:
            _abs_max_rows(Q, SCALARS, pid, n_q, sq0, sq1, q_tokens, WIDTH, BLOCK_R, BLOCK_W)
        elif which == 1:
            _abs_max_rows(K, SCALARS + 4, pid, n_kv, sk0, sk1, kv_tokens, WIDTH, BLOCK_R, BLOCK_W)
        else:
            _abs_max_rows(V, SCALARS + 8, pid, n_kv, sv0, sv1, kv_tokens, WIDTH, BLOCK_R, BLOCK_W)

    @triton.jit
    def _quantize_rows_per_tensor(
        X, X8, SCALARS, which, pid, n_rows, s_outer, s_row, inner_rows, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """x / descale in e4m3 into x8 (rows of WIDTH, contiguous), descale = max |x| / 448 (SCALARS' row `which`);
        the first program writes the descale (row 3 + which) and, for v, the output's scale (row 8)."""
        amax = tl.maximum(tl.load(SCALARS + which * 4), 1e-12)
        descale = amax / 448.0
        if pid * BLOCK_R < n_rows:
            rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            base = (rows // inner_rows).to(tl.int64) * s_outer + (rows % inner_rows).to(tl.int64) * s_row
            for start in range(0, WIDTH, BLOCK_W):
                cols = start + tl.arange(0, BLOCK_W)
                mask = row_ok[:, None] & (cols < WIDTH)[None, :]
                x = tl.load(X + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                x8 = tl.clamp(x / descale, -448.0, 448.0)
                out = X8 + rows.to(tl.int64)[:, None] * WIDTH + cols[None, :]
                tl.store(out, x8.to(X8.dtype.element_ty), mask=mask)
        if pid == 0:
            tl.store(SCALARS + (3 + which) * 4, descale)
            if which == 2:
                tl.store(SCALARS + 8 * 4, 448.0 / amax)

    @triton.jit
    def _quantize_kernel(
        Q, K, V, Q8, K8, V8, SCALARS, n_q, n_kv, sq0, sq1, sk0, sk1, sv0, sv1, q_tokens, kv_tokens,
        WIDTH: tl.constexpr, FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        which = tl.program_id(1) + FIRST
        if which == 0:
            _quantize_rows_per_tensor(Q, Q8, SCALARS, 0, pid, n_q, sq0, sq1, q_tokens, WIDTH, BLOCK_R, BLOCK_W)
        elif which == 1:
            _quantize_rows_per_tensor(K, K8, SCALARS, 1, pid, n_kv, sk0, sk1, kv_tokens, WIDTH, BLOCK_R, BLOCK_W)
        else:
            _quantize_rows_per_tensor(V, V8, SCALARS, 2, pid, n_kv, sv0, sv1, kv_tokens, WIDTH, BLOCK_R, BLOCK_W)

    @triton.jit
    def _dequantize_kernel(X8, DESCALE, OUT, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        x = tl.load(X8 + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(DESCALE)
        tl.store(OUT + offs, x.to(OUT.dtype.element_ty), mask=ok)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] with each token's heads contiguous (H·D values), as the kernels read it; else a copy."""
    return x if x.stride(-1) == 1 and x.stride(2) == x.shape[-1] else x.contiguous()


BLOCK_R, BLOCK_W = 16, 1024


def quantize_operands(
    q: torch.Tensor | FP8Heads, k: torch.Tensor | FP8Heads, v: torch.Tensor, scalars: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, S, H, D] (k and v of one length, heads and head size of q's) → contiguous e4m3 copies, each
    `quantize_per_tensor_reference` of its tensor, in two Triton launches (the maxima, then the writes). `scalars`
    [len(SCALARS), ROW] float32 with zeros in the maxima' rows takes the maxima, the descales and the output's
    scale. q and k as `FP8Heads` (both) are taken as they are: then only v is read, twice."""
    given = isinstance(q, FP8Heads)
    v = _token_rows(v)
    q, k = (q.data, k.data) if given else (_token_rows(q), _token_rows(k))
    b, n_q, h, d = q.shape
    n_kv = k.shape[1]
    q8, k8 = (q, k) if given else (torch.empty(t.shape, dtype=FP8, device=t.device) for t in (q, k))
    v8 = torch.empty(v.shape, dtype=FP8, device=v.device)
    rows_q, rows_kv, width = b * n_q, b * n_kv, h * d
    first = 2 if given else 0
    grid = (triton.cdiv(rows_kv if given else max(rows_q, rows_kv), BLOCK_R), 3 - first)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    block_w = min(BLOCK_W, triton.next_power_of_2(width))
    launch = dict(WIDTH=width, FIRST=first, BLOCK_R=BLOCK_R, BLOCK_W=block_w, num_warps=8)
    _abs_max_kernel[grid](q, k, v, scalars, rows_q, rows_kv, *strides, n_q, n_kv, **launch)
    _quantize_kernel[grid](q, k, v, q8, k8, v8, scalars, rows_q, rows_kv, *strides, n_q, n_kv, **launch)
    return q8, k8, v8


_scalar_templates: dict[torch.device, torch.Tensor] = {}


def _scalars(device: torch.device) -> torch.Tensor:
    template = _scalar_templates.get(device)
    if template is None:
        template = torch.zeros(len(SCALARS), ROW, dtype=torch.float32)
        template[SCALARS.index("scale_s"), 0] = FP8_MAX
        template[SCALARS.index("descale_s"), 0] = 1.0 / FP8_MAX
        template = _scalar_templates[device] = template.to(device)
    return template


@dataclass
class _Plan:
    """A built cuDNN graph for one attention shape, its tensor handles and workspace."""

    graph: object
    tensors: dict
    workspace: torch.Tensor
    handle: object


_plans: dict[tuple, _Plan] = {}
_handles: dict[int, object] = {}
_lock = threading.Lock()


def _build(cudnn, handle, b: int, n_q: int, n_k: int, h: int, d: int, scale: float, amax_outputs: bool):
    """The graph and its tensors; `amax_outputs`: the maxima of P and the output bound as outputs (the kernel then
    writes them, after cuDNN zeroes them: two memsets a call)."""
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def operand(name, n):  # [B, H, S, D] dims over [B, S, H, D] memory (the layout our quantisation writes)
        return graph.tensor(name=name, dim=(b, h, n, d), stride=(n * h * d, d, h * d, 1), data_type=e4m3)

    t = {"q": operand("q", n_q), "k": operand("k", n_k), "v": operand("v", n_k)}
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = graph.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
        descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        is_inference=True, attn_scale=scale, use_causal_mask=False, name="attention",
    )  # fmt: skip
    o.set_output(True).set_dim((b, h, n_q, d)).set_stride((n_q * h * d, d, h * d, 1)).set_data_type(e4m3)
    t["o"] = o
    for name, amax in (("amax_s", amax_s), ("amax_o", amax_o)):
        amax.set_output(amax_outputs).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        if amax_outputs:
            t[name] = amax
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, t


def _plan(b: int, n_q: int, n_k: int, h: int, d: int, scale: float, device: torch.device) -> _Plan:
    key = (device.index, b, n_q, n_k, h, d, scale)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    cudnn = load_cudnn_frontend()
    with _lock, torch.cuda.device(device):
        if device.index not in _handles:
            _handles[device.index] = cudnn.create_handle()
        handle = _handles[device.index]
        try:  # without the maxima we do not read, where this cuDNN takes such a graph
            graph, tensors = _build(cudnn, handle, b, n_q, n_k, h, d, scale, amax_outputs=False)
        except Exception:  # noqa: BLE001 - any refusal of that graph: the one every FP8 cuDNN takes
            graph, tensors = _build(cudnn, handle, b, n_q, n_k, h, d, scale, amax_outputs=True)
        workspace = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device)
        plan = _plans[key] = _Plan(graph, tensors, workspace, handle)
    return plan


# torch.compile leaves these launches as they are (one graph break per attention).
@torch.compiler.disable
def cudnn_fp8_attention(
    q: torch.Tensor | FP8Heads, k: torch.Tensor | FP8Heads, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Non-causal attention of [B, S, H, D] q, k, v through cuDNN's FP8 kernel; the result [B, S_q, H, D] in v's
    dtype. q and k may come quantised already (`FP8Heads`, both). `cudnn_fp8_attention_reference` where the kernel
    cannot run (`cudnn_fp8_can_take`)."""
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not cudnn_fp8_can_take(q, k, v):
        return cudnn_fp8_attention_reference(q, k, v, sm_scale)
    cudnn = load_cudnn_frontend()
    b, n, h, d = q.shape
    plan = _plan(b, n, k.shape[1], h, d, float(sm_scale), v.device)
    scalars = _scalars(v.device).clone()
    q8, k8, v8 = quantize_operands(q, k, v, scalars)
    out8 = torch.empty(q.shape, dtype=FP8, device=v.device)
    t = plan.tensors
    cudnn.set_stream(handle=plan.handle, stream=torch.cuda.current_stream(v.device).cuda_stream)
    bound = {t[name]: scalars[i, :1].view(1, 1, 1, 1) for i, name in enumerate(SCALARS) if name in t}
    if isinstance(q, FP8Heads):
        bound[t["descale_q"]], bound[t["descale_k"]] = q.descale.view(1, 1, 1, 1), k.descale.view(1, 1, 1, 1)
    plan.graph.execute({t["q"]: q8, t["k"]: k8, t["v"]: v8, t["o"]: out8, **bound}, plan.workspace, handle=plan.handle)
    out = torch.empty(q.shape, dtype=v.dtype, device=v.device)
    numel = out.numel()
    descale_o = scalars[SCALARS.index("descale_v"), :1]
    _dequantize_kernel[(triton.cdiv(numel, 4096),)](out8, descale_o, out, numel, BLOCK=4096)
    return out


__all__ = [
    "CudnnFrontendUnavailable",
    "FP8Heads",
    "cudnn_fp8_attention",
    "cudnn_fp8_attention_reference",
    "cudnn_fp8_can_take",
    "cudnn_fp8_takes_heads",
    "cudnn_frontend_available",
    "load_cudnn_frontend",
    "quantize_operands",
    "quantize_per_tensor_reference",
]
