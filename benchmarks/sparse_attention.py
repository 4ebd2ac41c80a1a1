"""Time the sparse attention backends against cuDNN's dense attention at Wan's shapes, and measure their error.

    python benchmarks/sparse_attention.py                 # Wan 720p × 81 frames: 75,600 tokens, 40 heads, head 128
    python benchmarks/sparse_attention.py --shape wan-480p --json out.json

For each backend: milliseconds per call (triton's do_bench), speed-up over cuDNN dense, and the relative error
(‖out − dense‖ / ‖dense‖) against dense attention on the same inputs. SLA and VSA also get a breakdown of their
parts (CUDA events, the mean of several calls of each part alone), the kernel's time at its untuned default config
beside the autotuned one, and the config autotuning chose. Inputs are random (bf16 normal q, k, v), so
attention is nearly uniform over the keys and every sparse pattern drops much of each row's softmax mass: the error
against dense says how the kernels behave at size, not what they do to a trained model's video (RESULTS.md). SLA's
and VSA's own errors are also given against their plain-torch references on the first tokens (the reference's
mask is N² per head; it runs on a slice of the heads).
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from ditserve.accel.fp8 import has_fp8_tensor_cores
from ditserve.kernels.block_sparse_attention import (
    GatedCoarse,
    LinearBranch,
    block_sparse_attention,
    default_config,
    tuned_configs,
)
from ditserve.kernels.fp8_attention import quantize_heads
from ditserve.layers.attention import attention
from ditserve.layers.sparse_attention import (
    LINEAR_EPS,
    SLA,
    SLA_KEY_BLOCK,
    SLA_QUERY_BLOCK,
    VSA,
    SlidingTile,
    _runs,
    sla_attention,
    sla_block_map,
    sla_key_statistics,
    sliding_tile_attention,
    sliding_tile_density,
    tile_layout,
    vsa_attention,
    vsa_coarse,
)

# (frames, rows, columns) token grids of Wan's latents (VAE 4× in time, 8× in space; patches 1 × 2 × 2) and heads
SHAPES = {
    "wan-720p": ((21, 45, 80), 40),  # 1280 × 720, 81 frames: 75,600 tokens; Wan2.1 14B's 40 heads
    "wan-480p": ((21, 30, 52), 40),  # 832 × 480, 81 frames: 32,760 tokens
    "wan-1.3b-480p": ((21, 30, 52), 12),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def event_ms(fn, reps: int = 5) -> float:
    """Mean milliseconds of fn() over `reps` calls after one warm-up call, timed with CUDA events."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def newly_tuned(before: dict) -> list[dict]:
    """The configs autotuning chose since `before` (a `tuned_configs()`), as plain dicts, with the median ms of
    every config timed in the last tuning (Triton's autotuner keeps those of its last key only)."""
    from ditserve.kernels import block_sparse_attention as kernel

    chosen = [dict(key=[str(x) for x in key], **vars(c)) for key, c in tuned_configs().items() if key not in before]
    timings = getattr(kernel._tuned_kernel, "configs_timings", None) or {}
    if chosen:
        chosen[-1]["timings_ms"] = {
            f"block_n={c.kwargs['BLOCK_N']},warps={c.num_warps},stages={c.num_stages}": (
                t[0] if isinstance(t, list) else t
            )
            for c, t in timings.items()
        }
    return chosen


