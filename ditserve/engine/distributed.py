"""One engine over several ranks: starting them, and what rank 0 tells the others.

Rank 0 (the driver) is the process that called `Engine(...)`: it takes requests. The other ranks are started here
(or by torchrun, or on other nodes), build the same pipeline with their shard of the model, and then follow the
driver: each operation (a generation, a LoRA change, stop) is broadcast from rank 0 as JSON over a gloo group
(plain data, never pickle), and every rank runs it, so the collectives inside the model line up.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

INIT_TIMEOUT = datetime.timedelta(minutes=15)


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    world_size: int
    local_rank: int
    init_method: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_placement() -> RankPlacement | None:
    """This process's place when started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return RankPlacement(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        init_method="env://",
    )


def init_process_group(placement: RankPlacement, device_type: str) -> None:
    if dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(placement.local_rank)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=placement.init_method,
        rank=placement.rank,
        world_size=placement.world_size,
        timeout=INIT_TIMEOUT,
    )


def broadcast_json(obj, group, src: int = 0):
    """Send a JSON-able object from `src` to every rank of `group` (a gloo group); returns it on every rank."""
    if dist.get_rank() == src:
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        payload, size = None, torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=src, group=group)
    return json.loads(bytes(payload.numpy()).decode())


def all_gather_json(obj, group) -> list:
    """Every rank's JSON-able object, in rank order, on every rank of `group` (a gloo group)."""
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64), group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    out = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return [json.loads(bytes(t[: int(n.item())].numpy()).decode()) for t, n in zip(out, sizes)]


# What a CPU engine's fork server imports once, before it forks each rank (rank_main imports the rest).
RANK_PRELOAD = ["torch", "torch.distributed", "ditserve.engine.engine"]


def rank_start_context(device: torch.device):
    """How this node's other ranks are started. CUDA engines spawn them: each a fresh interpreter, the only safe way
    beside a driver that has touched CUDA. CPU engines (gloo ranks, as in tests and on machines without GPUs) fork
    them from a fork server that imported torch and ditserve once, when the first such engine started it: a spawned
    rank re-imports them (4.5 s on a 2-core machine, most of a small engine's start). The fork server has imported
    modules and done nothing else (no threads, no CUDA), so forking it is safe; its ranks see the environment of
    the moment it started, not the driver's later changes."""
    if device.type == "cuda":
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(RANK_PRELOAD)
    return context


def rank_main(engine_args: dict, placement: dict) -> None:
    """Entry point of a spawned non-driver rank: build the engine, then follow rank 0 until it says stop."""
    from ditserve.cli_common import quiet_libraries
    from ditserve.config import EngineArgs
    from ditserve.engine.engine import Engine

    if os.environ.get("DITSERVE_DEBUG") != "1":
        quiet_libraries()
    engine = Engine(EngineArgs(**engine_args), placement=RankPlacement(**placement))
    engine.follow()
