"""Kernel-vs-reference checks, shared by the CPU (Triton interpreter) and CUDA tests.

Run as a script with TRITON_INTERPRET=1 to exercise the Triton kernels on the CPU; the interpreter must be chosen
before the kernels are defined, hence a separate process.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ditserve.kernels import fused_norm as k
from ditserve.layers.rotary import multi_axis_rope


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_layer_norm_modulate(device: str, dtype: torch.dtype, b: int, s: int, d: int, tol: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(b, s + 3, d, generator=g).to(device, dtype)
    x = full[:, 3:]  # rows strided in the batch dimension, as the image slice of a joint sequence
    mod = torch.randn(b, 3 * d, generator=g).to(device, dtype)
    shift, scale, _ = mod.chunk(3, dim=-1)  # strided [B, D] views, as the modulation produces them
    assert k._use_triton(x), "the Triton path is not taken"
    out = k.layer_norm_modulate(x, shift, scale)
    ref = k.layer_norm_modulate_reference(x.double(), shift.double(), scale.double())
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < tol, (rel(out, ref), b, s, d)


def check_layer_norm_affine(device: str, dtype: torch.dtype, b: int, s: int, d: int, tol: float, seed: int) -> None:
    """Wan's cross-attention norm: float32 LayerNorm with scale and bias, rounded to the activations' dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s + 3, d, generator=g).to(device, dtype)[:, 3:]  # rows strided in the batch dimension
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    bias = (0.1 * torch.randn(d, generator=g)).to(device, dtype)
    assert k._use_triton(x), "the Triton path is not taken"
    out = k.layer_norm_affine(x, w, bias, 1e-6)
    ref = k.layer_norm_affine_reference(x.double(), w.double(), bias.double(), 1e-6)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous() and torch.isfinite(out).all()
    assert rel(out, ref) < tol, (rel(out, ref), b, s, d)
    today = k.layer_norm_affine_reference(x, w, bias, 1e-6)
    # The terms added up are x̂·w and the bias: where they cancel, the result is far smaller than either, and float32
    # sums in another order move it by steps of the terms, not of the result.
    x_hat = F.layer_norm(x.float(), (d,), eps=1e-6)
    size = (x_hat * w.float()).abs() + bias.float().abs()
    assert_rounds_like(out, today, size, ("layer_norm_affine", b, s, d))


