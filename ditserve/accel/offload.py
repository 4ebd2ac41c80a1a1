"""Offload: the DiT's blocks streamed from host memory (layerwise), and whole components kept on the host between calls.

Layerwise DiT offload. Every repeated block's parameters and buffers are packed into one flat host buffer per block
(pinned on CUDA, so copies run asynchronously at full PCIe speed and can be captured in CUDA graphs). On the device
there is a fixed ring of `prefetch + 1` flat buffers ("slots"), each as large as the largest block. Block i's
tensors are views into slot `i % slots`, set once: the model's code and its compiled or captured kernels see
ordinary parameters at fixed addresses, and what lies at those addresses changes as blocks are copied in. While
block i computes, blocks i+1..i+prefetch are copied into their slots on a separate stream; block i + slots is copied
into block i's slot only once block i's compute is done (an event). Small modules (embeddings, norms, the final
layer) stay on the device.

The copying happens at the block loop (layers/blocks.py): `BlockLoop.offload` is a `BlockOffload`, and every run of
steps (the whole loop, or the parts a cache hook runs) goes through `BlockOffload.run`. A run is self-contained: its
first blocks are fetched at its start and the copy stream joins the compute stream at its end, so a CUDA graph of a
forward, or of one run of blocks, replays exactly what was captured. The ordering is expressed through `Ring`'s
four calls (begin a run, copy into a slot, before and after a block's compute); on the CPU they are plain
synchronous copies, so the mechanism (which block goes to which slot when) is exercised and checked on the CPU too.

Models with several DiTs that never run at once (Wan2.2's two experts) share one ring: the expert that is not
running keeps all its blocks on the host.

Component offload: a text encoder, image encoder or VAE kept in (pinned) host memory and copied to the device for
each call of its entry methods (`forward`, `encode`, `decode`), freed from the device when the call returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ditserve.layers.blocks import LoopStep, State

# Tensors start at multiples of this many bytes inside a flat buffer (any dtype's alignment, and cache lines).
_ALIGN = 256

# The blocks prefetched ahead when the model names no `offload_prefetch_size`.
DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class _Entry:
    """One tensor of a block inside its flat buffers."""

    tensor: torch.Tensor  # the module's parameter or buffer object (its .data is re-pointed)
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.narrow(0, self.offset, self.nbytes).view(self.dtype).view(self.shape)


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module` and its children, each once (a tensor two modules share counts once)."""
    seen: set[int] = set()
    out = []
    for sub in module.modules():
        for t in [*sub._parameters.values(), *sub._buffers.values()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list[tuple[int, int]], int]:
    """(offset, nbytes) of each tensor in one flat byte buffer, and the buffer's size."""
    places, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        places.append((size, nbytes))
        size += -(-nbytes // _ALIGN) * _ALIGN
    return places, size


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (each once)."""
    return sum(t.numel() * t.element_size() for t in _module_tensors(module))


class Immediate:
    """Ordering on the CPU: every copy is done when issued, so there is nothing to wait for."""

    def begin(self) -> None:
        pass

    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor, after_compute: bool) -> None:
        dst.copy_(src)

    def before_compute(self, slot: int) -> None:
        pass

    def after_compute(self, slot: int) -> None:
        pass

    def end(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class StreamOrder:
    """Ordering on CUDA: copies on a stream of their own; `copied[s]` tells the compute stream slot s is filled,
    `computed[s]` tells the copy stream the block in slot s is done with it."""

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.computed = [torch.cuda.Event() for _ in range(slots)]

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor, after_compute: bool) -> None:
        with torch.cuda.stream(self.stream):
            if after_compute:
                self.stream.wait_event(self.computed[slot])
            dst.copy_(src, non_blocking=True)
            self.copied[slot].record(self.stream)

    def before_compute(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])

    def after_compute(self, slot: int) -> None:
        self.computed[slot].record(torch.cuda.current_stream(self.device))

    def end(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class Ring:
    """The device slots blocks are copied into, and the ordering of copies against compute (`order`: StreamOrder
    on CUDA, Immediate on the CPU). A slot's `computed` event is waited on only if it was recorded in the same run,
    so a run captured in a CUDA graph holds no dependency on work outside it; the run's start orders it after
    everything before."""

    def __init__(self, device: torch.device, slots: int, slot_bytes: int):
        self.device = device
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        self.cuda = device.type == "cuda"
        self.order: Immediate | StreamOrder = StreamOrder(device, slots) if self.cuda else Immediate()
        self._computed_in_run: set[int] = set()
        self.copies = 0  # blocks copied in since the start (for tests and logs)

    @property
    def size(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def begin_run(self) -> None:
        """Copies from here on wait for everything issued so far (the previous run's last blocks used the slots)."""
        self._computed_in_run.clear()
        self.order.begin()

    def copy(self, slot: int, host: torch.Tensor) -> None:
        """Copy a block's host buffer into `slot`, after the slot's previous block (in this run) is computed."""
        self.copies += 1
        dst = self.buffers[slot].narrow(0, 0, host.numel())
        self.order.copy(slot, dst, host, after_compute=slot in self._computed_in_run)

    def before_compute(self, slot: int) -> None:
        self.order.before_compute(slot)

    def after_compute(self, slot: int) -> None:
        self._computed_in_run.add(slot)
        self.order.after_compute(slot)

    def end_run(self) -> None:
        """The compute stream joins the copy stream (a copy of a block a cache hook skipped may still be running)."""
        self.order.end()

    def synchronize(self) -> None:
        self.order.synchronize()


def _host_buffers(sizes: Sequence[int], pin: bool) -> Iterator[torch.Tensor]:
    """One host buffer per block, carved from few allocations. torch's pinned allocator rounds every allocation up
    to a power of two (a 0.66 GiB block would take 1 GiB): blocks are grouped, in order, into allocations of at most
    the largest power of two the remaining blocks fill, so the rounding wastes little (about 1.5% for Wan2.1-14B).

    A generator: each allocation is made when its first buffer is asked for, so a caller that copies host tensors
    in and frees them as it goes holds the module plus one allocation, not the module twice."""
    i = 0
    while i < len(sizes):
        rest = sum(sizes[i:])
        cap = max(1 << max(rest.bit_length() - 1, 0), sizes[i])
        j, used = i, 0
        while j < len(sizes) and used + sizes[j] <= cap:
            used += sizes[j]
            j += 1
        group = torch.empty(used, dtype=torch.uint8, pin_memory=pin)
        yield from group.split(list(sizes[i:j]))
        i = j


class BlockOffload:
    """One model's repeated blocks on the host, streamed through a `Ring` at its block loop."""

    def __init__(self, blocks: Sequence[nn.Module], ring: Ring, pin: bool):
        self.blocks = list(blocks)
        self.ring = ring
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        self.entries: list[list[_Entry]] = []
        sizes = []
        for block in self.blocks:
            tensors = _module_tensors(block)
            places, size = _layout(tensors)
            self.entries.append(
                [_Entry(t, off, n, t.dtype, tuple(t.shape)) for t, (off, n) in zip(tensors, places, strict=True)]
            )
            sizes.append(size)
        if max(sizes) > ring.buffers[0].numel():
            raise ValueError("a block is larger than the ring's slots")
        self.host: list[torch.Tensor] = []
        for i, (entries, flat) in enumerate(zip(self.entries, _host_buffers(sizes, pin), strict=True)):
            self.host.append(flat)
            for e in entries:
                e.view(flat).copy_(e.tensor.detach())
            self._point_block_at_slot(i)  # the block's own storage (device or host) is freed as we go

    def slot(self, block_index: int) -> int:
        return block_index % self.ring.size

    @property
    def host_bytes(self) -> int:
        return sum(f.numel() for f in self.host)

    def _point_block_at_slot(self, i: int) -> None:
        slot = self.ring.buffers[self.slot(i)]
        for e in self.entries[i]:
            e.tensor.data = e.view(slot)

    def _point_at_slots(self) -> None:
        for i in range(len(self.entries)):
            self._point_block_at_slot(i)

    def _point_at_host(self) -> None:
        for entries, flat in zip(self.entries, self.host):
            for e in entries:
                e.tensor.data = e.view(flat)

    def run(self, steps: Sequence[LoopStep], state: State) -> State:
        """Run a contiguous part of the block loop, each block's weights copied in ahead of its turn."""
        order = [self.index[id(s.block)] for s in steps if s.block is not None]
        if any(b != a + 1 for a, b in zip(order, order[1:])):
            raise ValueError(f"offloaded blocks must run in order, got {order}")
        ring = self.ring
        ahead = ring.size - 1
        ring.begin_run()
        fetched = k = 0
        for step in steps:
            if step.block is None:
                state = step.run(state)
                continue
            while fetched < len(order) and fetched <= k + ahead:
                block = order[fetched]
                ring.copy(self.slot(block), self.host[block])
                fetched += 1
            slot = self.slot(order[k])
            ring.before_compute(slot)
            state = step.run(state)
            ring.after_compute(slot)
            k += 1
        ring.end_run()
        return state

    def with_block(self, block: nn.Module, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """`fn` (which reads `block`'s weights outside the loop: TeaCache's signal) run with the block copied in."""
        i = self.index[id(block)]

        def run() -> torch.Tensor:
            self.ring.begin_run()
            self.ring.copy(self.slot(i), self.host[i])
            self.ring.before_compute(self.slot(i))
            out = fn()
            self.ring.after_compute(self.slot(i))
            self.ring.end_run()
            return out

        return run

    @contextlib.contextmanager
    def host_weights(self) -> Iterator[None]:
        """The blocks' tensors are their host copies while inside: changes to them (a LoRA merge) are what later
        forwards copy in."""
        self.ring.synchronize()
        if self.ring.cuda:
            torch.cuda.synchronize(self.ring.device)
        self._point_at_host()
        try:
            yield
        finally:
            self._point_at_slots()


def enable_layerwise_offload(
    models: Sequence[nn.Module], device: torch.device, prefetch: int | None = None, pin: bool = True
) -> list[BlockOffload]:
    """Move the repeated blocks of `models` (DiTs that run one at a time) to host memory, one ring of
    `prefetch + 1` device slots shared by all of them, and everything else of each model to `device`.
    `prefetch` None: the largest `offload_prefetch_size` the models name (DEFAULT_PREFETCH if none)."""
    if prefetch is None:
        prefetch = max(getattr(m, "offload_prefetch_size", DEFAULT_PREFETCH) for m in models)
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1 block, got {prefetch}")
    pin = pin and device.type == "cuda"
    all_blocks = [list(m.repeated_blocks()) for m in models]  # type: ignore[operator]
    if any(getattr(m, "block_loop", None) is None for m in models):
        raise ValueError("layerwise offload needs a model that runs its blocks through a BlockLoop")
    slots = min(prefetch + 1, max(len(b) for b in all_blocks))
    slot_bytes = max(_layout(_module_tensors(block))[1] for blocks in all_blocks for block in blocks)
    ring = Ring(device, slots, slot_bytes)
    offloads = []
    for model, blocks in zip(models, all_blocks):
        offload = BlockOffload(blocks, ring, pin)
        # Everything outside the blocks (whose tensors now live in the ring) goes to the device.
        in_blocks = {id(t) for b in blocks for t in _module_tensors(b)}
        for t in _module_tensors(model):
            if id(t) not in in_blocks and t.device != device:
                t.data = t.data.to(device)
        model.block_loop.offload = offload  # type: ignore[union-attr]
        offloads.append(offload)
    return offloads


def disable_layerwise_offload(models: Sequence[nn.Module]) -> None:
    """Undo enable_layerwise_offload: each block's tensors get storage of their own on the ring's device again,
    from the host copies (a LoRA merge made meanwhile included)."""
    for model in models:
        offload = model.block_loop.offload  # type: ignore[union-attr]
        if offload is None:
            continue
        offload.ring.synchronize()
        device = offload.ring.device
        for entries, flat in zip(offload.entries, offload.host):
            for e in entries:
                e.tensor.data = e.view(flat).to(device, copy=True)
        model.block_loop.offload = None  # type: ignore[union-attr]


class ComponentOffload:
    """A component (text encoder, image encoder, VAE) kept in host memory and on the device only while one of its
    entry methods runs. Its weights do not change, so nothing is copied back."""

    ENTRY_METHODS = ("forward", "encode", "decode")

    def __init__(self, module: nn.Module, device: torch.device, pin: bool = True):
        self.module = module
        self.device = device
        pin = pin and device.type == "cuda"
        tensors = _module_tensors(module)
        places, _ = _layout(tensors)
        flats = _host_buffers([-(-n // _ALIGN) * _ALIGN for _, n in places], pin)
        self.tensors = []
        for t, (_, n), flat in zip(tensors, places, flats, strict=True):
            host = flat.narrow(0, 0, n).view(t.dtype).view(t.shape)
            host.copy_(t.detach())
            t.data = host
            self.tensors.append((t, host))
        self.depth = 0
        self.loads = 0  # times brought to the device (for tests and logs)
        for name in self.ENTRY_METHODS:
            if callable(getattr(type(module), name, None)):
                setattr(module, name, self._entry(getattr(module, name)))

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, host in self.tensors)

    def _entry(self, method: Callable) -> Callable:
        def on_device(*args, **kwargs):
            with self.on_device():
                return method(*args, **kwargs)

        return on_device

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        if self.depth == 0:
            self.loads += 1
            for t, host in self.tensors:
                t.data = host.to(self.device, non_blocking=True)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for t, host in self.tensors:
                    t.data = host  # the device copy is freed (the caching allocator reuses it once the stream is past)


__all__ = [
    "BlockOffload",
    "ComponentOffload",
    "Ring",
    "disable_layerwise_offload",
    "enable_layerwise_offload",
    "tensor_bytes",
]
