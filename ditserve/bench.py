"""`ditserve bench`: ditserve against diffusers in one process, on the same device, with the same weights.

diffusers' own pipeline for the model's family (`Pipeline.diffusers_pipeline`) holds its own transformer class built
on the meta device and given *our* tensors (its separate q/k/v are row-slices of our fused weights, so no memory is
added); text encoders, VAE, tokenizers and scheduler are the same objects. Both pipelines then run the same prompt, size, steps and seed. Reported per engine:
- DiT forward time (median of repeated forwards at the request's shapes, batch 1);
- denoising step time (median over the steps of the timed generations);
- whole generation time (text encoding to decoded image) and peak device memory;
- the relative difference between the two DiTs' outputs on the same inputs (a full-size parity check).

`--backend native,diffusers` times the diffusers backend (pipelines/diffusers_backend.py: diffusers runs the model
behind our engine, its own copy of the weights) beside the native engine in the same run, as the row
"ditserve[diffusers]" (whole generations: a bare forward of diffusers' DiT is the "diffusers" row's). A model only
the diffusers backend serves is timed through our engine against the same diffusers pipeline called directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from ditserve.pipelines.base import BENCH_PROMPT
from ditserve.utils.timing import synchronize


def _time_calls(fn, device: torch.device, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds of fn() (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def forward_peak_gib(fn, device: torch.device) -> float | None:
    """Peak allocated device memory (GiB) while fn() runs: resident weights, offload buffers and activations."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return _peak_gib(device)


def _request(ns: argparse.Namespace, defaults) -> dict:
    """The timed request: the bench's size, and the model's default steps and guidance unless --num-inference-steps
    and --guidance-scale name them (and --negative-prompt, for true CFG)."""
    request = dict(
        prompt=BENCH_PROMPT,
        height=ns.height,
        width=ns.width,
        num_inference_steps=ns.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=defaults.guidance_scale if ns.guidance_scale is None else ns.guidance_scale,
        seed=0,
    )
    if getattr(ns, "negative_prompt", None) is not None:  # true CFG (FLUX.1, Qwen-Image) runs with a negative
        request["negative_prompt"] = ns.negative_prompt
    if ns.num_frames is not None:  # video models; image models refuse it by name
        request["num_frames"] = ns.num_frames
    if getattr(ns, "image", None):  # edit and image-to-video models: the input images (paths)
        request["images"] = list(ns.image)
    return request


def _time_generations(engine, gen: dict, repeat: int) -> dict:
    """Whole generations through our engine, after a warm-up (which also captures the CUDA graphs)."""
    engine.generate(**{**gen, "num_inference_steps": 2})
    totals, steps, peaks = [], [], []
    for _ in range(repeat):
        result = engine.generate(**gen)
        totals.append(result.timings["total"])
        steps.extend(result.timings["steps"])
        peaks.append(result.peak_memory_mb / 1024 if result.peak_memory_mb is not None else None)
        stages = {k: result.timings[k] for k in ("encode", "prepare", "denoise", "decode") if k in result.timings}
    timed = dict(
        step_ms=statistics.median(steps) * 1000,
        generation_s=statistics.median(totals),
        peak_gib=max(peaks) if peaks[0] is not None else None,  # rank 0's with several GPUs
        stages_s=stages,
        memory_mb=result.memory,  # the last generation's peak per stage and per rank
    )
    if "cache" in result.timings:
        timed["cache"] = result.timings["cache"]
    return timed


def _bench_ours(engine, gen: dict, repeat: int, inputs: dict) -> dict:
    model = next(iter(engine.pipeline.transformers().values()))
    with torch.no_grad():
        forward_s = _time_calls(lambda: model(**inputs), engine.device)
        forward_peak = forward_peak_gib(lambda: model(**inputs), engine.device)
    return dict(forward_ms=forward_s * 1000, forward_peak_gib=forward_peak, **_time_generations(engine, gen, repeat))


def _bench_parallel(args, ns: argparse.Namespace) -> tuple[str, dict]:
    """Our engine over several GPUs: whole generations, with the denoising step read from the engine's timings
    (a bare DiT forward on rank 0 alone would leave the other ranks out of its collectives)."""
    from ditserve.engine.engine import Engine

    label = f"ditserve {args.parallel_config().short_name}"
    with Engine(args) as engine:
        timed = _time_generations(engine, _request(ns, engine.defaults()), ns.repeat)
    return label, dict(forward_ms=None, **timed, num_gpus=args.num_gpus)