def sla_breakdown(q, k, v, pattern: SLA, projection) -> dict:
    """SLA's parts timed alone: the block map (pooling, scores, top-k), the linear branch's key statistics (one pass
    over k and v, the projection folded in), the kernel with its linear epilogue (autotuned, and at the default
    config), the kernel without the epilogue, the kernel reading the key blocks from tables."""
    n = q.shape[1]
    lut, counts = sla_block_map(q, k, pattern.topk)
    q_blocks, kv_blocks = _runs(n, SLA_QUERY_BLOCK, q.device), _runs(n, SLA_KEY_BLOCK, q.device)
    linear = LinearBranch(*sla_key_statistics(k, v, projection), LINEAR_EPS)
    # as sla_attention launches it: key blocks as runs, every LUT row full (the kernel reads no tables)
    blocks = (q, k, v, q_blocks, None, lut, None, None, None, SLA_QUERY_BLOCK, SLA_KEY_BLOCK)
    fp8 = pattern.fp8
    block_sparse_attention(*blocks, linear, fp8=fp8)
    # tuning keys: D, BLOCK_M, MAX_KV_LEN, MAX_COUNT, HAS_ORDER, RUNS, FULL, EPILOGUE, FP8, ...
    tuned = [
        c for key, c in tuned_configs().items() if key[7] == 1 and key[3] == lut.shape[-1] and key[8] == fp8 and key[5]
    ]
    chosen = tuned[0] if tuned else default_config(SLA_QUERY_BLOCK)
    parts = dict(
        block_map_ms=event_ms(lambda: sla_block_map(q, k, pattern.topk)),
        key_statistics_ms=event_ms(lambda: sla_key_statistics(k, v, projection)),
        kernel_ms=event_ms(lambda: block_sparse_attention(*blocks, linear, fp8=fp8)),
        kernel_default_config_ms=event_ms(
            lambda: block_sparse_attention(*blocks, linear, config=default_config(SLA_QUERY_BLOCK), fp8=fp8)
        ),
        # at the config tuned for the kernel with the epilogue, so the difference is the epilogue's cost
        kernel_without_linear_ms=event_ms(lambda: block_sparse_attention(*blocks, config=chosen, fp8=fp8)),
        # the same launch reading the key blocks' bounds and the counts from tables (the general path)
        kernel_with_tables_ms=event_ms(
            lambda: block_sparse_attention(
                *blocks[:4], kv_blocks, lut, counts, *blocks[7:], linear, config=chosen, fp8=fp8
            )
        ),
    )
    if fp8:  # the kernel times above include rounding q, k and v to e4m3
        parts["quantize_ms"] = event_ms(lambda: quantize_heads(q, k, v, q.shape[-1] ** -0.5))
    return parts


def vsa_breakdown(q, k, v, gate, grid, pattern: VSA) -> dict:
    """VSA's parts timed alone: the coarse stage (cube means, dense coarse attention, top-k) and the fine kernel
    with its gated epilogue (autotuned, and at the default config)."""
    layout = tile_layout(tuple(grid), (1, 1, 1), q.device, (4, 4, 4))
    lut, counts, coarse = vsa_coarse(q, k, v, grid, pattern.sparsity)
    cubes = (layout.starts, layout.lengths)
    blocks = (
        q,
        k,
        v,
        cubes,
        cubes,
        lut,
        counts,
        layout.order,
        None,
        layout.block,
        layout.block,
        GatedCoarse(gate, coarse),
    )
    return dict(
        coarse_ms=event_ms(lambda: vsa_coarse(q, k, v, grid, pattern.sparsity)),
        kernel_ms=event_ms(lambda: block_sparse_attention(*blocks)),
        kernel_default_config_ms=event_ms(lambda: block_sparse_attention(*blocks, config=default_config(layout.block))),
        cube_share=counts.float().mean().item() / coarse.shape[2],  # key cubes chosen per query cube
    )


