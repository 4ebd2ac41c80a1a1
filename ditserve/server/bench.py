"""`ditserve bench-serve`: N image requests against a running server, at a fixed concurrency or arrival rate.

Reports throughput and latency percentiles as a table (and JSON with --json). Seeds differ per request, so a
server cannot answer from a cache; all requests share one size and settings, so a batching server can batch them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server base URL")
    p.add_argument("--num-requests", type=int, default=32)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--concurrency", type=int, default=None, help="requests in flight at once (default 8)")
    group.add_argument("--rate", type=float, default=None, help="requests per second, Poisson arrivals")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the model's")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--prompt", default="a photo of a red fox in the snow")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent first, one at a time")
    p.add_argument("--label", default="", help="a name for this run, shown in the table")
    p.add_argument("--json", default=None, help="also write the results to this file")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def run_bench_serve(ns: argparse.Namespace) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    concurrency = ns.concurrency if ns.concurrency is not None else (None if ns.rate else 8)

    def body(i: int) -> dict:
        b = {"prompt": f"{ns.prompt} #{i}", "size": ns.size, "n": ns.n, "seed": i, "response_format": "b64_json"}
        if ns.num_inference_steps is not None:
            b["num_inference_steps"] = ns.num_inference_steps
        return b

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=max(concurrency or 0, 64))
    async with httpx.AsyncClient(base_url=ns.url, headers=headers, timeout=ns.timeout, limits=limits) as client:
        health = await client.get("/health")
        if health.status_code != 200:
            raise SystemExit(f"bench-serve: {ns.url}/health answered {health.status_code}: {health.text}")
        for i in range(ns.warmup):
            await client.post("/v1/images/generations", json=body(10**9 + i))

        async def one(i: int) -> None:
            start = time.perf_counter()
            try:
                r = await client.post("/v1/images/generations", json=body(i))
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                return
            latencies.append(time.perf_counter() - start)
            batch_sizes.append(r.json().get("batch_size", 1))

        start = time.perf_counter()
        if concurrency is not None:
            sem = asyncio.Semaphore(concurrency)

            async def limited(i: int) -> None:
                async with sem:
                    await one(i)

            await asyncio.gather(*(limited(i) for i in range(ns.num_requests)))
        else:
            rng = random.Random(0)
            tasks = []
            for i in range(ns.num_requests):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(rng.expovariate(ns.rate))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        info = (await client.get("/server_info")).json()
    done = len(latencies)
    return {
        "label": ns.label,
        "model": (info.get("model") or {}).get("name"),
        "max_batch_size": info.get("max_batch_size"),
        "size": ns.size,
        "steps": ns.num_inference_steps,
        "requests": ns.num_requests,
        "concurrency": concurrency,
        "rate": ns.rate,
        "succeeded": done,
        "failed": ns.num_requests - done,
        "errors": errors,
        "duration_s": duration,
        "throughput_rps": done / duration if duration else 0.0,
        "images_per_s": done * ns.n / duration if duration else 0.0,
        "latency_mean_s": sum(latencies) / done if done else float("nan"),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p90_s": percentile(latencies, 90),
        "latency_p99_s": percentile(latencies, 99),
        "mean_batch_size": sum(batch_sizes) / len(batch_sizes) if batch_sizes else float("nan"),
    }


def format_row(r: dict) -> str:
    load = f"c={r['concurrency']}" if r["concurrency"] is not None else f"rate={r['rate']}/s"
    return (
        f"| {r['label'] or '-'} | {r['model']} | {r['size']} | {r['steps'] or 'default'} | {r['max_batch_size']} | "
        f"{load} | {r['succeeded']}/{r['requests']} | {r['throughput_rps']:.3f} | {r['latency_p50_s']:.2f} | "
        f"{r['latency_p90_s']:.2f} | {r['latency_p99_s']:.2f} | {r['mean_batch_size']:.2f} |"
    )


HEADER = (
    "| run | model | size | steps | max batch | load | ok | req/s | p50 s | p90 s | p99 s | mean batch |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def print_report(report: dict, json_path: str | None = None) -> None:
    print(HEADER)
    print(format_row(report))
    if report["errors"]:
        print(f"errors: {report['errors']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
