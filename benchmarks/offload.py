"""Offload beside no offload and beside diffusers' offloads, on one GPU, in one run (dummy weights at real size).

    # one DiT forward: ours resident, ours with layerwise offload at each prefetch size, diffusers' group offload
    python benchmarks/offload.py forward --model wan2.1-t2v-14b --height 480 --width 832 --num-frames 81
    # whole generations: each of our offload settings, diffusers' group offload and enable_model_cpu_offload
    python benchmarks/offload.py pipeline --model flux.1-dev --height 1024 --width 1024

The forward mode keeps the text encoders and VAE on the host (they are not part of the forward), so the peak it
reports is what the DiT needs: its resident parts, the ring of block slots and the activations. Peaks are
torch.cuda.max_memory_allocated over the timed call. Prints a table to paste into benchmarks/RESULTS.md and can write
JSON (--json).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time

import torch

from ditserve import Engine
from ditserve.accel.offload import disable_layerwise_offload, enable_layerwise_offload
from ditserve.bench import _bench_diffusers, _request, _time_calls, _time_generations, forward_peak_gib

_START = time.perf_counter()


def progress(what: str) -> None:
    """Where a long run is, on stderr, with the seconds since the start (a run cut off still says how far it got)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {what}", file=sys.stderr, flush=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def stream_timeline(fn, device: torch.device, trace_path: str | None = None) -> dict:
    """One call of `fn` under torch.profiler; what the GPU's streams did during it.

    The compute stream is the one with the most kernel time. Its gaps (time between one kernel's end and the next
    one's start, from its first kernel to its last) are where it waited: for a launch, or for a copy it depends on.
    Comparing them with the same forward resident says what offload's copies cost the compute stream.
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize(device)
    path = trace_path or "/tmp/offload_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    streams: dict = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        streams.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["cat"]))
    busy = {tid: sum(end - start for start, end, cat in evs if cat == "kernel") for tid, evs in streams.items()}
    if not busy:
        return dict(error="the trace holds no GPU kernels")
    compute = max(busy, key=busy.get)
    kernels = sorted((start, end) for start, end, cat in streams[compute] if cat == "kernel")
    gaps, reach = [], kernels[0][1]
    for start, end in kernels[1:]:
        if start > reach:
            gaps.append(start - reach)
        reach = max(reach, end)
    copies = {
        str(tid): sum(end - start for start, end, cat in evs if cat == "gpu_memcpy") / 1000
        for tid, evs in streams.items()
        if any(cat == "gpu_memcpy" for _, _, cat in evs)
    }
    return dict(
        compute_span_ms=(reach - kernels[0][0]) / 1000,
        compute_kernel_ms=busy[compute] / 1000,
        compute_gap_ms=sum(gaps) / 1000,
        compute_gaps_over_100us=sum(1 for g in gaps if g > 100),
        longest_gap_ms=max(gaps, default=0) / 1000,
        copy_ms_per_stream=copies,
    )


def host_link_gbps(device: torch.device, gib: float = 1.0, repeat: int = 3) -> dict:
    """Pinned host → device and device → host copy rates of one `gib` buffer (best of `repeat`), in GB/s: the bound
    on any offload that moves the weights across the host link every step."""
    numel = int(gib * 2**30) // 2
    host = torch.empty(numel, dtype=torch.bfloat16, pin_memory=True)
    dev = torch.empty(numel, dtype=torch.bfloat16, device=device)
    rates = {}
    for name, dst, src in (("host_to_device", dev, host), ("device_to_host", host, dev)):
        best = float("inf")
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        rates[f"{name}_gbps"] = host.nbytes / best / 1e9
    del host, dev
    return rates


def group_offload(module, device: torch.device) -> None:
    """diffusers' group offload at block level, one block per group, copies on a CUDA stream."""
    module.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",
        non_blocking=device.type == "cuda",
    )


