"""Processes for the tests' own multi-rank checks (gloo on the CPU), started from one fork server.

Each spawned rank imports torch and ditserve anew: about 4.5 s on the 2-core CI machine, most of a small check's
time (a 4-rank check paid it four times over two cores). A fork server imports them once, when the first check
starts it, and forks every later rank from that state. It has imported modules and nothing more (no thread pool,
no CUDA), which is what a fork needs to be safe. Ranks see the fork server's environment, not the test's at the
time of the call: these checks set none. The engine's own ranks (Engine(num_gpus=N)) are spawned as in production.
"""

from __future__ import annotations

import multiprocessing

import torch.multiprocessing as mp

PRELOAD = [
    "torch",
    "torch.distributed",
    "ditserve.loader.weights",
    "ditserve.models.flux",
    "ditserve.parallel.sequence",
    "ditserve.parallel.groups",
]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def queue():
    """A queue the ranks can put their results on."""
    return _context.Queue()


def start(fn, args: tuple, nprocs: int) -> None:
    """`fn(rank, *args)` in `nprocs` processes; returns when all have ended (raises if one failed)."""
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")
