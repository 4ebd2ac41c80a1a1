"""Per-step DiT time of dummy FLUX.1-dev over several GPUs: ditserve's parallel modes beside diffusers' context
parallelism, in the same processes, on the same weights.

    torchrun --nproc-per-node N benchmarks/parallel_scaling.py --sizes 1024 2048 [--json out.json]

With N = 1 it times the single-GPU baseline (one forward, and one true-CFG step = two forwards). With N > 1 it
times every mode whose degrees multiply to N, and diffusers' `enable_parallelism(ContextParallelConfig(...))`
with Ulysses-N and Ring-N (its attention backend set to cuDNN, the kernel we use). Rank 0 also checks each mode's
output against the unsharded model on the same inputs (relative L2 in bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from ditserve.bench import diffusers_transformer_sharing
from ditserve.layers.attention import set_attention_backend
from ditserve.loader.folder import load_dit, resolve_model
from ditserve.loader.weights import build_on_meta, load_checkpoint, materialize
from ditserve.models.flux import FluxConfig, FluxTransformer, map_diffusers_key, to_diffusers_state_dict
from ditserve.parallel.groups import ParallelConfig, init_parallel_groups
from ditserve.parallel.sequence import disable_sequence_parallel, enable_sequence_parallel
from ditserve.parallel.state import set_tensor_parallel_group
from ditserve.pipelines.flux import latent_image_ids


def time_it(fn, warmup: int = 3, iters: int = 10) -> float:
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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    device = torch.device("cuda")
    source = resolve_model("flux.1-dev", "dummy")
    cfg = FluxConfig.from_dict(source.config("transformer"))
    full = load_dit(source, lambda: FluxTransformer(cfg), map_diffusers_key, device, torch.bfloat16, "dummy")
    set_attention_backend(full, "auto", device)
    full_state = to_diffusers_state_dict(full)  # views of our tensors, under diffusers' names
    rows = []

    def record(size, engine, mode, ms, diff=None):
        row = dict(size=size, gpus=world, engine=engine, mode=mode, step_ms=ms, rel_diff=diff)
        rows.append(row)
        if rank == 0:
            d = "" if diff is None else f"  diff {diff:.2e}"
            print(f"{size}² {world} GPU {engine:9} {mode:18} {ms:8.1f} ms{d}", flush=True)

    for size in ns.sizes:
        x = inputs_for(cfg, size, seed=size)
        neg = dict(x, encoder_hidden_states=torch.randn_like(x["encoder_hidden_states"]))
        with torch.no_grad():
            reference = full(**x)
            if world == 1:
                record(size, "ditserve", "1 GPU", time_it(lambda x=x: full(**x)))
                record(size, "ditserve", "1 GPU true-CFG", time_it(lambda x=x, n=neg: (full(**x), full(**n))))
                single = diffusers_transformer_sharing(full)
                record(size, "diffusers", "1 GPU", time_it(lambda x=x, m=single: m(**x, return_dict=False)))
                continue
            for pc in modes_for(world):
                groups = init_parallel_groups(pc)
                model = full
                if pc.tp_size > 1:  # each rank loads its shard of the same weights, as from a checkpoint
                    model = materialize(build_on_meta(lambda: FluxTransformer(cfg), torch.bfloat16), device)
                    load_checkpoint(model, iter(full_state.items()), map_diffusers_key)
                    set_attention_backend(model, "auto", device)
                if groups.sequence is not None:
                    enable_sequence_parallel(model, groups.sequence)
                name = f"U{pc.ulysses_degree}·R{pc.ring_degree}·T{pc.tp_size}" + ("+CFG" if pc.cfg_parallel else "")
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
                record(size, "ditserve", name, ms, diff)
                if groups.sequence is not None:
                    disable_sequence_parallel(model)
                if pc.tp_size > 1:
                    del model
                    torch.cuda.empty_cache()
                set_tensor_parallel_group(None)
            from diffusers import ContextParallelConfig

            for kind in ("ulysses", "ring"):
                dt = diffusers_transformer_sharing(full)
                dt.set_attention_backend("_native_cudnn")
                try:
                    dt.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": world}))
                    ms = time_it(lambda dt=dt, x=x: dt(**x, return_dict=False))
                    diff = rel(dt(**x, return_dict=False)[0], reference)
                    record(size, "diffusers", f"CP {kind}-{world}", ms, diff)
                except Exception as e:  # report, don't hide: an unsupported diffusers mode is a result too
                    if rank == 0:
                        print(f"{size}² diffusers CP {kind}-{world}: failed: {type(e).__name__}: {e}", flush=True)
                del dt
    if rank == 0 and ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
