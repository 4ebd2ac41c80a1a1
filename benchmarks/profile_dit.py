"""Profile one DiT forward of any preset (ours, and diffusers' over the same dummy weights and inputs) and print where
CUDA time goes, as the family's pipeline feeds it (`Pipeline.forward_inputs`): the kernels taking the most time, and
the forward's kernel time by kind (GEMM, attention, FP8 quantisation, normalisation/RoPE, elementwise, copies).

python benchmarks/profile_dit.py [--model flux.1-dev] [--size 1024 | --height H --width W] [--num-frames N]
    [--attention-backend cudnn sla:0.1 ...] [--quantization fp8] [--cuda-graph] [--no-diffusers] [--rows 25]
    [--json out.json]

Each attention backend is profiled in turn on the same weights; with `--quantization fp8` ours is profiled after
its linears are quantised in place (diffusers' forward, if asked for, runs before that, on the bf16 weights).
`--cuda-graph`: ours replayed from a CUDA graph (the kernels without launch gaps; the wall time is the graph's).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch.profiler import ProfilerActivity, profile

from ditserve import Engine
from ditserve.layers.attention import set_attention_backend

# Kernel kinds, first match wins: (kind, pattern over the kernel's name, lower case)
KINDS = (
    ("attention", r"attention|attn|fmha|flash|cudnn|sdpa|_block_sparse|sage"),
    ("fp8 quantise", r"quantiz|_quant|fp8"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|cublas|sm90_|sm100_|_mm_|matmul|splitk"),
    ("norm / rope", r"norm|rope|rotary|modulat"),
    ("copy / cat", r"copy|cat|memcpy|memset|transpose|gather|scatter|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|silu|swiglu|residual|reduce|softmax"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def profiled(fn, rows: int) -> dict:
    """One profiled call of fn after three warm-ups: kernel table, time by kind, wall ms (CUDA events)."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        wall_ms = start.elapsed_time(end)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if us <= 0 or event.key.startswith(("ProfilerStep", "aten::", "cudaGraph")):
            continue
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + us / 1000
        kernels.append((us / 1000, event.count, kind, event.key))
    kernels.sort(reverse=True)
    return dict(
        wall_ms=wall_ms,
        kernel_ms=sum(by_kind.values()),
        by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        top=[dict(ms=ms, calls=n, kind=k, name=name[:120]) for ms, n, k, name in kernels[:rows]],
    )


def show(label: str, result: dict) -> None:
    print(f"==== {label}: wall {result['wall_ms']:.1f} ms, kernels {result['kernel_ms']:.1f} ms")
    for kind, ms in result["by_kind"].items():
        print(f"  {kind:<14} {ms:9.2f} ms  {100 * ms / result['kernel_ms']:5.1f} %")
    print(f"  {'ms':>9} {'calls':>6}  kind            kernel")
    for row in result["top"]:
        print(f"  {row['ms']:9.2f} {row['calls']:6d}  {row['kind']:<14}  {row['name'][:100]}")


def profile_ours(ours, inputs: dict, device, quantization: str, backend: str, ns, results: dict) -> None:
    set_attention_backend(ours, backend, device)
    fn = lambda: ours(**inputs)  # noqa: E731
    if ns.cuda_graph:
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # autotuning and lazy init outside the capture
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        fn = graph.replay
    label = (
        f"ditserve {'bf16' if quantization == 'none' else quantization} {backend}{' graphed' if ns.cuda_graph else ''}"
    )
    results[label] = profiled(fn, ns.rows)
    show(label, results[label])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux.1-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--height", type=int, help="default: --size")
    ap.add_argument("--width", type=int, help="default: --size")
    ap.add_argument("--num-frames", type=int, help="video models: default the model's")
    ap.add_argument("--attention-backend", nargs="+", default=["auto"], help="ours, each profiled in turn")
    ap.add_argument(
        "--quantization",
        nargs="+",
        choices=["none", "fp8"],
        default=["none"],
        help="ours in each, in this order (fp8: the linears quantised in place, so it comes last)",
    )
    ap.add_argument("--cuda-graph", action="store_true", help="replay our forward from a CUDA graph")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--json", help="write every result here too")
    ns = ap.parse_args()
    engine = Engine.from_pretrained(
        ns.model,
        load_format="dummy",
        device="cuda",
        cuda_graphs=False,
        text_encoder_cpu_offload=True,
        image_encoder_cpu_offload=True,
        vae_cpu_offload=True,
    )
    pipeline = engine.pipeline
    ours = next(iter(pipeline.transformers().values()))
    size = {"num_frames": ns.num_frames} if ns.num_frames else {}
    inputs = pipeline.forward_inputs(ns.height or ns.size, ns.width or ns.size, **size)
    results: dict[str, dict] = {}
    if not ns.no_diffusers:
        theirs = pipeline.diffusers_pipeline().transformer
        their_inputs = pipeline.diffusers_forward_inputs(inputs)
        results["diffusers eager"] = profiled(lambda: theirs(**their_inputs, return_dict=False), ns.rows)
        show("diffusers eager", results["diffusers eager"])
        del theirs
        torch.cuda.empty_cache()
    for quantization in ns.quantization:
        if quantization == "fp8":
            from ditserve.accel.fp8 import check_fp8_device, quantize_dit

            check_fp8_device(engine.device)
            quantize_dit(ours)
        for backend in ns.attention_backend:
            profile_ours(ours, inputs, engine.device, quantization, backend, ns, results)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(dict(model=ns.model, size=[ns.height or ns.size, ns.width or ns.size, ns.num_frames],
                           results=results), f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