def check_residual_layer_norms(device: str, dtype: torch.dtype, b: int, s: int, d: int, seed: int) -> None:
    """The residual add in the norm's pass (Wan's block): the sum equals the separate add (rounded to x's dtype; in
    Triton's CPU interpreter, which rounds to 16-bit types toward zero, within one step), and the norm equals, bit
    for bit, the norm's own kernel over that sum; with and without a gate, quantised or not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s + 3, d, generator=g).to(device, dtype)[:, 3:]  # rows strided in the batch dimension
    y = torch.randn(b, s, d, generator=g).to(device, dtype)
    mod = torch.randn(b, 3 * d, generator=g).to(device)  # float32, as Wan's modulation
    shift, scale, gate = mod.chunk(3, dim=-1)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    bias = (0.1 * torch.randn(d, generator=g)).to(device, dtype)
    for quantize in (False, True):
        for branch_gate in (None, gate):
            total = k.residual_sum_reference(x, y, branch_gate)
            fused = (
                k.residual_layer_norm_modulate(x, y, branch_gate, shift, scale, 1e-6, quantize),
                k.residual_layer_norm_affine(x, y, branch_gate, w, bias, 1e-6, quantize),
            )
            for which, (fused_total, out) in enumerate(fused):
                what = ("residual norm", which, quantize, branch_gate is not None, b, s, d)
                assert fused_total.dtype == dtype and fused_total.is_contiguous(), what
                if device != "cpu" or dtype == torch.float32:
                    assert torch.equal(fused_total, total), what
                else:
                    step = total.float().abs() * torch.finfo(dtype).eps + 1e-30
                    assert ((fused_total.float() - total.float()).abs() <= step).all(), what
                if which == 0:
                    alone = k.layer_norm_modulate(fused_total, shift, scale, 1e-6, quantize)
                else:
                    alone = k.layer_norm_affine(fused_total, w, bias, 1e-6, quantize)
                if quantize:
                    assert torch.equal(out.data, alone.data) and torch.equal(out.scale, alone.scale), what
                else:
                    assert out.dtype == dtype and torch.equal(out, alone), what


def check_rms_norm_rope(
    device: str, dtype: torch.dtype, b: int, s_txt: int, s_img: int, h: int, d: int, tol: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    axes = [d // 8, 3 * d // 16 * 2, d - d // 8 - 3 * d // 16 * 2]
    ids = torch.cat([torch.zeros(s_txt, 3), torch.randint(0, 64, (s_img, 3), generator=g).float()])
    cos, sin = (t.to(device) for t in multi_axis_rope(ids, axes))
    joint = torch.full((b, s_txt + s_img, h, d), float("nan"), device=device, dtype=dtype)  # poisoned
    parts = []
    for offset, s in ((0, s_txt), (s_txt, s_img)):
        fused = torch.randn(b, s, 3 * h * d, generator=g).to(device, dtype)  # q | k | v of one projection
        x = fused[..., h * d : 2 * h * d].unflatten(-1, (h, d))  # a strided view, like k of a fused QKV
        w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
        k.rms_norm_rope_into(joint, x, w, 1e-6, cos, sin, offset)
        ref = k.rms_norm_rope_reference(
            x.double(), w.double(), 1e-6, cos[offset : offset + s].double(), sin[offset : offset + s].double()
        )
        parts.append(ref)
    ref = torch.cat(parts, dim=1)
    assert not joint.isnan().any(), "some outputs were never written"
    assert rel(joint, ref) < tol, (rel(joint, ref), b, s_txt, s_img, h, d)
    check_fp8_heads(device, dtype, b, s_txt, s_img, h, d, cos, sin, g)
    # Heads in groups elsewhere in memory, as Ulysses's message layout [chunks, ranks, S, 3, B, h, D] holds them.
    if h % 2 == 0:
        chunks, ranks = (2, h // 2) if h % 4 else (2, 2)
        per = h // (chunks * ranks)
        message = torch.full((chunks, ranks, s_txt + s_img, 3, b, per, d), float("nan"), device=device, dtype=dtype)
        grouped = message[:, :, :, 1].permute(3, 2, 1, 0, 4, 5)  # [B, S, ranks, chunks, h, D], heads rank-major
        x = torch.randn(b, s_txt + s_img, 3 * h * d, generator=g).to(device, dtype)[..., : h * d].unflatten(-1, (h, d))
        k.rms_norm_rope_into(grouped, x, w, 1e-6, cos, sin, 0)
        plain = torch.empty(b, s_txt + s_img, h, d, device=device, dtype=dtype)
        k.rms_norm_rope_into(plain, x, w, 1e-6, cos, sin, 0)
        assert torch.equal(grouped.reshape(plain.shape), plain), ("head groups", b, h, d)
        assert message[:, :, :, 0].isnan().all() and message[:, :, :, 2].isnan().all(), "wrote outside its heads"


def assert_fp8_heads(heads, bf16: torch.Tensor, weights: list[torch.Tensor], width: int, what: tuple) -> None:
    """`heads` (FP8Heads) holds `bf16` (the same norm written in the activations' dtype) in e4m3 with the descale
    bound by `weights` over `width`: within e4m3's rounding of each value (2⁻⁴ relative; subnormals absolute). On
    the CPU, Triton's interpreter halves some round-ups into the next power of two (see check_quantize_rows): there
    up to 5% of the values may be off; on CUDA a value on a rounding boundary may rarely land one step apart (2 in
    28 million at FLUX's size)."""
    from ditserve.kernels.fused_norm import fp8_heads_descale_reference

    want = fp8_heads_descale_reference(weights, width)
    torch.testing.assert_close(heads.descale.view(()), want.to(heads.descale.device), rtol=1e-6, atol=0)
    got = heads.data.float() * heads.descale
    ref = bf16.float()
    assert got.abs().max() <= 448 * want, what  # the bound holds
    slack = ref.abs() * (2**-4 + 2**-7) + want * 2**-9
    outside = ((got - ref).abs() > slack).float().mean().item()
    assert outside <= (1e-6 if heads.data.is_cuda else 0.05), (what, outside)


def check_fp8_heads(device, dtype, b, s_txt, s_img, h, d, cos, sin, g) -> None:
    """q written by two norms into one joint tensor in e4m3 (`FP8Heads`), each bounded by both weights."""
    from ditserve.kernels.cudnn_fp8_attention import FP8Heads

    heads, _ = FP8Heads.empty((b, s_txt + s_img, h, d), torch.device(device))
    plain = torch.empty(b, s_txt + s_img, h, d, device=device, dtype=dtype)
    ws = [(1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype) * scale for scale in (1.0, 3.0)]
    for i, (offset, s) in enumerate(((0, s_txt), (s_txt, s_img))):
        x = torch.randn(b, s, 3 * h * d, generator=g).to(device, dtype)[..., : h * d].unflatten(-1, (h, d))
        k.rms_norm_rope_into(heads, x, ws[i], 1e-6, cos, sin, offset, joint_weight=ws[1 - i])
        k.rms_norm_rope_into(plain, x, ws[i], 1e-6, cos, sin, offset)
    assert_fp8_heads(heads, plain, ws, d, ("fp8 heads", b, s_txt, s_img, h, d))


def check_rms_norm_across_heads_rope(
    device: str, dtype: torch.dtype, b: int, s: int, h: int, d: int, tol: float, seed: int
) -> None:
    """Wan's q/k norm: one RMS over all heads of a token, with and without RoPE, under a stand-in for the
    tensor-parallel sum of squares (two ranks of equal heads), and into head groups as Ulysses's messages hold."""
    from ditserve.layers.rotary import apply_rope

    g = torch.Generator().manual_seed(seed)
    axes = [d - 2 * (d // 4 // 2 * 2), d // 4 // 2 * 2, d // 4 // 2 * 2]
    ids = torch.randint(0, 32, (s + 3, 3), generator=g).float()  # positions of 3 earlier tokens, then x's
    cos, sin = (t.to(device) for t in multi_axis_rope(ids, axes))
    fused = torch.randn(b, s, 3 * h * d, generator=g).to(device, dtype)
    x = fused[..., h * d : 2 * h * d].unflatten(-1, (h, d))  # k of a fused QKV: a strided view
    w = (1 + 0.1 * torch.randn(h * d, generator=g)).to(device, dtype)
    for rope, reduce, width in ((True, None, None), (False, None, None), (True, lambda t: 2 * t, 2 * h * d)):
        out = torch.full((b, s + 3, h, d), float("nan"), device=device, dtype=dtype)
        k.rms_norm_across_heads_rope_into(
            out, x, w, 1e-6, cos if rope else None, sin if rope else None, 3, reduce, width
        )
        ref = k.rms_norm_across_heads_reference(x.double(), w.double(), 1e-6, reduce, width)
        if rope:
            ref = apply_rope(ref, cos[3:].double(), sin[3:].double())
        assert out[:, :3].isnan().all() and not out[:, 3:].isnan().any(), "wrote outside its rows"
        assert rel(out[:, 3:], ref) < tol, (rel(out[:, 3:], ref), rope, reduce is not None, b, s, h, d)
    if h % 4 == 0:
        message = torch.full((2, 2, s, 3, b, h // 4, d), float("nan"), device=device, dtype=dtype)
        grouped = message[:, :, :, 1].permute(3, 2, 1, 0, 4, 5)
        k.rms_norm_across_heads_rope_into(grouped, x, w, 1e-6, cos[3:], sin[3:], 0)
        plain = torch.empty(b, s, h, d, device=device, dtype=dtype)
        k.rms_norm_across_heads_rope_into(plain, x, w, 1e-6, cos[3:], sin[3:], 0)
        assert torch.equal(grouped.reshape(plain.shape), plain), ("head groups", b, h, d)
        assert message[:, :, :, 0].isnan().all() and message[:, :, :, 2].isnan().all(), "wrote outside its heads"
    from ditserve.kernels.cudnn_fp8_attention import FP8Heads

    heads, _ = FP8Heads.empty((b, s, h, d), torch.device(device))  # in e4m3, bounded over the whole width
    for reduce, width in ((None, None), (lambda t: 2 * t, 2 * h * d)):
        k.rms_norm_across_heads_rope_into(heads, x, w, 1e-6, cos[3:], sin[3:], 0, reduce, width)
        plain = torch.empty(b, s, h, d, device=device, dtype=dtype)
        k.rms_norm_across_heads_rope_into(plain, x, w, 1e-6, cos[3:], sin[3:], 0, reduce, width)
        assert_fp8_heads(heads, plain, [w], width or h * d, ("fp8 heads across heads", b, s, h, d))


def check_quantize_rows(device: str, dtype: torch.dtype, rows: int, cols: int, seed: int) -> None:
    """FP8 per-row quantisation: the kernel's scales equal the reference's, and so do its e4m3 values but for rare
    rounding differences of the division."""
    from ditserve.kernels import fp8_quant as q

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols + 8, generator=g) * torch.logspace(-3, 3, rows)[:, None]).to(device, dtype)
    x = x[:, 4 : 4 + cols]  # a strided view: rows not contiguous with each other
    if rows > 1:
        x[1] = 0  # an all-zero row quantises to zeros
    got, got_scale = q.quantize_rows(x)
    want, want_scale = q.quantize_rows_reference(x)
    assert got.dtype == q.FP8 and got.shape == x.shape and got_scale.shape == (rows, 1)
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-6, atol=0)
    # On CUDA a value on a rounding boundary may rarely land one e4m3 step apart. Triton's CPU interpreter gets
    # some round-ups into the next power of two wrong (the value comes out half as large): about 3% of bytes, so
    # on the CPU this checks the kernel's indexing and scales, and on CUDA its values.
    differ = (got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
    assert differ < (1e-3 if x.is_cuda else 0.05), differ
    if x.is_cuda:
        assert rel(got.float() * got_scale, want.float() * want_scale) < 1e-3
    if rows > 1:
        assert not got[1].float().any()


def check_quantized_outputs(device: str, dtype: torch.dtype, b: int, s: int, d: int, ffn: int, seed: int) -> None:
    """The LayerNorms and GELU asked for rows quantised for an FP8 linear: scales and e4m3 values those of
    quantising the float32 reference's rows (`quantize_rows_reference`), but for values on a rounding boundary
    (and, on the CPU, the interpreter's round-ups: see check_quantize_rows)."""
    from ditserve.kernels import fp8_quant as q
    from ditserve.kernels.gelu import gelu_tanh, gelu_tanh_reference

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s + 3, d, generator=g).to(device, dtype)[:, 3:]  # rows strided in the batch dimension
    mod = torch.randn(b, 3 * d, generator=g).to(device, torch.float32)
    shift, scale, _ = mod.chunk(3, dim=-1)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    bias = (0.1 * torch.randn(d, generator=g)).to(device, dtype)
    up = (2 * torch.randn(b, s, ffn + 8, generator=g)).to(device, dtype)[..., 8:]  # strided rows, as GEMM slices
    up[0, 0] = 0  # an all-zero row: scale at its floor, zeros
    cases = {
        "layer_norm_modulate": (
            k.layer_norm_modulate(x, shift, scale, 1e-6, True),
            k.layer_norm_modulate_reference(x.float(), shift, scale, 1e-6),
        ),
        "layer_norm_affine": (
            k.layer_norm_affine(x, w, bias, 1e-6, True),
            k.layer_norm_affine_reference(x.float(), w.float(), bias.float(), 1e-6),
        ),
        "gelu_tanh": (gelu_tanh(up, True), gelu_tanh_reference(up.float())),
    }
    for name, (fused, reference) in cases.items():
        want, want_scale = q.quantize_rows_reference(reference.reshape(-1, reference.shape[-1]))
        assert isinstance(fused, q.QuantizedRows) and fused.dtype == dtype and fused.shape == reference.shape, name
        assert fused.data.dtype == q.FP8 and fused.data.is_contiguous() and fused.scale.shape == want_scale.shape
        torch.testing.assert_close(fused.scale, want_scale, rtol=1e-5, atol=0, msg=name)
        got = fused.data.reshape(want.shape)
        differ = (got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
        assert differ < (1e-2 if got.is_cuda else 0.05), (name, differ)
        if got.is_cuda:
            assert rel(fused.dequantize().float(), reference) < 0.05, name  # e4m3's own rounding: ~2%


def check_fp8_attention(device: str, dtype: torch.dtype, b: int, n: int, nk: int, h: int, d: int, seed: int) -> None:
    """FP8 attention: the quantising kernels against the reference (scales exactly; e4m3 bytes but for rounding
    boundaries, and on the CPU the interpreter's round-ups, as for check_quantize_rows), and the attention kernel
    against float32 attention over its own FP8 operands: on CUDA what is left is P's rounding to e4m3 (about 2% on
    random inputs); the interpreter keeps P in float32, so there only the summation order and the output's
    rounding are left."""
    from ditserve.kernels import fp8_attention as fa

    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype)
    q = fused[:, :, 0]  # a strided view of a fused projection, as models hand it over
    k = (torch.randn(b, nk, h, d, generator=g) * 2 + 0.5).to(device, dtype)
    v = (torch.randn(b, nk, h, d, generator=g) * torch.logspace(-1, 1, d)).to(device, dtype)  # channels of all sizes
    assert fa.fp8_attention_can_take(q, k, v), "the Triton path is not taken"
    sm_scale = d**-0.5
    got, want = fa.quantize_heads(q, k, v, sm_scale), fa.quantize_heads_reference(q, k, v, sm_scale)
    bytes_apart = 1e-3 if device != "cpu" else 0.05
    for name in ("q_scale", "k_scale", "v_scale"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=0)
    for name in ("q8", "k8", "vt8"):
        a, w = getattr(got, name), getattr(want, name)
        assert a.shape == w.shape and a.dtype == fa.FP8, (name, a.shape, w.shape)
        differ = (a.view(torch.uint8) != w.view(torch.uint8)).float().mean().item()
        assert differ < bytes_apart, (name, differ)
    assert not got.vt8[..., nk:].float().any()  # the padding keys are zeros
    out = fa.fp8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    qf, kf, vf = fa.dequantized(got, n, nk, sm_scale)
    own = (torch.softmax(qf @ kf.transpose(-1, -2) * sm_scale, dim=-1) @ vf).transpose(1, 2)
    bound = 5e-2 if device != "cpu" else (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel(out, own) < bound, (rel(out, own), b, n, nk, h, d)
    # key tiles as wide as k's scale block (the untuned default reads half of one)
    wide = fa.fp8_attention(q, k, v, config=dict(BLOCK_N=fa.KEY_BLOCK, num_warps=8, num_stages=3))
    assert rel(wide, own) < bound, ("key tiles of", fa.KEY_BLOCK, rel(wide, own), b, n, nk, h, d)


def check_cudnn_fp8_attention(device: str, dtype: torch.dtype, b: int, n: int, nk: int, h: int, d: int, seed: int):
    """cudnn-fp8: the per-tensor quantising kernels against their reference (the descale exactly, e4m3 bytes but for
    rounding boundaries), v's output scale; on CUDA with the cuDNN frontend installed, cuDNN's kernel against
    float32 attention over its own FP8 operands (what is left: P's rounding, the output's e4m3)."""
    from ditserve.kernels import cudnn_fp8_attention as ca

    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype)
    q = fused[:, :, 0] * 3  # a strided view of a fused projection, as models hand it over
    k = (torch.randn(b, nk, h, d, generator=g) * 2 + 0.5).to(device, dtype)
    v = fused[:, :nk, 2] if nk <= n else torch.randn(b, nk, h, d, generator=g).to(device, dtype)
    scalars = torch.zeros(len(ca.SCALARS), ca.ROW, device=device)
    quantized = ca.quantize_operands(q, k, v, scalars)
    for i, (x, x8) in enumerate(zip((q, k, v), quantized, strict=True)):
        want8, want_descale = ca.quantize_per_tensor_reference(x)
        assert x8.shape == x.shape and x8.dtype == ca.FP8 and x8.is_contiguous()
        torch.testing.assert_close(scalars[3 + i, 0], want_descale, rtol=1e-6, atol=0)
        differ = (x8.view(torch.uint8) != want8.view(torch.uint8)).float().mean().item()
        assert differ < (1e-3 if device != "cpu" else 0.05), ("per-tensor e4m3", "qkv"[i], differ)
    torch.testing.assert_close(scalars[ca.SCALARS.index("scale_o"), 0], 1 / want_descale, rtol=1e-6, atol=0)
    if device == "cpu" or dtype == torch.float32 or not ca.cudnn_frontend_available():
        return  # cuDNN's kernel takes 16-bit inputs on CUDA (float32 ones run the reference)
    assert ca.cudnn_fp8_can_take(q, k, v), "the cuDNN path is not taken"
    out = ca.cudnn_fp8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    want = ca.cudnn_fp8_attention_reference(q, k, v)
    assert rel(out, want) < 5e-2, ("cudnn-fp8 against its reference", rel(out, want), b, n, nk, h, d)
    graph = torch.cuda.CUDAGraph()  # captured on a side stream, as the engine's CUDA graphs are
    with torch.cuda.graph(graph):
        replayed = ca.cudnn_fp8_attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out), ("cudnn-fp8 replayed from a CUDA graph", b, n, nk, h, d)


def check_gated_residual(device: str, dtype: torch.dtype, b: int, s: int, d: int, tol: float, seed: int) -> None:
    from ditserve.kernels import fused_residual as r

    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(b, s, d, generator=g).to(device, dtype) for _ in range(2))
    gate = torch.randn(b, 6 * d, generator=g).to(device, dtype).chunk(6, dim=-1)[2]  # a strided [B, D] view
    out = r.gated_residual(x, gate, y)
    ref = r.gated_residual_reference(x.double(), gate.double(), y.double())
    assert rel(out, ref) < tol, (rel(out, ref), b, s, d)


def check_gelu_tanh(device: str, dtype: torch.dtype, b: int, s: int, d: int, tol: float, seed: int) -> None:
    """On the MLP columns of a fused projection (rows strided), as FLUX's single blocks apply it, and on a plain
    tensor."""
    from ditserve.kernels import gelu as a

    g = torch.Generator().manual_seed(seed)
    fused = (3 * torch.randn(b, s, 3 * d + 4 * d, generator=g)).to(device, dtype)
    for x in (fused[..., 3 * d :], fused[..., : 3 * d].contiguous()):
        assert a._use_triton(x) and a._rows(x) is not None, "the Triton path is not taken"
        out = a.gelu_tanh(x)
        ref = a.gelu_tanh_reference(x.double())
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert rel(out, ref) < tol, (rel(out, ref), b, s, d)
        assert (out - ref).abs().max().item() < 8 * tol, ("largest difference", b, s, d)
    assert a._rows(fused.transpose(0, 1)[..., : 3 * d]) is None or b == 1  # rows at no single stride: torch's


def assert_rounds_like(out: torch.Tensor, today: torch.Tensor, size: torch.Tensor, what: tuple) -> None:
    """On CUDA in bf16, a fused kernel must round like the unfused ops it replaces (`today`, in the same dtype): the
    same values but where the row's RMS, summed in another order, tips a rounding of the norm (a small share), and
    there by no more than two bf16 steps of `size`, the magnitude of the terms added up (the norm's step, scaled, and
    the step of the final rounding). Triton's CPU interpreter converts float32 to bf16 by truncating: not there."""
    assert out.dtype == today.dtype and out.shape == today.shape
    if out.device.type != "cuda" or out.dtype != torch.bfloat16:
        return
    differ = (out != today).float().mean().item()
    assert differ < 0.01, ("share of elements that differ from today's ops", differ, what)
    step = size.float().abs() * 2**-7 + 2**-126  # a bf16 step or more: 7 stored mantissa bits
    worst = ((out.float() - today.float()).abs() / step).max().item()
    assert worst <= 2, ("bf16 steps from today's ops", worst, what)


def check_rms_norm_scale(device: str, dtype: torch.dtype, b: int, s: int, d: int, tol: float, seed: int) -> None:
    """Z-Image's modulated block inputs: the joint sequence's rows (strided view), per-sample scales chunked from
    one modulation output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s + 3, d, generator=g).to(device, dtype)[:, 3:]
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    scale = torch.randn(b, 4 * d, generator=g).to(device, dtype).chunk(4, dim=-1)[2]  # a strided [B, D] view
    assert k._use_triton(x), "the Triton path is not taken"
    out = k.rms_norm_scale(x, w, 1e-5, scale)
    ref = k.rms_norm_scale_reference(x.double(), w.double(), 1e-5, scale.double())
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous() and torch.isfinite(out).all()
    assert rel(out, ref) < tol, (rel(out, ref), b, s, d)
    today = k.rms_norm_scale_reference(x, w, 1e-5, scale)
    assert_rounds_like(out, today, today, ("rms_norm_scale", b, s, d))


def check_gated_rms_residual(device: str, dtype: torch.dtype, b: int, s: int, d: int, tol: float, seed: int) -> None:
    """x + gate · rms_norm(y) · w with per-sample gates, and x + rms_norm(y) · w (gate None); x strided."""
    from ditserve.kernels import fused_residual as r

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s + 2, d, generator=g).to(device, dtype)[:, 2:]
    y = (4 * torch.randn(b, s, d, generator=g)).to(device, dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
    gate = torch.randn(b, 4 * d, generator=g).to(device, dtype).chunk(4, dim=-1)[1].tanh()
    for gt in (gate, None):
        out = r.gated_rms_residual(x, gt, y, w, 1e-5)
        ref = r.gated_rms_residual_reference(
            x.double(), None if gt is None else gt.double(), y.double(), w.double(), 1e-5
        )
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
        assert rel(out, ref) < tol, (rel(out, ref), b, s, d, gt is None)
        # What the model ran before: the norm, then the residual (the gated kernel, one rounding; x is contiguous).
        normed = torch.nn.functional.rms_norm(y, (d,), w, 1e-5)
        today = x + normed if gt is None else r.gated_residual(x.contiguous(), gt, normed)
        assert_rounds_like(out, today, x.abs() + today.abs(), ("gated_rms_residual", b, s, d, gt is None))


def check_silu_and_mul(device: str, dtype: torch.dtype, b: int, s: int, h: int, tol: float, seed: int) -> None:
    """On the output of a merged [gate | up] GEMM (plain), on a view whose rows are strided, and on 2-D rows."""
    from ditserve.kernels import swiglu as a

    g = torch.Generator().manual_seed(seed)
    wide = (3 * torch.randn(b, s, 2 * h + 24, generator=g)).to(device, dtype)
    for x in (wide[..., : 2 * h].contiguous(), wide[..., 24:], wide[0, :, 24:]):
        assert a._use_triton(x) and a._rows(x) is not None, "the Triton path is not taken"
        out = a.silu_and_mul(x)
        ref = a.silu_and_mul_reference(x.double())
        assert out.shape == (*x.shape[:-1], h) and out.dtype == dtype and out.is_contiguous()
        assert rel(out, ref) < tol, (rel(out, ref), b, s, h)
        today = a.silu_and_mul_reference(x)
        assert_rounds_like(out, today, today, ("silu_and_mul", b, s, h))


class _Counted:
    """A Triton kernel that counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def check_zimage_forward(device: str, dtype: torch.dtype, tol: float) -> None:
    """A small Z-Image DiT (batch 2, noise and context refiners, main layers) with its kernels against itself on the
    torch references: the blocks hand the kernels what they expect (strided scales and gates, no gate in the
    context refiner), and every one of them runs."""
    import os

    from ditserve.kernels import fused_residual, swiglu
    from ditserve.models.zimage import ZImageConfig, ZImageTransformer

    g = torch.Generator().manual_seed(0)
    cfg = ZImageConfig(dim=120, n_heads=4, n_layers=2, n_refiner_layers=1, cap_feat_dim=40, axes_dims=(6, 12, 12))
    model = ZImageTransformer(cfg)
    for name, param in model.named_parameters():
        param.data.copy_(("norm" in name) + 0.05 * torch.randn(param.shape, generator=g))  # norm scales near 1
    model.to(device, dtype)
    n, cap = 64, 32
    inputs = (
        torch.randn(2, n, cfg.token_dim, generator=g).to(device, dtype),
        torch.randn(2, cap, cfg.cap_feat_dim, generator=g).to(device, dtype),
        torch.tensor([0.3, 0.8], device=device),  # per-sample timesteps: per-sample scales and gates
        torch.randint(0, 8, (n, 3), generator=g).float().to(device),
        torch.randint(0, 8, (cap, 3), generator=g).float().to(device),
        torch.zeros(n, dtype=torch.bool, device=device),
        torch.zeros(2, cap, dtype=torch.bool, device=device),
    )
    kernels = [(k, "_rms_norm_scale_kernel"), (fused_residual, "_gated_rms_residual_kernel")]
    kernels.append((swiglu, "_silu_and_mul_kernel"))
    originals = [getattr(module, name) for module, name in kernels]
    counted = [_Counted(kernel) for kernel in originals]
    try:
        for (module, name), wrapper in zip(kernels, counted, strict=True):
            setattr(module, name, wrapper)
        with torch.no_grad():
            out = model(*inputs)
            os.environ["DITSERVE_DISABLE_TRITON"] = "1"
            ref = model(*inputs)
    finally:
        os.environ.pop("DITSERVE_DISABLE_TRITON", None)
        for (module, name), kernel in zip(kernels, originals, strict=True):
            setattr(module, name, kernel)
    blocks = 2 * cfg.n_refiner_layers + cfg.n_layers
    modulated = cfg.n_refiner_layers + cfg.n_layers
    assert [c.launches for c in counted] == [2 * modulated, 2 * blocks, blocks], [c.launches for c in counted]
    assert rel(out, ref) < tol, ("Z-Image forward", rel(out, ref))


def check_copy_rows(device: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> None:
    """Head regrouping as Ulysses does it (bit-exact copies): q, k, v [B, S, H, D] into a message
    [ranks, 3, B, S, h, D], the received message into [3, B, ranks, S, h, D], and the output back into [B, S, H, D]."""
    from ditserve.kernels import row_copy as c

    g = torch.Generator().manual_seed(seed)
    b, s, ranks, chunks, h, d = shape
    qkv = [torch.randn(b, s, ranks * chunks * h, d, generator=g).to(device, dtype) for _ in range(3)]
    for j in range(chunks):
        message = torch.full((ranks, 3, b, s, h, d), float("nan"), device=device, dtype=dtype)
        for i, t in enumerate(qkv):
            heads = t.view(b, s, ranks, chunks, h, d)[:, :, :, j].permute(2, 0, 1, 3, 4)  # strided source
            assert c._use_triton(heads), "the Triton path is not taken"
            c.copy_rows(message[:, i], heads)  # strided destination too
            assert torch.equal(message[:, i], heads), ("pack", shape, j)
        joined = torch.full((3, b, ranks, s, h, d), float("nan"), device=device, dtype=dtype)
        c.copy_rows(joined, message.permute(1, 2, 0, 3, 4, 5))  # six dims
        assert torch.equal(joined, message.permute(1, 2, 0, 3, 4, 5)), ("unpack", shape, j)
        back = torch.full_like(qkv[0], float("nan"))
        back_heads = back.view(b, s, ranks, chunks, h, d)[:, :, :, j].permute(2, 0, 1, 3, 4)
        c.copy_rows(back_heads, message[:, 0])
        assert torch.equal(back_heads, message[:, 0]), ("scatter", shape, j)
    rows = torch.randn(3, 7, 24, generator=g).to(device, dtype)[:, :, :20]  # a last dim that is no power of two
    out = torch.zeros(3, 7, 20, device=device, dtype=dtype)
    assert torch.equal(c.copy_rows(out, rows), rows)


def run_zimage(device: str, dtype: torch.dtype, tol: float, sizes: str = "small") -> None:
    """Z-Image's kernels at its widths (dim, its SwiGLU's hidden 8/3 · dim): 3840 and 10240 at full size, the
    joint sequence of 4096 image and 32 caption tokens (1024²)."""
    if sizes == "small" and dtype == torch.float32:  # the wiring; in bf16, four blocks' roundings add up
        check_zimage_forward(device, dtype, tol)
    for seed, (b, s, d) in enumerate(
        [(1, 7, 48), (2, 33, 120), (2, 5, 3840)] if sizes == "small" else [(1, 4128, 3840), (2, 4128, 3840)]
    ):
        check_rms_norm_scale(device, dtype, b, s, d, tol, seed)
        check_gated_rms_residual(device, dtype, b, s, d, tol, seed)
        check_silu_and_mul(device, dtype, b, s, int(d / 3 * 8), tol, seed)


def run_all(device: str, dtype: torch.dtype, tol: float, sizes: str = "small") -> None:
    for seed, (b, s, d) in enumerate(
        [(1, 7, 48), (2, 33, 96), (2, 5, 3072)] if sizes == "small" else [(1, 4608, 3072), (2, 4096, 3072)]
    ):
        check_layer_norm_modulate(device, dtype, b, s, d, tol, seed)
        check_layer_norm_affine(device, dtype, b, s, d, tol, seed)
        check_gated_residual(device, dtype, b, s, d, tol, seed)
        check_gelu_tanh(device, dtype, b, s, d, tol, seed)
    if sizes == "small":
        run_zimage(device, dtype, tol)
    shapes = (
        [(1, 3, 5, 3, 16), (2, 4, 9, 2, 32), (1, 2, 6, 24, 128)]
        if sizes == "small"
        else [(1, 512, 4096, 24, 128), (2, 512, 4096, 24, 128)]
    )
    for seed, (b, st, si, h, d) in enumerate(shapes):
        check_rms_norm_rope(device, dtype, b, st, si, h, d, tol, seed)
    for seed, (rows, cols) in enumerate([(3, 48), (17, 3072)] if sizes == "small" else [(4608, 3072), (4096, 15360)]):
        check_quantize_rows(device, dtype, rows, cols, seed)
    for seed, (b, s, d, ffn) in enumerate(
        # on CUDA 2 × 8,200 rows: the LayerNorms' launch for many rows (LN_MANY_ROWS), 4,096: for few
        [(1, 3, 48, 96), (2, 3, 5120, 3000)] if sizes == "small" else [(1, 4096, 5120, 13824), (2, 8200, 5120, 3072)]
    ):
        check_quantized_outputs(device, dtype, b, s, d, ffn, seed)
    check_layer_norm_affine(device, dtype, 2, 3 if sizes == "small" else 8200, 5120, tol, 0)  # Wan 14B's width
    check_residual_layer_norms(device, dtype, 2, 3 if sizes == "small" else 8200, 5120 if sizes == "small" else 1536, 0)
    check_residual_layer_norms(device, dtype, 1, 5, 96, 1)
    if sizes != "small":
        check_layer_norm_modulate(device, dtype, 1, 16400, 5120, tol, 0)  # the launch for many rows
    wan_shapes = [(1, 5, 4, 16), (2, 9, 12, 32), (1, 3, 40, 128)] if sizes == "small" else [(1, 4096, 40, 128)]
    for seed, (b, s, h, d) in enumerate(wan_shapes):
        check_rms_norm_across_heads_rope(device, dtype, b, s, h, d, tol, seed)
    # the launch for many tokens, heads in chunks of 8 (40: five whole; 12: the second half empty), forced small
    many_tokens = k.ACROSS_HEADS_MANY_TOKENS
    k.ACROSS_HEADS_MANY_TOKENS = 1
    try:
        for seed, (b, s, h, d) in enumerate([(1, 3, 40, 128), (2, 5, 12, 128)]):
            check_rms_norm_across_heads_rope(device, dtype, b, s, h, d, tol, seed + 7)
    finally:
        k.ACROSS_HEADS_MANY_TOKENS = many_tokens
    copies = (
        [(1, 5, 2, 1, 3, 16), (2, 6, 4, 2, 1, 32), (1, 3, 3, 2, 2, 128)]
        if sizes == "small"
        else [(1, 1152, 4, 2, 3, 128), (2, 2304, 2, 2, 6, 128)]
    )
    for seed, shape in enumerate(copies):
        check_copy_rows(device, dtype, shape, seed)
    attentions = (
        [(1, 200, 200, 2, 32), (2, 130, 77, 1, 64)]  # keys off the 64/128-key tiles
        if sizes == "small"
        else [(1, 4608, 4608, 24, 128), (1, 8190, 8190, 8, 128), (2, 1024, 512, 4, 64)]
    )
    for seed, shape in enumerate(attentions):
        check_fp8_attention(device, dtype, *shape, seed)
        check_cudnn_fp8_attention(device, dtype, *shape, seed)


if __name__ == "__main__":
    run_all("cpu", torch.float32, 1e-5)
    run_all("cpu", torch.bfloat16, 1e-2)
    print("kernel checks passed")
    sys.exit(0)
