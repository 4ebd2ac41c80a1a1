"""DiT caching at the block loop: DBCache, TaylorSeer, TeaCache and step masks (settings: cache_config.py).

`caching(models, config, num_steps, groups)` installs a `LoopCache` hook on each DiT's `BlockLoop`
(layers/blocks.py) for one batch of requests and yields the `CacheSession` that counts the steps (the pipeline's
step callback advances it) and the skipped blocks.

State is kept per branch: the k-th call of a model within a denoising step is branch k (true CFG's positive and
negative, the groups a pipeline runs separately), each with its own history; under CFG parallelism each rank holds its own
branch. Decisions are per sample (row of the batch): a row skips when its own history allows, so a request batched
with others is treated exactly as it would be alone. The middle blocks run when any row needs them; a row that
skips still gets its cached (or forecast) residual in place of the computed one.

Under sequence parallelism each rank holds a shard of the tokens: the sums behind every relative change are
all-reduced over the sequence-parallel group, and the resulting decisions reduced (max: compute wins) over the
sequence- and tensor-parallel groups, so every rank of a branch takes the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ditserve.accel.cache_config import CacheConfig, mask_compute_steps
from ditserve.accel.cuda_graph import CudaGraphs
from ditserve.layers.blocks import LoopStep, State, run_steps

# Relative changes are computed in float32; a denominator below this counts as zero (the change as infinite).
_TINY = 1e-12


@dataclass
class CacheStats:
    """Block computations of one batch: how many the model's forwards would run, and how many were skipped."""

    blocks_total: int = 0
    blocks_skipped: int = 0
    forwards: int = 0
    forwards_skipping: int = 0  # forwards that skipped some blocks
    # Per sample: what each sample's own decisions skipped (in a batch the middle blocks run when any sample needs
    # them, so the batch may skip less than its samples would alone; for one sample the two counts agree).
    sample_blocks_total: int = 0
    sample_blocks_skipped: int = 0

    def to_dict(self) -> dict:
        fraction = self.blocks_skipped / self.blocks_total if self.blocks_total else 0.0
        per_sample = self.sample_blocks_skipped / self.sample_blocks_total if self.sample_blocks_total else 0.0
        return {
            "blocks_total": self.blocks_total,
            "blocks_skipped": self.blocks_skipped,
            "skipped_fraction": round(fraction, 4),
            "forwards": self.forwards,
            "forwards_skipping": self.forwards_skipping,
            "sample_skipped_fraction": round(per_sample, 4),
        }


