"""Every Triton kernel against its torch reference: on the CPU through Triton's interpreter, and on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")


def test_kernels_match_reference_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DITSERVE_DISABLE_TRITON", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kernel_checks.py"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernel checks passed" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", ["small", "flux"])
def test_kernels_match_reference_cuda_bf16(sizes):
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_checks import run_all

    run_all("cuda", torch.bfloat16, 1e-2, sizes)
    run_all("cuda", torch.float32, 1e-5, sizes)


@pytest.mark.gpu
def test_zimage_kernels_match_reference_cuda_bf16():
    """rms_norm_scale, gated_rms_residual (gated and not) and silu_and_mul at Z-Image-Turbo's 1024² sizes, batch 1
    and 2: close to the float64 references, and in bf16 rounded as the unfused ops the model ran before."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_checks import run_zimage

    run_zimage("cuda", torch.bfloat16, 1e-2, "full")
    run_zimage("cuda", torch.float32, 1e-5, "full")