def bench_forward(ns: argparse.Namespace) -> dict:
    engine = Engine.from_pretrained(
        ns.model,
        device=ns.device,
        load_format=ns.load_format,
        compile=ns.compile,
        cuda_graphs=ns.cuda_graphs,
        text_encoder_cpu_offload=True,
        image_encoder_cpu_offload=True,
        vae_cpu_offload=True,
        dit_layerwise_offload=False,
    )
    progress("engine built")
    device, pipeline = engine.device, engine.pipeline
    name, model = next(iter(pipeline.transformers().items()))
    frames = {"num_frames": ns.num_frames} if ns.num_frames else {}
    inputs = pipeline.forward_inputs(ns.height, ns.width, **frames)
    graphs = engine.cuda_graphs.get(name)
    results: dict = {}
    with torch.no_grad():
        reference = model(**inputs).clone()
        results["ditserve resident"] = dict(
            forward_ms=1000 * _time_calls(lambda: model(**inputs), device, iters=ns.iters),
            forward_peak_gib=forward_peak_gib(lambda: model(**inputs), device),
        )
        if ns.timeline:
            results["ditserve resident"]["timeline"] = stream_timeline(lambda: model(**inputs), device)
        r = results["ditserve resident"]
        progress(f"resident: {r['forward_ms']:.1f} ms, peak {fmt(r['forward_peak_gib'], '.2f')} GiB")
        pipe = pipeline.diffusers_pipeline()
        progress("diffusers pipeline built")
        their_inputs = pipeline.diffusers_forward_inputs(inputs)
        dt = pipe.transformer
        dt.to("cpu")  # its own host copy; ours keeps the device tensors
        for prefetch in ns.prefetch:
            enable_layerwise_offload([model], device, prefetch)
            if graphs is not None:
                graphs.reset()
            free(device)
            out = model(**inputs)
            results[f"ditserve layerwise prefetch {prefetch}"] = dict(
                forward_ms=1000 * _time_calls(lambda: model(**inputs), device, iters=ns.iters),
                forward_peak_gib=forward_peak_gib(lambda: model(**inputs), device),
                difference_to_resident=relative_difference(out, reference),
            )
            if ns.timeline:
                trace = f"{ns.timeline}/offload_prefetch{prefetch}.json" if ns.timeline != "-" else None
                results[f"ditserve layerwise prefetch {prefetch}"]["timeline"] = stream_timeline(
                    lambda: model(**inputs), device, trace
                )
            r = results[f"ditserve layerwise prefetch {prefetch}"]
            progress(f"prefetch {prefetch}: {r['forward_ms']:.1f} ms, peak {fmt(r['forward_peak_gib'], '.2f')} GiB")
            del out
            disable_layerwise_offload([model])
            if graphs is not None:
                graphs.reset()
        model.to("cpu")  # diffusers alone on the device now
        free(device)
        group_offload(dt, device)
        progress("diffusers group offload set up")
        ours_alike, out = pipeline.comparable_outputs(reference, dt(**their_inputs, return_dict=False), inputs)
        results["diffusers group offload"] = dict(
            forward_ms=1000 * _time_calls(lambda: dt(**their_inputs, return_dict=False), device, iters=ns.iters),
            forward_peak_gib=forward_peak_gib(lambda: dt(**their_inputs, return_dict=False), device),
            difference_to_resident=relative_difference(out, ours_alike),
        )
    resident = results["ditserve resident"]["forward_ms"]
    for r in results.values():
        r["time_over_resident"] = r["forward_ms"] / resident
    print(f"{'forward':<32} {'ms':>9} {'× resident':>11} {'peak GiB':>9} {'rel. diff':>10}")
    for label, r in results.items():
        diff = r.get("difference_to_resident")
        print(
            f"{label:<32} {r['forward_ms']:>9.1f} {r['time_over_resident']:>11.3f} {fmt(r['forward_peak_gib'], '>9.2f')} "
            f"{'' if diff is None else format(diff, '.1e'):>10}"
        )
        if "timeline" in r and "error" not in r["timeline"]:
            t = r["timeline"]
            print(
                f"    compute stream: span {t['compute_span_ms']:.1f} ms, kernels {t['compute_kernel_ms']:.1f} ms, "
                f"gaps {t['compute_gap_ms']:.1f} ms ({t['compute_gaps_over_100us']} over 100 us, longest "
                f"{t['longest_gap_ms']:.2f} ms); copies per stream (ms) {t['copy_ms_per_stream']}"
            )
    return results


PIPELINE_SETTINGS = {
    "none": {},
    "layerwise": dict(dit_layerwise_offload=True),
    "text encoders": dict(text_encoder_cpu_offload=True),
    "vae": dict(vae_cpu_offload=True),
    "all": dict(dit_layerwise_offload=True, text_encoder_cpu_offload=True, vae_cpu_offload=True),
}


def _pipeline_row(label: str, r: dict) -> str:
    return f"{label:<36} {r['generation_s']:>8.3f} {r['step_ms']:>9.1f} {fmt(r['peak_gib'], '>9.2f')}"