@dataclass
class CacheSession:
    """One batch's caching: its settings, the current step, the counts."""

    config: CacheConfig  # resolved
    num_steps: int
    step: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    hooks: list[LoopCache] = field(default_factory=list)

    def end_step(self) -> None:
        self.step += 1
        for hook in self.hooks:
            hook.calls_in_step = 0

    def wrap(self, on_step: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """The pipeline's step callback, advancing the session after every step."""

        def stepped(i: int, n: int) -> None:
            self.end_step()
            if on_step is not None:
                on_step(i, n)

        return stepped


@dataclass
class _Branch:
    """What one branch remembers between steps (tensors have one row per sample of the batch)."""

    rows: int
    first_residual: torch.Tensor | None = None  # DBCache: the first fn blocks' residual at the last computed step
    signal: torch.Tensor | None = None  # TeaCache: the previous step's modulated input
    accumulated: torch.Tensor | None = None  # TeaCache: accumulated rescaled change per row
    # The middle blocks' residual per state tensor: derivatives[0] is the last computed residual; with TaylorSeer
    # derivatives[k] is its k-th finite-difference derivative over steps.
    derivatives: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    computed_steps: torch.Tensor | None = None  # per row: the last step the middle blocks ran
    computes: torch.Tensor | None = None  # per row: how many times the middle blocks ran
    cached_steps: torch.Tensor | None = None  # per row: steps skipped so far
    continuous: torch.Tensor | None = None  # per row: steps skipped in a row


def _per_row_sum(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().flatten(1).sum(1)


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`mask` [B] shaped to broadcast over x's rows."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


class LoopCache:
    """The hook on one model's BlockLoop for one session."""

    def __init__(
        self,
        session: CacheSession,
        teacache_coefficients: Sequence[float],
        reduce_sum: Callable[[torch.Tensor], None],
        reduce_max: Callable[[torch.Tensor], None],
        graphs: CudaGraphs | None = None,
    ):
        self.session = session
        self.graphs = graphs
        self.coefficients = list(teacache_coefficients)
        self.reduce_sum = reduce_sum
        self.reduce_max = reduce_max
        self.branches: dict[int, _Branch] = {}
        self.calls_in_step = 0
        cfg = session.config
        self.mask = None
        if cfg.method == "mask":
            if cfg.compute_steps is not None:
                wanted = set(cfg.compute_steps)
                self.mask = [i in wanted for i in range(session.num_steps)]
            else:
                self.mask = mask_compute_steps(cfg.mask, session.num_steps)  # type: ignore[arg-type]

    # ---- the hook -------------------------------------------------------------------------------------------------
    def __call__(self, steps: list[LoopStep], state: State, signal: Callable[[], torch.Tensor] | None) -> State:
        cfg = self.session.config
        block_at = [i for i, s in enumerate(steps) if s.block is not None]
        n = len(block_at)
        fn, bn = int(cfg.fn or 0), int(cfg.bn or 0)
        cfg.check_blocks(n)
        key = self.calls_in_step
        self.calls_in_step += 1
        rows = state[0].shape[0]
        branch = self.branches.get(key)
        if branch is None or branch.rows != rows:
            branch = self.branches[key] = _Branch(rows)
        step = self.session.step
        # Steps [0, head) are the first fn blocks (with any glue before the next block), [head, tail) the middle,
        # [tail, end) the last bn blocks with the glue before them.
        head = block_at[fn] if fn else 0
        tail = block_at[n - bn] if bn else len(steps)
        stats = self.session.stats
        stats.forwards += 1
        stats.blocks_total += n

        state_in = state
        state = self._run(steps, state, 0, head)
        if cfg.method in ("dbcache", "taylorseer"):
            first_residual = state[0] - _glued(steps[:head], state_in)[0]
            skip = self._dbcache_rows(branch, first_residual, step)
        elif cfg.method == "teacache":
            if signal is None:
                raise ValueError("teacache needs the model's modulated input: pass signal= to its block loop")
            skip = self._teacache_rows(branch, signal(), step)
        else:
            computes = self.mask[step] if self.mask is not None and step < len(self.mask) else True
            skip = torch.full((rows,), not computes, dtype=torch.bool, device=state[0].device)
            skip &= self._limits_allow(branch, step, rows, state[0].device)
        skip = self._agree(skip)

        middle = steps[head:tail]
        all_skip = bool(skip.all())
        if all_skip:
            state = self._apply_cached(branch, _glued(middle, state), step)
        else:
            entry = state
            state = self._run(steps, state, head, tail)
            residual = tuple(out - base for out, base in zip(state, _glued(middle, entry)))
            if bool(skip.any()):
                cached = self._apply_cached(branch, _glued(middle, entry), step)
                state = tuple(torch.where(_rows(skip, s), c, s) for s, c in zip(state, cached))
            self._store(branch, residual, ~skip, step)
        self._count(branch, skip)
        middle_blocks = tail_blocks(block_at, head, tail)
        stats.sample_blocks_total += n * rows
        stats.sample_blocks_skipped += middle_blocks * int(skip.sum())
        if all_skip:
            stats.blocks_skipped += middle_blocks
            stats.forwards_skipping += 1
        return self._run(steps, state, tail, len(steps))

    def _run(self, steps: list[LoopStep], state: State, start: int, stop: int) -> State:
        """Steps [start, stop) on the state: replayed as a CUDA graph when the model has them (one per run of
        blocks and input shapes, shared by every branch and request: the state and the blocks' tensors are its
        inputs; CudaGraphs runs it eagerly where a graph cannot be used), else eagerly."""
        part = steps[start:stop]
        if not part or self.graphs is None:
            return run_steps(part, state)
        tensors: list[torch.Tensor] = []
        index: dict[int, int] = {}
        templates = []
        for step in part:
            leaves, spec = tree_flatten(step.args)
            template = []
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    if id(leaf) not in index:
                        index[id(leaf)] = len(tensors)
                        tensors.append(leaf)
                    template.append(("tensor", index[id(leaf)]))
                else:
                    template.append(("value", leaf))
            templates.append((spec, template))
        n_state = len(state)

        def run(*flat: torch.Tensor) -> State:
            current, inputs = tuple(flat[:n_state]), flat[n_state:]
            rebuilt = []
            for step, (spec, template) in zip(part, templates):
                leaves = [inputs[v] if kind == "tensor" else v for kind, v in template]
                rebuilt.append(dataclasses.replace(step, args=tree_unflatten(leaves, spec)))
            return run_steps(rebuilt, current)  # through the loop's offload, when it has one

        name = ("blocks", start, stop, n_state, tuple(tuple(t) for _, t in templates))
        return self.graphs.replay(name, run, (*state, *tensors))  # type: ignore[return-value]

    # ---- decisions ------------------------------------------------------------------------------------------------
    def _limits_allow(self, branch: _Branch, step: int, rows: int, device: torch.device) -> torch.Tensor:
        """Rows that may skip this step under max_warmup_steps, max_cached_steps, max_continuous_cached_steps
        (and only once a residual exists to reuse)."""
        cfg = self.session.config
        if step < int(cfg.max_warmup_steps or 0) or branch.computes is None:
            return torch.zeros(rows, dtype=torch.bool, device=device)
        allow = branch.computes > 0
        if cfg.max_cached_steps >= 0:
            allow &= branch.cached_steps < cfg.max_cached_steps  # type: ignore[operator]
        if cfg.max_continuous_cached_steps >= 0:
            allow &= branch.continuous < cfg.max_continuous_cached_steps  # type: ignore[operator]
        return allow

    def _relative_change(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Per row: sum|new − old| / sum|old|, the sums over every rank's tokens."""
        sums = torch.stack([_per_row_sum(new - old), _per_row_sum(old)], dim=1)
        self.reduce_sum(sums)
        return sums[:, 0] / sums[:, 1].clamp_min(_TINY)

    def _dbcache_rows(self, branch: _Branch, first_residual: torch.Tensor, step: int) -> torch.Tensor:
        cfg = self.session.config
        rows = first_residual.shape[0]
        allow = self._limits_allow(branch, step, rows, first_residual.device)
        if branch.first_residual is None:
            skip = torch.zeros_like(allow)
        else:
            change = self._relative_change(first_residual, branch.first_residual)
            skip = allow & (change < float(cfg.threshold or 0.0))
        # The reference residual is the one at the last step a row computed (so slow drift adds up).
        if branch.first_residual is None:
            branch.first_residual = first_residual.clone()
        else:
            keep = _rows(skip, first_residual)
            branch.first_residual = torch.where(keep, branch.first_residual, first_residual)
        return skip

    def _teacache_rows(self, branch: _Branch, signal: torch.Tensor, step: int) -> torch.Tensor:
        cfg = self.session.config
        rows = signal.shape[0]
        allow = self._limits_allow(branch, step, rows, signal.device)
        allow &= step < self.session.num_steps - 1  # the last step always computes
        if branch.signal is None:
            skip = torch.zeros_like(allow)
            branch.accumulated = torch.zeros(rows, dtype=torch.float32, device=signal.device)
        else:
            change = self._relative_change(signal, branch.signal)
            accumulated = branch.accumulated + rescale(self.coefficients, change)  # type: ignore[operator]
            skip = allow & (accumulated < float(cfg.threshold or 0.0))
            branch.accumulated = torch.where(skip, accumulated, torch.zeros_like(accumulated))
        branch.signal = signal.clone()
        return skip

    def _agree(self, skip: torch.Tensor) -> torch.Tensor:
        """Every rank of the branch takes the same decision: a row computes if any rank wants it to."""
        computes = (~skip).to(torch.int32)
        self.reduce_max(computes)
        return computes == 0

    # ---- the cached residual --------------------------------------------------------------------------------------
    def _apply_cached(self, branch: _Branch, base: State, step: int) -> State:
        if not branch.derivatives:
            raise RuntimeError("a cached step before any computed one (a bug in the skip decision)")
        if self.session.config.method != "taylorseer":
            return tuple(b + r.to(b.dtype) for b, r in zip(base, branch.derivatives[0]))
        # Taylor series at the last computed step: sum_k D_k · Δ^k / k!, each term only where it is known.
        delta = step - branch.computed_steps  # type: ignore[operator]
        out = []
        for i, b in enumerate(base):
            forecast = branch.derivatives[0][i].float()
            for k in range(1, len(branch.derivatives)):
                weight = (delta.float() ** k / math.factorial(k)) * (branch.computes > k)  # type: ignore[operator]
                forecast = forecast + branch.derivatives[k][i].float() * _rows(weight, forecast)
            out.append(b + forecast.to(b.dtype))
        return tuple(out)

    def _store(self, branch: _Branch, residual: State, computed: torch.Tensor, step: int) -> None:
        """Remember the middle blocks' residual of the rows that computed it (and, for TaylorSeer, update its
        finite-difference derivatives over the steps since the row last computed)."""
        rows = computed.shape[0]
        device = computed.device
        if branch.computes is None:
            branch.computes = torch.zeros(rows, dtype=torch.int64, device=device)
            branch.computed_steps = torch.zeros(rows, dtype=torch.int64, device=device)
            branch.cached_steps = torch.zeros(rows, dtype=torch.int64, device=device)
            branch.continuous = torch.zeros(rows, dtype=torch.int64, device=device)
        order = self.session.config.taylorseer_order if self.session.config.method == "taylorseer" else 0
        if self.session.config.method == "taylorseer":
            residual = tuple(r.float() for r in residual)
        new = [residual]
        if order and branch.derivatives:
            gap = (step - branch.computed_steps).clamp_min(1).float()  # type: ignore[operator]
            for k in range(order):
                if k >= len(branch.derivatives):
                    break
                new.append(tuple((n - o) / _rows(gap, n).to(n.dtype) for n, o in zip(new[k], branch.derivatives[k])))
        if not branch.derivatives:
            branch.derivatives = [tuple(r.clone() for r in new[0])]
        else:
            merged = []
            for k, values in enumerate(new):
                if k < len(branch.derivatives):
                    merged.append(
                        tuple(torch.where(_rows(computed, v), v, o) for v, o in zip(values, branch.derivatives[k]))
                    )
                else:
                    merged.append(tuple(torch.where(_rows(computed, v), v, torch.zeros_like(v)) for v in values))
            branch.derivatives = merged
        branch.computed_steps = torch.where(
            computed, torch.full_like(branch.computed_steps, step), branch.computed_steps
        )
        branch.computes = branch.computes + computed.long()

    def _count(self, branch: _Branch, skip: torch.Tensor) -> None:
        if branch.cached_steps is None:
            return
        branch.cached_steps = branch.cached_steps + skip.long()
        branch.continuous = torch.where(skip, branch.continuous + 1, torch.zeros_like(branch.continuous))  # type: ignore[operator]


def tail_blocks(block_at: list[int], head: int, tail: int) -> int:
    """How many blocks lie in steps [head, tail)."""
    return sum(1 for i in block_at if head <= i < tail)


def _glued(steps: Sequence[LoopStep], state: State) -> State:
    """`state` through the glue among `steps` only: the form the state has after them, blocks left out."""
    for step in steps:
        if step.block is None:
            state = step.run(state)
    return state


def rescale(coefficients: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """The TeaCache polynomial (highest power first) at x, at least 0 (a change adds up, never subtracts)."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out.clamp_min(0)


# Rescaling when a model names no coefficients: the relative change as it is.
IDENTITY_RESCALE = (1.0, 0.0)


def _reducers(groups) -> tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], None]]:
    """In-place sum over the sequence-parallel group, and max over the sequence- and tensor-parallel groups."""
    sp = groups.sequence.sp_group if groups is not None and groups.sequence is not None else None
    tp = groups.tp_group if groups is not None else None

    def reduce_sum(t: torch.Tensor) -> None:
        if sp is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=sp)

    def reduce_max(t: torch.Tensor) -> None:
        for group in (sp, tp):
            if group is not None:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

    return reduce_sum, reduce_max


@contextlib.contextmanager
def caching(
    models: Sequence[nn.Module],
    config: CacheConfig,
    num_steps: int,
    groups=None,
    teacache_coefficients: Sequence[float] | None = None,
) -> Iterator[CacheSession]:
    """Cache the block loops of `models` for one batch of `num_steps` denoising steps (`groups`: the engine's
    ParallelGroups, or None on one rank; `teacache_coefficients`: the checkpoint's fitted rescale polynomial, used
    unless the config names its own; without either the change is taken as it is). The pipeline's step callback
    must go through `session.wrap`."""
    config = config.resolved()
    session = CacheSession(config, num_steps)
    reduce_sum, reduce_max = _reducers(groups)
    loops = []
    try:
        for model in models:
            loop = getattr(model, "block_loop", None)
            if loop is None:
                raise ValueError(f"{type(model).__name__} has no block_loop: it cannot be cached")
            if loop.hook is not None:
                raise RuntimeError(f"{type(model).__name__}'s block loop already has a hook")
            coefficients = config.teacache_coefficients or teacache_coefficients or IDENTITY_RESCALE
            graphs = model.__dict__.get("forward")  # the engine's CUDA graphs of this model, when it has them
            graphs = graphs if isinstance(graphs, CudaGraphs) else None
            hook = LoopCache(session, coefficients, reduce_sum, reduce_max, graphs)
            session.hooks.append(hook)
            loop.hook = hook
            loops.append(loop)
        yield session
    finally:
        for loop in loops:
            loop.hook = None
