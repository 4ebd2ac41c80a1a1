"""Per-step DiT time of dummy FLUX.1-dev over several GPUs: ditserve's parallel modes beside diffusers' context
parallelism, in the same processes, on the same weights.

    torchrun --nproc-per-node N benchmarks/parallel_scaling.py --sizes 1024 2048 [--json out.json]
        [--modes U4 U2·R2 U2+CFG] [--diffusers-modes ulysses ring U2R2] [--no-cuda-graphs] [--warmup 3 --iters 10]
        [--ulysses-chunks 1 2] [--alongside-carveout -1 0 16] [--project-in-pieces -1 0 1]
        [--ulysses-exchange auto nccl copy-engine] [--tp-all-reduce nccl two-shot] [--profile]

Our modes run with CUDA graphs (as the engine does by default); the 1-GPU baseline is timed both ways.

With N = 1 it times the single-GPU baseline (one forward, and one true-CFG step = two forwards). With N > 1 it
times every mode whose degrees multiply to N, and diffusers' `enable_parallelism(ContextParallelConfig(...))`
with Ulysses-N and Ring-N (its attention backend set to cuDNN, the kernel we use). Rank 0 also checks each mode's
output against the unsharded model on the same inputs (relative L2 in bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics

import torch
import torch.distributed as dist

from ditserve.accel.cuda_graph import disable_cuda_graphs, enable_cuda_graphs
from ditserve.layers.attention import set_attention_backend
from ditserve.loader.folder import load_dit, resolve_model
from ditserve.loader.weights import build_on_meta, load_checkpoint, materialize
from ditserve.models.flux import FluxConfig, FluxTransformer, map_diffusers_key, to_diffusers_state_dict
from ditserve.parallel.groups import ParallelConfig, init_parallel_groups
from ditserve.parallel.sequence import disable_sequence_parallel, enable_sequence_parallel
from ditserve.parallel.state import set_tensor_parallel_group
from ditserve.pipelines.flux import diffusers_transformer_sharing, latent_image_ids

TIMING = dict(warmup=3, iters=10)


def time_it(fn) -> float:
    warmup, iters = TIMING["warmup"], TIMING["iters"]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    # The step is as slow as the slowest rank.
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def inputs_for(cfg: FluxConfig, size: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    side = size // 16
    dtype = torch.bfloat16
    return dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, device="cuda", dtype=dtype, generator=g),
        encoder_hidden_states=torch.randn(1, 512, cfg.joint_attention_dim, device="cuda", dtype=dtype, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device="cuda", dtype=dtype, generator=g),
        timestep=torch.full((1,), 0.5, device="cuda", dtype=dtype),
        img_ids=latent_image_ids(side, side, torch.device("cuda"), dtype),
        txt_ids=torch.zeros(512, 3, device="cuda", dtype=dtype),
        guidance=torch.full((1,), 3.5, device="cuda"),
    )


def modes_for(world: int) -> list[ParallelConfig]:
    candidates = []
    for u in (1, 2, 4, 8):
        for r in (1, 2, 4, 8):
            for c in (False, True):
                for t in (1, 2, 4):
                    pc = ParallelConfig(world, u, r, c, t)
                    if pc.world_size == world and (u * r * t > 1 or c):
                        candidates.append(pc)
    return candidates


KERNEL_KINDS = (
    ("nccl", ("nccl",)),
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90")),
    ("triton", ("triton",)),
)


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [begin, end) intervals, as sorted disjoint intervals."""
    out: list[tuple[float, float]] = []
    for begin, end in sorted(intervals):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def uncovered(interval: tuple[float, float], cover: list[tuple[float, float]]) -> float:
    """How much of `interval` no interval of `cover` (sorted, disjoint) overlaps."""
    begin, end = interval
    covered = sum(max(0.0, min(end, b) - max(begin, a)) for a, b in cover if a < end and b > begin)
    return end - begin - covered


