"""What a GEMM loses beside a Ulysses-style all-to-all, through NCCL and through the copy engines.

    torchrun --nproc-per-node 2 benchmarks/exchange_probe.py     # also 4

For two message sizes (a rank's q/k/v message at 1024² on 2 ranks, 10 MB; and a large one, 148 MB), on rank 0,
in µs: the exchange alone through NCCL (`all_to_all_single`) and through the copy engines (a barrier, each piece
written into its peer's buffer in symmetric memory by a device copy, the own piece copied locally, a barrier:
the scheme of ditserve/parallel/exchange.py, written out here), eager and replayed from a CUDA graph; a GEMM
[tokens × 12288] · [12288 × 3072] (FLUX.1's single-block MLP GEMM) alone; the GEMM with each exchange on a side
stream (the wall time of both, and the GEMM's own time). It also checks that the copy-engine exchange, eager and
replayed, receives what NCCL's all-to-all does. Results: benchmarks/RESULTS.md, the run of 2026-11-27 at ba8f52d,
calls C and D.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem


def timed(fn, iters: int = 30, warmup: int = 5) -> float:
    """µs per call of fn, from CUDA events around `iters` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def probe(
    tokens: int, rank: int, world: int, group: dist.ProcessGroup, device: torch.device, side: torch.cuda.Stream
) -> None:
    """One message size: every timing of the module docstring, printed by rank 0."""
    heads = 12 // 2 if tokens == 2304 else 24
    n = tokens * heads * 128 * 3
    n -= n % world
    piece = n // world
    send = torch.randn(n, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    buffer = symm_mem.empty(2 * n, dtype=torch.bfloat16, device=device)
    handle = symm_mem.rendezvous(buffer, group.group_name)
    mine = buffer[:n]  # piece p goes to rank p
    mine.copy_(send)

    def nccl_exchange() -> None:
        dist.all_to_all_single(recv, send, group=group)

    def copy_engine_exchange() -> None:
        handle.barrier(channel=0)
        for step in range(1, world):
            peer = (rank + step) % world
            remote = handle.get_buffer(peer, (n,), torch.bfloat16, 0)
            recv[peer * piece : (peer + 1) * piece].copy_(remote[rank * piece : (rank + 1) * piece])
        recv[rank * piece : (rank + 1) * piece].copy_(mine[rank * piece : (rank + 1) * piece])
        handle.barrier(channel=1)

    a = torch.randn(tokens, 12288, device=device, dtype=torch.bfloat16)
    w = torch.randn(3072, 12288, device=device, dtype=torch.bfloat16)

    def gemm() -> None:
        torch.mm(a, w.t())

    def beside(exchange):
        def both() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                exchange()
            gemm()
            torch.cuda.current_stream().wait_stream(side)

        return both

    def gemm_beside(exchange, iters: int = 30) -> float:
        """µs of the GEMM alone on its stream, with the exchange running on the side stream."""
        events = []
        for _ in range(iters + 5):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                exchange()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            gemm()
            end.record()
            torch.cuda.current_stream().wait_stream(side)
            events.append((start, end))
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in events[5:]) * 1000 / iters

    results = {
        "MB": n * 2 / 2**20,
        "nccl alone": timed(nccl_exchange),
        "ce alone": timed(copy_engine_exchange),
        "gemm alone": timed(gemm),
        "gemm+nccl wall": timed(beside(nccl_exchange)),
        "gemm+ce wall": timed(beside(copy_engine_exchange)),
        "gemm beside nccl": gemm_beside(nccl_exchange),
        "gemm beside ce": gemm_beside(copy_engine_exchange),
    }
    recv.zero_()
    copy_engine_exchange()
    torch.cuda.synchronize()
    expected = torch.empty_like(send)
    dist.all_to_all_single(expected, send, group=group)
    eager_ok = torch.equal(recv, expected)
    graph = torch.cuda.CUDAGraph()
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        copy_engine_exchange()
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(graph):
            copy_engine_exchange()
        recv.zero_()
        torch.cuda.synchronize()
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        graph_ok: bool | str = torch.equal(recv, expected)
        results["ce graphed"] = timed(graph.replay)
    except RuntimeError as exc:
        graph_ok = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
    if rank == 0:
        line = ", ".join(f"{k} {v:.1f}" for k, v in results.items())
        print(f"world {world} tokens {tokens}: {line}; eager ok {eager_ok}, graph ok {graph_ok}", flush=True)


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    torch.manual_seed(rank)
    side = torch.cuda.Stream()
    for tokens in (2304, 8448):  # a rank's tokens at 1024² and 2048² on 2 ranks
        probe(tokens, rank, world, group, device, side)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
