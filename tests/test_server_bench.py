"""`ditserve bench-serve` against a live server: it reports every request, and the percentiles are right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ditserve.server.bench import percentile
from ditserve.server.launch import start_server


def test_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0


def test_bench_serve_reports_throughput_and_latency(tiny_dev, tmp_path):
    """Both load modes (a fixed number in flight; a Poisson arrival rate) against one server."""
    server = start_server(str(tiny_dev), "--max-batch-size", "4", log_path=str(tmp_path / "server.log"))
    try:
        for n, load in enumerate((["--concurrency", "4"], ["--rate", "20"]), start=1):
            out = tmp_path / f"bench-{n}.json"
            proc = subprocess.run(
                [
                    sys.executable, "-m", "ditserve", "bench-serve", "--url", server.url, "--num-requests", "6",
                    "--size", "32x32", "--num-inference-steps", "2", "--label", "cpu-tiny", "--json", str(out), *load,
                ],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            report = json.loads(out.read_text())
            assert report["succeeded"] == 6 and report["failed"] == 0, load
            assert report["throughput_rps"] > 0
            assert 0 < report["latency_p50_s"] <= report["latency_p90_s"] <= report["latency_p99_s"]
            assert "| cpu-tiny |" in proc.stdout and "p99 s" in proc.stdout
            # the requests plus one warm-up per run, none lost or repeated
            assert server.info()["completed"] == n * (6 + 1), load
    finally:
        server.stop()


def test_bench_serve_fails_cleanly_without_a_server(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ditserve", "bench-serve", "--url", "http://127.0.0.1:9", "--num-requests", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