def bench_pipeline(ns: argparse.Namespace) -> dict:
    results: dict = {}
    base = dict(device=ns.device, load_format=ns.load_format, compile=ns.compile, cuda_graphs=ns.cuda_graphs)
    link = host_link_gbps(torch.device(ns.device)) if ns.device.startswith("cuda") else {}
    if link:
        progress(
            f"host link: {link['host_to_device_gbps']:.1f} GB/s host → device, "
            f"{link['device_to_host_gbps']:.1f} GB/s device → host (pinned, 1 GiB)"
        )
    for label in ns.settings:
        engine = Engine.from_pretrained(
            ns.model, **{**base, "dit_layerwise_offload": False, **PIPELINE_SETTINGS[label]}
        )
        progress(f"engine built ({label})")
        gen = _request(ns, engine.defaults())
        results[f"ditserve {label}"] = dict(
            _time_generations(engine, gen, ns.repeat), plan=engine.memory_plan.to_dict()
        )
        progress(_pipeline_row(f"ditserve {label}", results[f"ditserve {label}"]))
        del engine
        free(torch.device(ns.device))
    engine = Engine.from_pretrained(ns.model, dit_layerwise_offload=False, **base)
    device, pipeline = engine.device, engine.pipeline
    gen = _request(ns, engine.defaults())
    frames = {"num_frames": ns.num_frames} if ns.num_frames else {}
    inputs = pipeline.forward_inputs(ns.height, ns.width, **frames)
    their_inputs = pipeline.diffusers_forward_inputs(inputs)
    model = next(iter(pipeline.transformers().values()))
    model.to("cpu")  # ours leaves the device: each diffusers pipeline below is built over its host tensors
    free(device)
    for label in ns.diffusers:
        pipe = pipeline.diffusers_pipeline()  # a fresh transformer over our (host) tensors, no hooks
        if label == "group":
            label = "diffusers group offload (DiT)"
            group_offload(pipe.transformer, device)
        else:
            label = "diffusers enable_model_cpu_offload"
            pipe.enable_model_cpu_offload(device=device)
        free(device)
        results[label] = _bench_diffusers(pipe, gen, ns.repeat, their_inputs, device)
        progress(_pipeline_row(label, results[label]))
        del pipe
        free(device)
    dit_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{'generation':<36} {'s':>8} {'step ms':>9} {'peak GiB':>9}")
    for label, r in results.items():
        print(_pipeline_row(label, r))
    if link:
        bound_ms = dit_bytes / (link["host_to_device_gbps"] * 1e9) * 1000
        print(
            f"host link {link['host_to_device_gbps']:.1f} GB/s: moving the DiT's {dit_bytes / 1e9:.1f} GB once takes "
            f"{bound_ms:.0f} ms: the floor of one forward that streams every block"
        )
        results["host_link"] = dict(link, dit_gb=dit_bytes / 1e9, dit_copy_ms=bound_ms)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("forward", "pipeline"))
    p.add_argument("--model", default="wan2.1-t2v-14b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--num-inference-steps", type=int, default=None, help="pipeline: default the model's")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--prefetch", type=int, nargs="+", default=[1, 2, 4], help="forward: prefetch sizes to time")
    p.add_argument("--iters", type=int, default=5, help="forward: timed forwards (median)")
    p.add_argument("--repeat", type=int, default=1, help="pipeline: timed generations per setting")
    p.add_argument(
        "--settings",
        nargs="*",
        choices=list(PIPELINE_SETTINGS),
        default=list(PIPELINE_SETTINGS),
        help="pipeline: our offload settings to time (an engine is built for each; default all; none of them: "
        "--settings with no value)",
    )
    p.add_argument(
        "--diffusers",
        nargs="*",
        choices=("group", "model"),
        default=["group", "model"],
        help="pipeline: diffusers' offloads to time: group offload of its DiT, enable_model_cpu_offload (default both)",
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--load-format", default="dummy", help="dummy (random weights at real size) or auto (the folder's)")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--timeline",
        default=None,
        help="forward: profile one more forward per setting and report the compute stream's gaps; DIR keeps the "
        "offload traces (Chrome JSON), '-' keeps none",
    )
    ns = p.parse_args()
    results = bench_forward(ns) if ns.what == "forward" else bench_pipeline(ns)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if ns.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "model": ns.model,
        "what": ns.what,
        "size": [ns.height, ns.width, ns.num_frames],
        "compile": ns.compile,
        "cuda_graphs": ns.cuda_graphs,
        "results": results,
    }
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
