"""How a Ulysses all-to-all moves its pieces between the ranks of a group: the collective that Ulysses adds.

- "nccl": `dist.all_to_all_single` (gloo's on the CPU). NCCL's kernel moves the data with SMs of its own, which the
  GEMMs that run beside the exchange then lack, and they run slower; capping NCCL's channels spares the GEMMs but
  slows the exchange more.
- "copy-engine": through symmetric memory. Each exchange's receive buffer lies in memory that every rank of the
  group has mapped, and a rank writes its piece for each peer straight into that peer's buffer with a device copy
  (cudaMemcpyAsync), which the GPU's copy engines carry out: no SMs. Two barriers of the group (one-block kernels)
  frame the copies: after the first, every rank is done reading the buffers from their last use; after the second,
  every piece has arrived. Faster than NCCL's all-to-all, alone and per step of FLUX.1-dev. It needs CUDA GPUs
  with NCCL in one machine (symmetric memory maps the peers' memory over NVLink or PCIe peer access).
- "auto" (the default): the copy engines where they can work (a NCCL group, every rank on one machine) under CUDA
  graphs, for pure Ulysses and for Ulysses groups inside Ring, tensor or CFG parallelism alike (faster than NCCL
  in each); NCCL for an eager forward: launched one by one, the two barriers and a copy per rank cost more host time
  than NCCL's one call, and eager multi-GPU steps wait on the host already.
  If symmetric memory cannot be set up (no peer access between the GPUs, say), NCCL from then on, with a warning.
  The ranks are assumed alike: a set-up that failed on some ranks only would leave the others waiting in the
  rendezvous. (A process that set symmetric memory up for an earlier engine cannot for the next one's fresh ranks:
  see parallel/symmetric.py.)

The ranks of a Ulysses group run the same layers on the same shapes in the same order, so they lay out and grow
the shared buffer identically; growing is collective (a rendezvous) and cannot happen inside a CUDA graph capture,
so a call whose buffers do not fit then goes through NCCL (the engine's eager warm-up at the same shape has grown
it by then).

The measurements behind each choice: docs/parallel.md, "Why the thresholds are what they are".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ditserve.parallel.symmetric import symmetric_buffer

ULYSSES_EXCHANGES = ("auto", "nccl", "copy-engine")

log = logging.getLogger(__name__)


class NcclExchange:
    """The process group's own all-to-all (NCCL's on GPUs, gloo's on the CPU)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def prepare(self, sizes: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        """Nothing to lay out: each exchange receives into a new tensor."""

    def start(self, send: torch.Tensor, slot: int):
        """Begin sending `send[u]` to rank u; returns (the tensor that receives rank u's piece in [u], a handle
        whose wait() makes the current stream wait for the exchange)."""
        received = torch.empty_like(send)
        return received, dist.all_to_all_single(received, send, group=self.group, async_op=True)


class _Arrival:
    """The handle of a copy-engine exchange: the current stream waits for the second barrier."""

    def __init__(self, done: torch.cuda.Event):
        self.done = done

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.done)


