"""The tensor-parallel all-reduce alone, at FLUX.1's message sizes: NCCL against PyTorch's symmetric-memory one-shot
and two-shot kernels, eager and inside a CUDA graph (30 all-reduces per graph), in µs per all-reduce.

    torchrun --nproc-per-node 2 benchmarks/all_reduce.py

Messages are [tokens, 3072] bf16: 512 (the text stream), 4096 / 4608 (image / joint stream at 1024²) and
16384 / 16896 (at 2048²). Each method's sum is checked against NCCL's (max abs difference printed).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

TOKENS = (512, 4096, 4608, 16384, 16896)
WIDTH = 3072


def timed(fn, n: int = 30, graph: bool = False) -> float:
    """µs per call of fn, eager (n calls) or as n calls captured in one CUDA graph and replayed 5 times."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(n):
                fn()
        run, reps, calls = captured.replay, 5, 5 * n
    else:
        run, reps, calls = fn, n, n
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    name = dist.group.WORLD.group_name
    buffer = symm_mem.empty(max(TOKENS) * WIDTH, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buffer, name)
    ops = torch.ops.symm_mem
    for tokens in TOKENS:
        x = torch.randn(tokens, WIDTH, device="cuda", dtype=torch.bfloat16) * (rank + 1)
        reference = x.clone()
        dist.all_reduce(reference)
        out = torch.empty_like(x)
        shared = buffer[: x.numel()].view(x.shape)
        y = x.clone()
        results, errors = {}, {}
        results["nccl"] = timed(lambda y=y: dist.all_reduce(y))
        results["nccl graph"] = timed(lambda y=y: dist.all_reduce(y), graph=True)
        for method, op in (("1shot", ops.one_shot_all_reduce_out), ("2shot", ops.two_shot_all_reduce_out)):

            def reduce(op=op, shared=shared, out=out):
                op(shared, "sum", name, out)

            shared.copy_(x)
            reduce()
            torch.cuda.synchronize()
            errors[method] = (out.float() - reference.float()).abs().max().item()
            results[method] = timed(reduce)
            results[f"{method} graph"] = timed(reduce, graph=True)
        if rank == 0:
            line = "  ".join(f"{k} {v:6.1f}us" for k, v in results.items())
            print(f"{tokens:5d} tokens {x.numel() * 2 / 1e6:6.1f} MB  {line}  max diff {errors}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
