"""Processes for the tests' own multi-rank checks (gloo on the CPU), started as a CPU engine starts its ranks.

A spawned rank imports torch and ditserve anew: about 4.5 s on the 2-core CI machine, most of a small check's time
(a 4-rank check paid it four times over two cores). These checks take their processes from the fork server of
`ditserve.engine.distributed.rank_start_context` (the one CPU engines fork their ranks from: one per process, its
imports made once), so a check costs its own work. Ranks see the fork server's environment, not the test's at the
time of the call: these checks set none.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from ditserve.engine.distributed import rank_start_context

_context = rank_start_context(torch.device("cpu"))


def queue():
    """A queue the ranks can put their results on."""
    return _context.Queue()


def start(fn, args: tuple, nprocs: int) -> None:
    """`fn(rank, *args)` in `nprocs` processes; returns when all have ended (raises if one failed)."""
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method=_context.get_start_method())