def fmt(parts: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in parts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="wan-720p", choices=sorted(SHAPES))
    parser.add_argument("--sla-topk", default="0.05,0.1,0.15", help="SLA's key-block ratios to time")
    parser.add_argument(
        "--sla-fp8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time sla-fp8 beside sla at each ratio (default: on GPUs with FP8 tensor cores)",
    )
    parser.add_argument("--windows", default="3,3,5;3,5,7;5,5,9", help="sliding-tile windows (in tiles) to time")
    parser.add_argument("--vsa-sparsity", default="0.8", help="VSA's sparsities to time ('' for none)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    grid, heads = SHAPES[args.shape]
    n = grid[0] * grid[1] * grid[2]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = attention(q, k, v, "cudnn")
    dense_ms = do_bench(lambda: attention(q, k, v, "cudnn"), warmup=10, rep=50)
    flops = 4 * heads * n * n * 128
    rows = [dict(backend="cudnn", ms=dense_ms, speedup=1.0, tflops=flops / dense_ms / 1e9, rel_err_vs_dense=0.0)]
    print(f"{args.shape}: {n} tokens, {heads} heads, head 128, grid {grid}")
    print(f"{'cudnn':24} {dense_ms:9.2f} ms   1.00×  {flops / dense_ms / 1e9:6.1f} TFLOP/s")

    for window_text in filter(None, args.windows.split(";")):
        window = tuple(int(x) for x in window_text.split(","))
        pattern = SlidingTile(window)  # type: ignore[arg-type]
        before = tuned_configs()
        out = sliding_tile_attention(q, k, v, grid, pattern)
        ms = do_bench(lambda p=pattern: sliding_tile_attention(q, k, v, grid, p), warmup=10, rep=50)
        density = sliding_tile_density(grid, window)  # type: ignore[arg-type]
        row = dict(backend=f"sliding-tile:{window_text}", ms=ms, speedup=dense_ms / ms, density=density)
        row.update(tflops=density * flops / ms / 1e9, rel_err_vs_dense=rel(out, dense), tuned=newly_tuned(before))
        rows.append(row)
        print(
            f"{row['backend']:24} {ms:9.2f} ms {dense_ms / ms:6.2f}×  {row['tflops']:6.1f} TFLOP/s (computed pairs)"
            f"  density {density:.3f}  rel err vs dense {row['rel_err_vs_dense']:.3f}"
        )

    projection = torch.nn.Linear(128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        projection.weight.normal_(0, 0.02)
        projection.bias.zero_()
        fp8_cores = has_fp8_tensor_cores(q.device)
        variants = (False, True) if (fp8_cores if args.sla_fp8 is None else args.sla_fp8) else (False,)
        for topk_text, fp8 in [(t, f) for t in filter(None, args.sla_topk.split(",")) for f in variants]:
            pattern = SLA(float(topk_text), fp8=fp8)
            before = tuned_configs()
            out = sla_attention(q, k, v, pattern, projection)
            ms = do_bench(lambda p=pattern: sla_attention(q, k, v, p, projection), warmup=10, rep=50)
            # against its own plain-torch reference on 2 heads and the first 8192 tokens
            qs, ks, vs = (t[:, :8192, :2].contiguous() for t in (q, k, v))
            ref_err = rel(
                sla_attention(qs, ks, vs, pattern, projection),
                sla_attention(qs, ks, vs, pattern, projection, reference=True),
            )
            name = f"sla-fp8:{topk_text}" if fp8 else f"sla:{topk_text}"
            row = dict(backend=name, ms=ms, speedup=dense_ms / ms, rel_err_vs_dense=rel(out, dense))
            row["rel_err_vs_reference"] = ref_err
            row.update(tuned=newly_tuned(before), breakdown=sla_breakdown(q, k, v, pattern, projection))
            rows.append(row)
            print(
                f"{row['backend']:24} {ms:9.2f} ms {dense_ms / ms:6.2f}×  rel err vs dense {row['rel_err_vs_dense']:.3f}"
                f"  vs its torch reference {ref_err:.2e}"
            )
            print(f"{'':24} parts (ms): {fmt(row['breakdown'])}  tuned: {row['tuned']}")
        gate = torch.randn_like(q)
        for sparsity_text in filter(None, args.vsa_sparsity.split(",")):
            pattern = VSA(float(sparsity_text))
            before = tuned_configs()
            out = vsa_attention(q, k, v, gate, grid, pattern)
            ms = do_bench(lambda p=pattern: vsa_attention(q, k, v, gate, grid, p), warmup=10, rep=50)
            # against its plain-torch reference on 2 heads and the first 2 frames
            f2 = min(2, grid[0])
            m = f2 * grid[1] * grid[2]
            qs, ks, vs, gs = (t[:, :m, :2].contiguous() for t in (q, k, v, gate))
            sub = (f2, grid[1], grid[2])
            ref_err = rel(
                vsa_attention(qs, ks, vs, gs, sub, pattern), vsa_attention(qs, ks, vs, gs, sub, pattern, True)
            )
            row = dict(backend=f"vsa:{sparsity_text}", ms=ms, speedup=dense_ms / ms, rel_err_vs_dense=rel(out, dense))
            row["rel_err_vs_reference"] = ref_err
            row.update(tuned=newly_tuned(before), breakdown=vsa_breakdown(q, k, v, gate, grid, pattern))
            rows.append(row)
            print(
                f"{row['backend']:24} {ms:9.2f} ms {dense_ms / ms:6.2f}×  rel err vs dense {row['rel_err_vs_dense']:.3f}"
                f"  vs its torch reference {ref_err:.2e}"
            )
            print(f"{'':24} parts (ms): {fmt(row['breakdown'])}  tuned: {row['tuned']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, tokens=n, heads=heads, grid=grid, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