def _bench_diffusers(pipe, gen: dict, repeat: int, inputs: dict | None, device: torch.device) -> dict:
    """diffusers' pipeline called directly; its DiT's forward timed alone (and its peak) when `inputs` are given."""
    forward_s = forward_peak = None
    if inputs is not None:
        with torch.no_grad():
            forward_s = _time_calls(lambda: pipe.transformer(**inputs, return_dict=False), device)
            forward_peak = forward_peak_gib(lambda: pipe.transformer(**inputs, return_dict=False), device)
    kwargs = dict(
        prompt=gen["prompt"],
        height=gen["height"],
        width=gen["width"],
        num_inference_steps=gen["num_inference_steps"],
        guidance_scale=gen["guidance_scale"],
        **({"num_frames": gen["num_frames"]} if "num_frames" in gen else {}),
        **({"negative_prompt": gen["negative_prompt"]} if "negative_prompt" in gen else {}),
    )
    if "images" in gen:  # one image as itself (every diffusers pipeline takes that), several as a list
        from PIL import Image

        opened = [Image.open(path).convert("RGB") for path in gen["images"]]
        kwargs["image"] = opened[0] if len(opened) == 1 else opened
    pipe(**{**kwargs, "num_inference_steps": 2}, generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    totals, steps, peaks = [], [], []
    for _ in range(repeat):
        marks: list = []

        def on_step_end(_pipe, _i, _t, callback_kwargs, marks=marks):
            if device.type == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append(event)
            else:
                marks.append(time.perf_counter())
            return callback_kwargs

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        t0 = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(gen["seed"]), callback_on_step_end=on_step_end)
        synchronize(device)
        totals.append(time.perf_counter() - t0)
        if device.type == "cuda":
            steps.extend(a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:]))
        else:
            steps.extend(b - a for a, b in zip(marks, marks[1:]))
        peaks.append(_peak_gib(device))
    return dict(
        forward_ms=None if forward_s is None else forward_s * 1000,
        forward_peak_gib=forward_peak,
        step_ms=statistics.median(steps) * 1000 if steps else float("nan"),
        generation_s=statistics.median(totals),
        peak_gib=max(peaks) if peaks[0] is not None else None,
    )


def _fmt(value, spec: str) -> str:
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return format("n/a", f">{width or 0}")
    return format(value, spec)


