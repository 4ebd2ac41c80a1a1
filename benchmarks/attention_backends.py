"""Time each attention backend of ditserve.layers.attention at DiT shapes, and check it against the reference.

    python benchmarks/attention_backends.py            # FLUX 1024² (24 heads × 4608 tokens) and 2048²

Prints TFLOP/s per backend (4·B·H·S²·D FLOPs per call) and the relative error against float32 math.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from ditserve.layers.attention import attention, attention_reference

SHAPES = {"flux-1024": (1, 4608, 24, 128), "flux-2048": (1, 16896, 24, 128)}


def main() -> None:
    torch.manual_seed(0)
    for name, (b, s, h, d) in SHAPES.items():
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = attention_reference(q[:, :1024], k, v).float() if s <= 4608 else None
        flops = 4 * b * h * s * s * d
        for backend in ("sdpa", "cudnn", "flash", "efficient"):
            try:
                out = attention(q, k, v, backend)
            except RuntimeError as e:
                print(f"{name:10} {backend:10} unavailable: {str(e).splitlines()[0][:80]}")
                continue
            err = ""
            if ref is not None:
                err = f"rel err {((out[:, :1024].float() - ref).norm() / ref.norm()).item():.2e}"
            ms = do_bench(lambda q=q, k=k, v=v, backend=backend: attention(q, k, v, backend), warmup=25, rep=100)
            print(f"{name:10} {backend:10} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s {err}")


if __name__ == "__main__":
    main()
