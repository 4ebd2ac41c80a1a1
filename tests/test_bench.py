"""`ditserve bench` runs end to end on a tiny model (CPU) and writes a complete report."""

from __future__ import annotations

import json
import subprocess
import sys


def run_bench(tiny_dev, out, *extra: str) -> subprocess.CompletedProcess:
    """`ditserve bench` on the tiny model on the CPU at 32², writing its report to `out`."""
    args = ["--model", str(tiny_dev), "--device", "cpu", "--height", "32", "--width", "32", "--repeat", "1"]
    return subprocess.run(
        [sys.executable, "-m", "ditserve", "bench", *args, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_tiny_cpu(tiny_dev, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench(tiny_dev, out, "--load-format", "auto", "--num-inference-steps", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ditserve", "diffusers"}
    for r in report["results"].values():
        assert r["forward_ms"] > 0 and r["step_ms"] > 0 and r["generation_s"] > 0
    # Same weights, same inputs: in float32 the two DiTs agree to rounding.
    assert report["dit_relative_difference"] < 1e-5
    assert "speed-up over diffusers" in proc.stdout


def test_compiled_engine_matches_eager(tiny_dev):
    import numpy as np

    from ditserve import Engine

    kwargs = dict(prompt="x", seed=1, height=32, width=32, num_inference_steps=2, output_type="np")
    eager = Engine.from_pretrained(str(tiny_dev)).generate(**kwargs).images[0]
    compiled = Engine.from_pretrained(str(tiny_dev), compile=True).generate(**kwargs).images[0]
    assert np.abs(eager - compiled).max() < 1e-3


def test_bench_several_ranks_reports_the_speedup_over_one(tiny_dev, tmp_path):
    """--num-gpus on the CPU: gloo ranks; the report holds the parallel run, the 1-rank run and their ratio."""
    out = tmp_path / "bench.json"
    extra = ["--num-inference-steps", "2", "--no-diffusers", "--num-gpus", "2", "--ulysses-degree", "2"]
    proc = run_bench(tiny_dev, out, *extra)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ditserve", "ditserve U2"}
    parallel = report["results"]["ditserve U2"]
    assert parallel["num_gpus"] == 2 and parallel["step_ms"] > 0 and parallel["forward_ms"] is None
    ratio = report["parallel_speedup"]
    assert ratio["mode"] == "ditserve U2"
    assert abs(ratio["step"] - report["results"]["ditserve"]["step_ms"] / parallel["step_ms"]) < 1e-9
    assert "ditserve U2 over one GPU" in proc.stdout