def bench_backends(value: str) -> list[str]:
    """--backend of `ditserve bench`: one backend, or several comma-separated (each timed, in order)."""
    from ditserve.cli_common import UsageError
    from ditserve.registry import BACKENDS

    names = [name.strip() for name in value.split(",")]
    for name in names:
        if name not in BACKENDS:
            raise UsageError(f"ditserve bench: --backend: {name!r} is not one of {', '.join(BACKENDS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"ditserve bench: --backend: {value!r} names a backend twice")
    return names


def _bench_backend(args, backend: str, ns: argparse.Namespace) -> dict:
    """Whole generations through our engine with another backend (a model loaded beside the first)."""
    from ditserve.engine.engine import Engine

    with Engine(dataclasses.replace(args, backend=backend)) as engine:
        timed = _time_generations(engine, _request(ns, engine.defaults()), ns.repeat)
        label = "ditserve" if engine.backend == "native" else "ditserve[diffusers]"
    return {"label": label, **timed, "forward_ms": None}


def run_bench(ns: argparse.Namespace) -> int:
    from ditserve.cli_common import engine_args_from, profile_request
    from ditserve.engine.engine import Engine

    backends = bench_backends(ns.backend)
    args = engine_args_from(argparse.Namespace(**{**vars(ns), "backend": backends[0]}))
    profile = profile_request(ns)
    parallel = None
    if args.num_gpus > 1:
        # Several GPUs first (their ranks are started and stopped), then the 1-GPU run, which the ratio is
        # against, and diffusers on that one GPU. diffusers' own context parallelism needs a process group
        # per rank: benchmarks/parallel_scaling.py (torchrun) times it beside every one of our modes.
        if args.nnodes > 1:
            from ditserve.cli_common import UsageError

            raise UsageError("ditserve bench: --nnodes > 1 is not measured; bench one node's GPUs")
        parallel = _bench_parallel(args, ns)
        args = dataclasses.replace(
            args, num_gpus=1, ulysses_degree=1, ring_degree=1, cfg_parallel=False, tp_size=1, dist_init_addr=None
        )
    engine = Engine(args)
    pipeline = engine.pipeline
    device = engine.device
    native = engine.backend == "native"
    print(f"ditserve: {engine.source.describe_backend()}", file=sys.stderr)
    gen = _request(ns, pipeline.defaults())
    frames = {"num_frames": ns.num_frames} if ns.num_frames is not None else {}
    inputs = pipeline.forward_inputs(ns.height, ns.width, **frames) if native else None
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": engine.model_name,
        "load_format": args.load_format,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "height": ns.height,
        "width": ns.width,
        "steps": gen["num_inference_steps"],
        "compile": args.compile,
        "attention_backend": args.attention_backend,
        "backends": [engine.backend],
        "memory_plan": engine.memory_plan.to_dict() if engine.memory_plan is not None else None,
        "results": {},
    }
    t0 = time.perf_counter()
    if native:
        report["results"]["ditserve"] = _bench_ours(engine, gen, ns.repeat, inputs)
    else:
        report["results"]["ditserve[diffusers]"] = dict(forward_ms=None, **_time_generations(engine, gen, ns.repeat))
    if native and args.cache.enabled:  # the engine's default cache ran above; the same engine uncached is the yardstick
        report["cache"] = args.cache.to_dict()
        uncached = _time_generations(engine, {**gen, "cache": "none"}, ns.repeat)
        report["results"]["ditserve uncached"] = dict(
            forward_ms=report["results"]["ditserve"]["forward_ms"], **uncached
        )
        ours = report["results"]["ditserve"]
        report["cache_speedup"] = {
            "step": uncached["step_ms"] / ours["step_ms"],
            "generation": uncached["generation_s"] / ours["generation_s"],
            "skipped_fraction": ours["cache"]["skipped_fraction"],
        }
    if profile is not None:  # one more generation, traced: the timings above ran without the profiler
        with engine.profile(**profile) as session:
            engine.generate(**gen)
        report["profile_traces"] = [str(path) for path in session.traces]
        for trace in report["profile_traces"]:
            print(f"profile: {trace}", file=sys.stderr)
    if parallel is not None:
        label, result = parallel
        ours = next(iter(report["results"].values()))
        report["results"][label] = result
        report["parallel_speedup"] = {
            "mode": label,
            "step": ours["step_ms"] / result["step_ms"],
            "generation": ours["generation_s"] / result["generation_s"],
        }
    if args.compile:
        report["ditserve_compile_and_bench_s"] = time.perf_counter() - t0

    reference = pipeline  # whose weights diffusers runs: ours, unless they are quantised
    if native and args.quantization is not None:
        # diffusers runs the model in the activation dtype: from an engine of ours without quantisation, which is
        # timed too (the quantisation's own speed-up), and whose DiT the quantised one is compared with.
        plain = Engine(dataclasses.replace(args, quantization=None))
        reference = plain.pipeline
        plain_inputs = reference.forward_inputs(ns.height, ns.width, **frames)
        report["results"][f"ditserve {str(engine.dtype).replace('torch.', '')}"] = _bench_ours(
            plain, gen, ns.repeat, plain_inputs
        )
        report["quantization"] = args.quantization
    offloaded = bool(engine.block_offloads or engine.component_offloads)
    if offloaded and not ns.no_diffusers:
        # diffusers' pipeline would share our tensors, which offload has moved: benchmarks/offload.py times
        # diffusers' own offloads beside ours.
        print("diffusers is not run beside offloaded weights here: benchmarks/offload.py times both")
    if not ns.no_diffusers and not native:  # the backend's own pipeline, called directly
        import diffusers

        report["diffusers"] = diffusers.__version__
        report["results"]["diffusers"] = _bench_diffusers(pipeline.pipe, gen, ns.repeat, None, device)  # type: ignore[attr-defined]
        ours, theirs = report["results"]["ditserve[diffusers]"], report["results"]["diffusers"]
        report["speedup"] = {
            "forward": None,
            "step": theirs["step_ms"] / ours["step_ms"],
            "generation": theirs["generation_s"] / ours["generation_s"],
        }
    elif not ns.no_diffusers and not offloaded:
        import diffusers

        report["diffusers"] = diffusers.__version__
        pipe = reference.diffusers_pipeline()
        dt = pipe.transformer
        their_inputs = reference.diffusers_forward_inputs(inputs)
        ours_dit = next(iter(pipeline.transformers().values()))
        with torch.no_grad():
            ours_out, ref_out = (
                t.float()
                for t in pipeline.comparable_outputs(ours_dit(**inputs), dt(**their_inputs, return_dict=False), inputs)
            )
        report["dit_relative_difference"] = ((ours_out - ref_out).norm() / ref_out.norm()).item()
        if device.type == "cuda" and not args.compile:
            # A yardstick for that difference: diffusers against itself with SDPA restricted to the flash kernel
            # (torch 2.11 picks cuDNN by default here), i.e. what two correct bf16 attention kernels disagree by.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                alt = dt(**their_inputs, return_dict=False)
                alt_out = pipeline.comparable_outputs(ours_dit(**inputs), alt, inputs)[1].float()
                report["diffusers_flash_forward_ms"] = 1000 * _time_calls(
                    lambda: dt(**their_inputs, return_dict=False), device
                )
            report["diffusers_self_difference_flash_vs_default"] = ((alt_out - ref_out).norm() / ref_out.norm()).item()
            del alt_out
        del ours_out, ref_out
        if args.compile:
            dt.compile_repeated_blocks(fullgraph=True)
        report["results"]["diffusers"] = _bench_diffusers(pipe, gen, ns.repeat, their_inputs, device)
        ours, theirs = report["results"]["ditserve"], report["results"]["diffusers"]
        report["speedup"] = {
            "forward": theirs["forward_ms"] / ours["forward_ms"],
            "step": theirs["step_ms"] / ours["step_ms"],
            "generation": theirs["generation_s"] / ours["generation_s"],
        }

    for backend in backends[1:]:  # beside the first, whose pipeline stays loaded
        extra = _bench_backend(args, backend, ns)
        report["backends"].append(backend)
        report["results"][extra.pop("label")] = extra
    rows = report["results"]
    if "ditserve" in rows and "ditserve[diffusers]" in rows:
        ours, theirs = rows["ditserve"], rows["ditserve[diffusers]"]
        report["native_over_diffusers_backend"] = {
            "step": theirs["step_ms"] / ours["step_ms"],
            "generation": theirs["generation_s"] / ours["generation_s"],
        }

    print(
        f"{report['model']} ({report['load_format']}) {ns.height}x{ns.width}, {report['steps']} steps, "
        f"{report['dtype']}{', ' + args.quantization if args.quantization else ''}, compile={args.compile}, "
        f"on {report['device']}"
    )
    if engine.memory_plan is not None and (engine.memory_plan.dit_layerwise_offload or engine.memory_plan.offloaded):
        print(f"ditserve memory: {engine.memory_plan.describe()}")
    print(f"{'engine':<20} {'DiT fwd ms':>11} {'fwd peak GiB':>13} {'step ms':>9} {'generation s':>13} {'peak GiB':>9}")
    for name, r in report["results"].items():
        print(
            f"{name:<20} {_fmt(r['forward_ms'], '>11.1f')} {_fmt(r.get('forward_peak_gib'), '>13.2f')} "
            f"{r['step_ms']:>9.1f} {r['generation_s']:>13.3f} {_fmt(r['peak_gib'], '>9.2f')}"
        )
    if "cache_speedup" in report:
        s = report["cache_speedup"]
        print(
            f"cache {report['cache']}: skipped {s['skipped_fraction']:.0%} of block computations; over uncached: "
            f"step {s['step']:.2f}x, generation {s['generation']:.2f}x"
        )
    if "parallel_speedup" in report:
        s = report["parallel_speedup"]
        print(
            f"{s['mode']} over one GPU: step {s['step']:.2f}x, generation {s['generation']:.2f}x "
            "(diffusers' context parallelism: benchmarks/parallel_scaling.py)"
        )
    if "native_over_diffusers_backend" in report:
        s = report["native_over_diffusers_backend"]
        print(f"native over the diffusers backend: step {s['step']:.2f}x, generation {s['generation']:.2f}x")
    if "speedup" in report:
        s = report["speedup"]
        parity = ""
        if "dit_relative_difference" in report:
            parity = f"; DiT outputs differ by {report['dit_relative_difference']:.2e} (relative L2)"
        print(
            f"speed-up over diffusers: forward {_fmt(s['forward'], '.2f')}x, step {s['step']:.2f}x, "
            f"generation {s['generation']:.2f}x{parity}"
        )
    if "diffusers_self_difference_flash_vs_default" in report:
        print(
            f"yardstick: diffusers with flash attention runs its DiT in {report['diffusers_flash_forward_ms']:.1f} ms "
            f"and differs from its default by {report['diffusers_self_difference_flash_vs_default']:.2e}"
        )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
