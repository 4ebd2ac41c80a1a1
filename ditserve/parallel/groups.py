"""How N ranks divide the work, and the process groups that carry it.

world = cfg × sequence (ulysses × ring) × tensor, with tensor-parallel ranks innermost (they talk most, so they
sit on neighbouring GPUs) and the CFG split outermost (it talks once per step):

    rank = ((cfg_index · sp_size) + sp_index) · tp_size + tp_index,   sp_index = ring_index · ulysses + ulysses_index

Every rank must call `init_parallel_groups` with the same config: `new_group` is collective.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass

import torch.distributed as dist

from ditserve.errors import FieldError
from ditserve.parallel.exchange import ULYSSES_EXCHANGES
from ditserve.parallel.reduce import ALL_REDUCE_METHODS
from ditserve.parallel.sequence import SequenceParallelGroups, build_sequence_parallel_groups
from ditserve.parallel.state import set_tensor_parallel_group
from ditserve.parallel.symmetric import rendezvous_made

log = logging.getLogger(__name__)


class ParallelConfigError(FieldError):
    """A parallel layout that cannot run: `field` names the EngineArgs setting at fault, `message` says why."""


@dataclass(frozen=True)
class ParallelConfig:
    num_gpus: int = 1  # on the CPU: number of processes
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel: bool = False
    tp_size: int = 1
    tp_all_reduce: str = "nccl"  # how tensor-parallel partial sums are added: see parallel/reduce.py
    ulysses_exchange: str = "auto"  # how Ulysses's all-to-alls move: see parallel/exchange.py

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def sp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.cfg_size * self.sp_size * self.tp_size

    @property
    def short_name(self) -> str:
        """U4, U2·R2, T2, U2+CFG, CFG (the degrees above 1): how benchmarks label a mode; "1 GPU" for none."""
        parts = [
            f"{k}{d}" for k, d in (("U", self.ulysses_degree), ("R", self.ring_degree), ("T", self.tp_size)) if d > 1
        ]
        name = "·".join(parts)
        if self.cfg_parallel:
            name = f"{name}+CFG" if name else "CFG"
        return name or "1 GPU"

    def validate(self) -> None:
        for name in ("num_gpus", "ulysses_degree", "ring_degree", "tp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelConfigError(name, f"must be a positive integer, got {value!r}")
        if self.tp_all_reduce not in ALL_REDUCE_METHODS:
            raise ParallelConfigError(
                "tp_all_reduce", f"{self.tp_all_reduce!r} is not one of {', '.join(ALL_REDUCE_METHODS)}"
            )
        if self.ulysses_exchange not in ULYSSES_EXCHANGES:
            raise ParallelConfigError(
                "ulysses_exchange", f"{self.ulysses_exchange!r} is not one of {', '.join(ULYSSES_EXCHANGES)}"
            )
        if self.world_size != self.num_gpus:
            raise ParallelConfigError(
                "num_gpus",
                f"{self.num_gpus} does not equal ulysses {self.ulysses_degree} × ring {self.ring_degree}"
                f" × cfg {self.cfg_size} × tp {self.tp_size} = {self.world_size}",
            )

    def for_fresh_ranks(self) -> ParallelConfig:
        """This config for a world whose other ranks this process starts afresh: unchanged, unless this process has
        made a symmetric-memory rendezvous already, which those ranks could not line up with (parallel/symmetric.py).
        Then "auto" sends Ulysses's exchanges through NCCL (with a warning), and a method named outright that needs
        symmetric memory is refused."""
        if rendezvous_made() == 0:
            return self
        why = (
            "this process set up symmetric memory for an earlier multi-GPU engine, and PyTorch cannot line that up "
            "with the fresh ranks started for this one: run this engine in a new process, or choose nccl"
        )
        if self.tp_size > 1 and self.tp_all_reduce == "two-shot":
            raise ParallelConfigError("tp_all_reduce", f"two-shot: {why}")
        if self.ulysses_degree > 1 and self.ulysses_exchange == "copy-engine":
            raise ParallelConfigError("ulysses_exchange", f"copy-engine: {why}")
        if self.ulysses_degree > 1 and self.ulysses_exchange == "auto":
            log.warning("Ulysses exchanges through NCCL, not the copy engines: %s", why)
            return dataclasses.replace(self, ulysses_exchange="nccl")
        return self

    def check_model(self, num_heads: int) -> None:
        """Heads must split over tensor-parallel ranks and then over Ulysses ranks (sequences can be padded)."""
        if num_heads % self.tp_size:
            raise ParallelConfigError("tp_size", f"{num_heads} attention heads cannot be split over {self.tp_size}")
        if (num_heads // self.tp_size) % self.ulysses_degree:
            raise ParallelConfigError(
                "ulysses_degree",
                f"{num_heads // self.tp_size} heads per tensor-parallel rank cannot be split over {self.ulysses_degree}",
            )


@dataclass(frozen=True)
class ParallelGroups:
    config: ParallelConfig
    rank: int
    sequence: SequenceParallelGroups | None
    cfg_group: dist.ProcessGroup | None
    cfg_index: int
    tp_group: dist.ProcessGroup | None


def rank_of(cfg: ParallelConfig, cfg_index: int, sp_index: int, tp_index: int) -> int:
    return (cfg_index * cfg.sp_size + sp_index) * cfg.tp_size + tp_index


def init_parallel_groups(cfg: ParallelConfig) -> ParallelGroups:
    """Create every group (collectively) and set the tensor-parallel group the layers read."""
    cfg.validate()
    me = dist.get_rank()
    tp_group = cfg_group = None
    cfg_index = 0
    for c, s in itertools.product(range(cfg.cfg_size), range(cfg.sp_size)):
        members = [rank_of(cfg, c, s, t) for t in range(cfg.tp_size)]
        group = dist.new_group(members)
        if me in members:
            tp_group = group
    for s, t in itertools.product(range(cfg.sp_size), range(cfg.tp_size)):
        members = [rank_of(cfg, c, s, t) for c in range(cfg.cfg_size)]
        group = dist.new_group(members)
        if me in members:
            cfg_group, cfg_index = group, members.index(me)
    all_sp = [
        [rank_of(cfg, c, s, t) for s in range(cfg.sp_size)]
        for c, t in itertools.product(range(cfg.cfg_size), range(cfg.tp_size))
    ]
    sequence = None
    if cfg.sp_size > 1:
        sequence = build_sequence_parallel_groups(cfg.ulysses_degree, cfg.ring_degree, all_sp)
    set_tensor_parallel_group(tp_group if cfg.tp_size > 1 else None, cfg.tp_all_reduce)
    return ParallelGroups(
        config=cfg,
        rank=me,
        sequence=sequence,
        cfg_group=cfg_group if cfg.cfg_size > 1 else None,
        cfg_index=cfg_index,
        tp_group=tp_group if cfg.tp_size > 1 else None,
    )