def kernel_breakdown(label: str, fn, rank: int, trace_dir: str | None = None, top_kernels: int = 25) -> None:
    """Where rank 0's GPU time goes in one forward (as it runs: graphed when graphs are on).

    Prints the wall time, kernel time by kind, and the time the GPU computes at all (the union of the non-NCCL
    kernels' intervals): wall minus that is time the compute waits (on communication or the host). Then how much of
    that an NCCL kernel runs alone (for each NCCL kernel in order, the part no compute kernel overlaps: which
    exchanges are exposed) and how much nothing runs at all. With
    `trace_dir`, also writes a Chrome trace per label there."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) if rank == 0 else contextlib.nullcontext() as prof:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    if rank != 0:
        return
    totals: dict[str, float] = {}
    by_name: dict[str, list] = {}
    intervals, nccl = [], []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.end - event.time_range.start
        name = event.name.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        totals[kind] = totals.get(kind, 0.0) + us / 1000
        entry = by_name.setdefault(event.name[:90], [0.0, 0])
        entry[0] += us / 1000
        entry[1] += 1
        begin = event.time_range.start
        (nccl if kind == "nccl" else intervals).append((begin, begin + us))
    compute = merged(intervals)
    computing = sum(end - begin for begin, end in compute)
    # Of the time nothing computes: how much an exchange alone runs (exposed communication; a kernel waiting for
    # its peer counts here too), and how much nothing runs at all (the host, or a gap between graph nodes).
    exposed = [uncovered(interval, compute) for interval in sorted(nccl)]
    anything = sum(end - begin for begin, end in merged(intervals + nccl))
    busy = sum(totals.values())
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
    print(
        f"profile {label}: wall {start.elapsed_time(end):.1f} ms, computing {computing / 1000:.1f} ms, "
        f"kernels {busy:.1f} ms ({parts})",
        flush=True,
    )
    if exposed:
        print(
            f"profile {label}: nccl alone {sum(exposed) / 1000:.1f} ms over {len(exposed)} kernels, nothing running "
            f"{start.elapsed_time(end) - anything / 1000:.1f} ms; µs alone per nccl kernel in order: "
            + " ".join(f"{us:.0f}" for us in exposed),
            flush=True,
        )
    for name, (ms, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top_kernels]:
        print(f"profile   {ms:7.2f} ms {count:5d}x  {name}", flush=True)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in label)
        prof.export_chrome_trace(os.path.join(trace_dir, safe + ".json"))


def diffusers_degrees(kind: str, world: int) -> dict | None:
    """'ulysses' / 'ring': that kind over every rank; 'U2R2'-style: both (None when it doesn't fill the world)."""
    if kind in ("ulysses", "ring"):
        return {kind: world}
    u, _, r = kind.upper().lstrip("U").partition("R")
    degrees = {"ulysses": int(u), "ring": int(r)}
    return degrees if degrees["ulysses"] * degrees["ring"] == world else None


def swept_label(prefix: str, value: int | str, values: list, applies: bool) -> str:
    """' <prefix><value>' for a mode's label when several values of a flag are timed and the flag applies to the
    mode (a negative number is the engine's choice: 'auto'), else ''."""
    if not applies or len(values) < 2:
        return ""
    return f" {prefix}{'auto' if isinstance(value, int) and value < 0 else value}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--modes", nargs="+", default=None, help="only these ditserve modes, named as printed, e.g. U4 U2·R2 U2+CFG"
    )
    ap.add_argument("--diffusers-modes", nargs="*", default=["ulysses", "ring"], help="ulysses, ring, or U2R2-style")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--ulysses-chunks",
        type=int,
        nargs="+",
        default=[0],
        help="head groups pipelined in pure Ulysses (each timed); 0: the engine's choice by sequence length",
    )
    ap.add_argument(
        "--alongside-carveout",
        type=int,
        nargs="+",
        default=[-1],
        help="with Ulysses: SMs the GEMMs beside an exchange leave free (each timed); -1: the engine's choice",
    )
    ap.add_argument(
        "--project-in-pieces",
        type=int,
        nargs="+",
        default=[-1],
        help="with Ulysses: 1 projects the attention output in pieces beside its exchange, 0 whole once it is back "
        "(each timed); -1: the engine's choice",
    )
    ap.add_argument(
        "--ulysses-exchange",
        nargs="+",
        default=["auto"],
        help="with Ulysses: how the all-to-alls move, auto (the engine's choice), nccl, copy-engine (each timed)",
    )
    ap.add_argument(
        "--tp-all-reduce", nargs="+", default=["nccl"], help="with tensor parallelism: these all-reduces (each timed)"
    )
    ap.add_argument("--profile", action="store_true", help="also print where rank 0's GPU time goes, per mode")
    ap.add_argument("--trace-dir", default=None, help="with --profile, write a Chrome trace per mode here")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ns = ap.parse_args()
    TIMING.update(warmup=ns.warmup, iters=ns.iters)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    device = torch.device("cuda")
    source = resolve_model("flux.1-dev", "dummy")
    cfg = FluxConfig.from_dict(source.config("transformer"))
    full = load_dit(
        source, "transformer", lambda: FluxTransformer(cfg), map_diffusers_key, device, torch.bfloat16, "dummy"
    )
    set_attention_backend(full, "auto", device)
    full_state = to_diffusers_state_dict(full)  # views of our tensors, under diffusers' names
    rows = []

    def record(size, engine, mode, ms, diff=None):
        row = dict(size=size, gpus=world, engine=engine, mode=mode, step_ms=ms, rel_diff=diff)
        rows.append(row)
        if rank == 0:
            d = "" if diff is None else f"  diff {diff:.2e}"
            print(f"{size}² {world} GPU {engine:9} {mode:18} {ms:8.1f} ms{d}", flush=True)

    def graphed(model):
        return enable_cuda_graphs(model, device) if ns.cuda_graphs else None

    def ungraphed(model, graphs):
        if graphs is not None:
            disable_cuda_graphs(model)
            torch.cuda.empty_cache()

    for size in ns.sizes:
        x = inputs_for(cfg, size, seed=size)
        neg = dict(x, encoder_hidden_states=torch.randn_like(x["encoder_hidden_states"]))
        with torch.no_grad():
            reference = full(**x)
            if world == 1:
                record(size, "ditserve", "1 GPU eager", time_it(lambda x=x: full(**x)))
                graphs = graphed(full)
                record(size, "ditserve", "1 GPU", time_it(lambda x=x: full(**x)))
                if ns.profile:
                    kernel_breakdown(f"{size}² 1 GPU", lambda x=x: full(**x), rank, ns.trace_dir)
                record(size, "ditserve", "1 GPU true-CFG", time_it(lambda x=x, n=neg: (full(**x), full(**n))))
                ungraphed(full, graphs)
                single = diffusers_transformer_sharing(full)
                record(size, "diffusers", "1 GPU", time_it(lambda x=x, m=single: m(**x, return_dict=False)))
                continue
            modes = [
                dataclasses.replace(pc, tp_all_reduce=method)
                for pc in modes_for(world)
                for method in (ns.tp_all_reduce if pc.tp_size > 1 else ["nccl"])
            ]
            for pc in modes:
                name = pc.short_name
                if ns.modes is not None and name not in ns.modes:
                    continue
                if pc.tp_size > 1 and len(ns.tp_all_reduce) > 1:
                    name += f" {pc.tp_all_reduce}"
                groups = init_parallel_groups(pc)
                model = full
                if pc.tp_size > 1:  # each rank loads its shard of the same weights, as from a checkpoint
                    model = materialize(build_on_meta(lambda: FluxTransformer(cfg), torch.bfloat16), device)
                    load_checkpoint(model, iter(full_state.items()), map_diffusers_key)
                    set_attention_backend(model, "auto", device)
                pipelined = pc.ulysses_degree > 1 and pc.ring_degree == 1
                variants = [
                    (chunks, carve, pieces, exchange)
                    for chunks in (ns.ulysses_chunks if pipelined else [1])
                    for carve in (ns.alongside_carveout if pc.ulysses_degree > 1 else [0])
                    for pieces in (ns.project_in_pieces if pc.ulysses_degree > 1 else [-1])
                    for exchange in (ns.ulysses_exchange if pc.ulysses_degree > 1 else ["nccl"])
                ]
                for chunks, carve, pieces, exchange in variants:
                    ulysses = pc.ulysses_degree > 1
                    label = (
                        name
                        + swept_label("c", chunks, ns.ulysses_chunks, pipelined)
                        + swept_label("sm", carve, ns.alongside_carveout, ulysses)
                        + swept_label("p", pieces, ns.project_in_pieces, ulysses)
                        + swept_label("", exchange, ns.ulysses_exchange, ulysses)
                    )
                    if groups.sequence is not None:
                        enable_sequence_parallel(
                            model,
                            groups.sequence,
                            ulysses_chunks=chunks or None,
                            alongside_carveout=None if carve < 0 else carve,
                            project_in_pieces=None if pieces < 0 else bool(pieces),
                            ulysses_exchange=exchange,
                            graphed=ns.cuda_graphs,
                        )
                    graphs = graphed(model)
                    if pc.cfg_parallel:
                        mine = x if groups.cfg_index == 0 else neg

                        def step(model=model, mine=mine, group=groups.cfg_group):
                            out = model(**mine)
                            both = [torch.empty_like(out), torch.empty_like(out)]
                            dist.all_gather(both, out.contiguous(), group=group)
                            return both

                        ms = time_it(step)
                        diff = rel(step()[0], reference)
                    else:
                        ms = time_it(lambda model=model, x=x: model(**x))
                        diff = rel(model(**x), reference)
                    record(size, "ditserve", label, ms, diff)
                    if ns.profile:
                        kernel_breakdown(f"{size}² {label}", lambda model=model, x=x: model(**x), rank, ns.trace_dir)
                    ungraphed(model, graphs)
                    if groups.sequence is not None:
                        disable_sequence_parallel(model)
                if pc.tp_size > 1:
                    del model
                    torch.cuda.empty_cache()
                set_tensor_parallel_group(None)
            from diffusers import ContextParallelConfig

            for kind in ns.diffusers_modes:
                degrees = diffusers_degrees(kind, world)
                if degrees is None:
                    continue
                label = "CP " + " ".join(f"{k}-{v}" for k, v in degrees.items())
                dt = diffusers_transformer_sharing(full)
                dt.set_attention_backend("_native_cudnn")
                try:
                    dt.enable_parallelism(
                        config=ContextParallelConfig(**{f"{k}_degree": v for k, v in degrees.items()})
                    )
                    ms = time_it(lambda dt=dt, x=x: dt(**x, return_dict=False))
                    diff = rel(dt(**x, return_dict=False)[0], reference)
                    record(size, "diffusers", label, ms, diff)
                except Exception as e:  # report, don't hide: an unsupported diffusers mode is a result too
                    if rank == 0:
                        print(f"{size}² diffusers {label}: failed: {type(e).__name__}: {e}", flush=True)
                del dt
                torch.cuda.empty_cache()
    if rank == 0 and ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
