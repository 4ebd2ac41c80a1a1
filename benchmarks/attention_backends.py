"""Time each attention backend of ditserve.layers.attention at DiT shapes, and check it against cuDNN and the
reference.

    python benchmarks/attention_backends.py            # FLUX 1024², 2048², Wan 480p×81, 720p×81; every dense backend
    python benchmarks/attention_backends.py --shapes flux-1024,wan-480p-81 --backends cudnn,flash,sage --json a.json

Prints per backend and shape: milliseconds and TFLOP/s (4·B·H·S²·D FLOPs per call), the relative L2 difference from
cuDNN's output over every query (flash's is what two correct bf16 kernels disagree by), and from float32 math over
the first 512 queries. A backend that cannot run (sage without its package) is reported as unavailable.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from ditserve.layers.attention import attention, attention_reference

# [B, S, H, D] of one self-attention: FLUX.1 at 1024² (4096 image + 512 text tokens) and 2048², Wan2.1-14B at
# 832×480 × 81 frames (21 × 30 × 52 latent tokens).
SHAPES = {
    "flux-1024": (1, 4608, 24, 128),
    "flux-2048": (1, 16896, 24, 128),
    "wan-480p-81": (1, 32760, 40, 128),
    "wan-720p-81": (1, 75600, 40, 128),
}
BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "sage", "fp8", "cudnn-fp8")
REFERENCE_QUERIES = 512


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated: {', '.join(BACKENDS)}")
    ap.add_argument("--json", help="write the rows here too")
    ns = ap.parse_args()
    rows = []
    for name in ns.shapes.split(","):
        b, s, h, d = SHAPES[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * s * s * d
        cudnn = attention(q, k, v, "cudnn")
        ref = attention_reference(q[:, :REFERENCE_QUERIES], k, v)
        for backend in ns.backends.split(","):
            try:
                out = attention(q, k, v, backend)
            except (RuntimeError, ValueError) as e:
                print(f"{name:12} {backend:10} unavailable: {str(e).splitlines()[0][:100]}")
                rows.append(dict(shape=name, backend=backend, unavailable=str(e).splitlines()[0]))
                continue
            ms = do_bench(lambda q=q, k=k, v=v, backend=backend: attention(q, k, v, backend), warmup=25, rep=200)
            row = dict(
                shape=name,
                backend=backend,
                ms=ms,
                tflops=flops / ms / 1e9,
                rel_vs_cudnn=rel(out, cudnn),
                rel_vs_reference=rel(out[:, :REFERENCE_QUERIES], ref),
            )
            rows.append(row)
            print(
                f"{name:12} {backend:10} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s  vs cuDNN {row['rel_vs_cudnn']:.2e}"
                f"  vs float32 {row['rel_vs_reference']:.2e}"
            )
            del out
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
