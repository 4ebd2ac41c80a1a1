"""Time the sparse attention backends against cuDNN's dense attention at Wan's shapes, and measure their error.

    python benchmarks/sparse_attention.py                 # Wan 720p × 81 frames: 75,600 tokens, 40 heads, head 128
    python benchmarks/sparse_attention.py --shape wan-480p --json out.json

For each backend: milliseconds per call (triton's do_bench), speed-up over cuDNN dense, and the relative error
(‖out − dense‖ / ‖dense‖) against dense attention on the same inputs. Inputs are random (bf16 normal q, k, v), so
attention is nearly uniform over the keys and every sparse pattern drops much of each row's softmax mass: the error
against dense says how the kernels behave at size, not what they do to a trained model's video (RESULTS.md). SLA's
own error is also given against its plain-torch reference on the first query rows (the reference's mask is N² per
head; it runs on a slice of the heads).
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from ditserve.layers.attention import attention
from ditserve.layers.sparse_attention import (
    SLA,
    SlidingTile,
    sla_attention,
    sliding_tile_attention,
    sliding_tile_density,
)

# (frames, rows, columns) token grids of Wan's latents (VAE 4× in time, 8× in space; patches 1 × 2 × 2) and heads
SHAPES = {
    "wan-720p": ((21, 45, 80), 40),  # 1280 × 720, 81 frames: 75,600 tokens; Wan2.1 14B's 40 heads
    "wan-480p": ((21, 30, 52), 40),  # 832 × 480, 81 frames: 32,760 tokens
    "wan-1.3b-480p": ((21, 30, 52), 12),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="wan-720p", choices=sorted(SHAPES))
    parser.add_argument("--sla-topk", default="0.05,0.1,0.15", help="SLA's key-block ratios to time")
    parser.add_argument("--windows", default="3,3,5;3,5,7;5,5,9", help="sliding-tile windows (in tiles) to time")
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

    for window_text in args.windows.split(";"):
        window = tuple(int(x) for x in window_text.split(","))
        pattern = SlidingTile(window)  # type: ignore[arg-type]
        out = sliding_tile_attention(q, k, v, grid, pattern)
        ms = do_bench(lambda p=pattern: sliding_tile_attention(q, k, v, grid, p), warmup=10, rep=50)
        density = sliding_tile_density(grid, window)  # type: ignore[arg-type]
        row = dict(backend=f"sliding-tile:{window_text}", ms=ms, speedup=dense_ms / ms, density=density)
        row.update(tflops=density * flops / ms / 1e9, rel_err_vs_dense=rel(out, dense))
        rows.append(row)
        print(
            f"{row['backend']:24} {ms:9.2f} ms {dense_ms / ms:6.2f}×  {row['tflops']:6.1f} TFLOP/s (computed pairs)"
            f"  density {density:.3f}  rel err vs dense {row['rel_err_vs_dense']:.3f}"
        )

    projection = torch.nn.Linear(128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        projection.weight.normal_(0, 0.02)
        projection.bias.zero_()
        for topk_text in args.sla_topk.split(","):
            pattern = SLA(float(topk_text))
            out = sla_attention(q, k, v, pattern, projection)
            ms = do_bench(lambda p=pattern: sla_attention(q, k, v, p, projection), warmup=10, rep=50)
            # against its own plain-torch reference on 2 heads and the first 8192 tokens
            qs, ks, vs = (t[:, :8192, :2].contiguous() for t in (q, k, v))
            ref_err = rel(
                sla_attention(qs, ks, vs, pattern, projection),
                sla_attention(qs, ks, vs, pattern, projection, reference=True),
            )
            row = dict(backend=f"sla:{topk_text}", ms=ms, speedup=dense_ms / ms, rel_err_vs_dense=rel(out, dense))
            row["rel_err_vs_reference"] = ref_err
            rows.append(row)
            print(
                f"{row['backend']:24} {ms:9.2f} ms {dense_ms / ms:6.2f}×  rel err vs dense {row['rel_err_vs_dense']:.3f}"
                f"  vs its torch reference {ref_err:.2e}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, tokens=n, heads=heads, grid=grid, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