class CopyEngineExchange:
    """An all-to-all whose pieces are written into the peers' receive buffers by the copy engines (see above).

    One call of Ulysses attention makes several exchanges (q/k/v and output, per head group); `prepare` lays out
    one receive buffer ("slot") for each, back to back in the shared buffer, and `start(send, slot)` fills one.
    A slot is rewritten only by a later call, whose first barrier every rank passes only once its own stream has
    issued everything before it, including the reads of that slot."""

    def __init__(self, group: dist.ProcessGroup, fall_back_when_unavailable: bool = False):
        self.group = group
        self.fallback = NcclExchange(group)
        # Whether a failure to set up symmetric memory sends every exchange through NCCL (else it is raised).
        self.fall_back_when_unavailable = fall_back_when_unavailable
        self.unavailable = False
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.buffer: torch.Tensor | None = None  # this rank's part of the shared buffer (flat)
        self.handle = None  # the rendezvous: barriers, the peers' parts
        self.peers: list[torch.Tensor] = []  # every rank's part, mapped here (this rank's own included)
        self.slots: list[tuple[int, int]] = []  # (offset, elements) of each slot laid out by prepare
        self.stream: torch.cuda.Stream | None = None
        self.ready = False  # whether this call's slots fit (else its exchanges go through NCCL)

    def prepare(self, sizes: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        """Lay out one receive buffer per exchange of the coming call (`sizes` in elements), growing the shared
        buffer when they do not fit (collective; see the module docstring)."""
        total = sum(sizes)
        self.slots = [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]
        fits = self.buffer is not None and self.buffer.dtype == dtype and self.buffer.numel() >= total
        if not fits:
            if self.unavailable or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                self.ready = False
                return
            try:
                self._grow(total, dtype, device)
            except Exception as exc:
                if not self.fall_back_when_unavailable:
                    raise
                log.warning("Ulysses exchange: symmetric memory unavailable (%s); using NCCL", exc)
                self.unavailable, self.ready = True, False
                return
        self.ready = True

    def _grow(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        grown_from = 0
        if self.buffer is not None:
            # Work still queued may read or write the old buffer: it is released only once the device is done.
            torch.cuda.synchronize(device)
            grown_from = self.buffer.numel() if self.buffer.dtype == dtype else 0
        self.buffer = self.handle = None
        self.peers = []
        buffer, self.handle = symmetric_buffer(numel, dtype, device, self.group, grown_from)
        self.peers = [self.handle.get_buffer(u, (buffer.numel(),), dtype, 0) for u in range(self.size)]
        self.buffer = buffer
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)

    def slot_for(self, send: torch.Tensor, slot: int) -> tuple[int, int]:
        """(offset, elements) of `slot`, checked against what `send` brings."""
        offset, numel = self.slots[slot]
        if not send.is_contiguous() or send.shape[0] != self.size or send.numel() != numel:
            raise ValueError(
                f"slot {slot} exchanges {self.size} contiguous pieces of {numel} elements in all, got a "
                f"{'' if send.is_contiguous() else 'non-contiguous '}tensor of shape {tuple(send.shape)}"
            )
        return offset, numel

    def start(self, send: torch.Tensor, slot: int):
        """As NcclExchange.start; `send` [ranks, ...] must be contiguous (one piece per rank) and the size laid out
        for `slot`."""
        if not self.ready:
            return self.fallback.start(send, slot)
        offset, numel = self.slot_for(send, slot)
        piece = numel // self.size
        flat = send.view(-1)
        current = torch.cuda.current_stream()
        stream = self.stream
        stream.wait_stream(current)
        send.record_stream(stream)  # the copies read it after the caller may have let it go
        with torch.cuda.stream(stream):
            self.handle.barrier(channel=0)  # every rank is done with its slots' last use
            for step in range(1, self.size):  # each rank starts with a different peer
                peer = (self.rank + step) % self.size
                mine = self.peers[peer].narrow(0, offset + self.rank * piece, piece)
                mine.copy_(flat.narrow(0, peer * piece, piece))
            own = offset + self.rank * piece
            self.buffer.narrow(0, own, piece).copy_(flat.narrow(0, self.rank * piece, piece))
            self.handle.barrier(channel=1)  # every piece has arrived
            done = torch.cuda.Event()
            done.record(stream)
        received = self.buffer.narrow(0, offset, send.numel()).view(send.shape)
        return received, _Arrival(done)


def make_exchange(
    group: dist.ProcessGroup | None, method: str, one_machine: bool = True, graphed: bool = True
) -> NcclExchange | CopyEngineExchange:
    """The all-to-all for a Ulysses group, by method (see the module docstring); `one_machine`: whether every rank
    of the group runs on one machine; `graphed`: whether the forward replays as a CUDA graph."""
    if method not in ULYSSES_EXCHANGES:
        raise ValueError(f"ulysses_exchange {method!r} is not one of {', '.join(ULYSSES_EXCHANGES)}")
    on_nccl = group is not None and dist.get_backend(group) == "nccl"
    if method == "nccl" or (method == "auto" and not (on_nccl and one_machine and graphed)):
        return NcclExchange(group)
    if not on_nccl or not one_machine:
        raise ValueError(f"ulysses_exchange {method!r} needs CUDA GPUs with NCCL in one machine")
    return CopyEngineExchange(group, fall_back_when_unavailable=method == "auto")
