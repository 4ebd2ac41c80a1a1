"""Serving benchmark: start `ditserve serve` with batching off (max batch 1) and on, load it with bench-serve,
and print the rows for benchmarks/RESULTS.md.

GPU (the issue's runs):
    python benchmarks/serving.py --model flux.1-dev --load-format dummy --size 1024x1024 --steps 28 \
        --num-requests 16 --concurrency 4 --batch-sizes 1 4
    python benchmarks/serving.py --model flux.1-dev --load-format dummy --size 256x256 --steps 28 \
        --num-requests 64 --concurrency 16 --batch-sizes 1 8
CPU smoke run (tiny random model):
    python benchmarks/serving.py --size 64x64 --steps 4 --num-requests 24 --concurrency 8 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from ditserve.server.bench import HEADER, add_bench_flags, format_row, run_bench_serve
from ditserve.server.launch import start_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per request (default: the model's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="--max-batch-size of each server run")
    p.add_argument("--out", default=None, help="append the JSON reports to this file")
    add_bench_flags(p)
    ns = p.parse_args()
    ns.num_inference_steps = ns.steps
    reports = []
    for batch in ns.batch_sizes:
        extra = ["--load-format", ns.load_format, "--max-batch-size", str(batch)]
        if ns.device:
            extra += ["--device", ns.device]
        with tempfile.TemporaryDirectory() as tmp:
            server = start_server(ns.model, *extra, log_path=str(Path(tmp) / "server.log"), ready_timeout=1800)
            try:
                ns.url, ns.label = server.url, f"max batch {batch}"
                reports.append(asyncio.run(run_bench_serve(ns)))
            finally:
                server.stop()
    print(HEADER)
    for report in reports:
        print(format_row(report))
    if len(reports) > 1 and reports[0]["throughput_rps"]:
        print(f"throughput, last vs first: {reports[-1]['throughput_rps'] / reports[0]['throughput_rps']:.2f}x")
    if ns.out:
        with open(ns.out, "a") as f:
            for report in reports:
                f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
