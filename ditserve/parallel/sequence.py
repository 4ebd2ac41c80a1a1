"""Sequence parallelism for DiTs: Ulysses (all-to-all over heads), Ring (K/V passed around a ring, partial results
merged by log-sum-exp), and both at once (USP: Ulysses inside, Ring outside).

It attaches from outside the model, as the model declares (`parallel/sharding.py`: the model class's
`sequence_sharding` and each `Attention`'s `segments`), at two seams:
- the model's forward is wrapped: every declared input is split along its sequence dimension (each token segment
  on its own, so that a stream's own weights still see its own tokens), every rank runs the model on its shard, and
  the output is gathered back;
- every self-attention `Attention` module (one with segments) is replaced: each rank holds all heads of a sequence
  shard, attention needs every key, and the two schemes provide them. Cross-attentions (segments None) keep their
  whole keys and values and need nothing.

Sequences that do not divide by the degree are padded at the end of each segment's shard. Padded keys are removed
before attention (their positions are known on every rank), so the result is exactly that of the unpadded
sequence; padded queries produce rows that the final gather drops.

Rank layout inside the sequence-parallel group: sp_rank = ring_rank · ulysses_size + ulysses_rank.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ditserve.kernels.row_copy import copy_rows
from ditserve.layers.attention import Attention, _cudnn_can_take, run_alongside
from ditserve.parallel.exchange import NcclExchange, make_exchange
from ditserve.parallel.sharding import SequenceSharding


@dataclass(frozen=True)
class SequenceParallelGroups:
    ulysses_group: dist.ProcessGroup | None
    ulysses_size: int
    ulysses_rank: int
    ring_group: dist.ProcessGroup | None
    ring_size: int
    ring_rank: int
    sp_group: dist.ProcessGroup | None  # all ulysses × ring ranks, for sharding and the final gather
    ring_ranks: tuple[int, ...] = ()  # global ranks of this ring, in ring order (for send/recv)

    @property
    def size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank


def build_sequence_parallel_groups(
    ulysses: int, ring: int, all_sp_ranks: list[list[int]] | None = None
) -> SequenceParallelGroups:
    """Create the groups for ulysses × ring sequence parallelism (every rank calls this with the same arguments).

    `all_sp_ranks` lists every sequence-parallel group of the world, each as its global ranks in sp-rank order;
    by default the whole world is one group. Groups are made for all of them, since new_group is collective.
    """
    world = dist.get_world_size()
    size = ulysses * ring
    if all_sp_ranks is None:
        all_sp_ranks = [list(range(world))]
    if any(len(ranks) != size for ranks in all_sp_ranks):
        raise ValueError(f"sequence-parallel groups must have ulysses {ulysses} × ring {ring} = {size} ranks")
    me = dist.get_rank()
    mine: dict = {}
    for ranks in all_sp_ranks:
        sp = dist.new_group(ranks)
        if me in ranks:
            mine["sp"] = sp
        for r in range(ring):
            members = ranks[r * ulysses : (r + 1) * ulysses]
            group = dist.new_group(members)
            if me in members:
                mine["ulysses"] = (group, members.index(me))
        for u in range(ulysses):
            members = [ranks[r * ulysses + u] for r in range(ring)]
            group = dist.new_group(members)
            if me in members:
                mine["ring"] = (group, members.index(me), tuple(members))
    if "sp" not in mine:
        raise ValueError(f"rank {me} is in none of the sequence-parallel groups {all_sp_ranks}")
    return SequenceParallelGroups(
        ulysses_group=mine["ulysses"][0],
        ulysses_size=ulysses,
        ulysses_rank=mine["ulysses"][1],
        ring_group=mine["ring"][0],
        ring_size=ring,
        ring_rank=mine["ring"][1],
        sp_group=mine["sp"],
        ring_ranks=mine["ring"][2],
    )


# ---- sharding with padding --------------------------------------------------------------------------------------
def shard_lengths(total: int, parts: int) -> tuple[int, list[int]]:
    """(padded shard length, valid tokens in each shard) for a sequence of `total` split into `parts`."""
    local = math.ceil(total / parts)
    return local, [max(0, min(local, total - i * local)) for i in range(parts)]


def shard_sequence(x: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """Shard `index` of x along `dim`, zero-padded to the common shard length."""
    local, valid = shard_lengths(x.shape[dim], parts)
    piece = x.narrow(dim, index * local, valid[index]) if valid[index] else x.narrow(dim, 0, 0)
    if valid[index] < local:
        pad_shape = list(x.shape)
        pad_shape[dim] = local - valid[index]
        piece = torch.cat([piece, x.new_zeros(pad_shape)], dim=dim)
    return piece


@dataclass
class SegmentLayout:
    """Where the valid tokens are in each sp rank's local sequence of one attention: the shards of its segments,
    each padded to its local length, in the attention's order."""

    segments: tuple[str, ...]
    local: dict[str, int]  # padded shard length of each segment
    valid: dict[str, list[int]]  # valid tokens of each segment on each sp rank
    _cache: dict = field(default_factory=dict)

    def valid_positions(self, sp_rank: int) -> list[int]:
        positions, offset = [], 0
        for segment in self.segments:
            positions += range(offset, offset + self.valid[segment][sp_rank])
            offset += self.local[segment]
        return positions

    def key_index(self, sp_ranks: list[int], device: torch.device) -> torch.Tensor | None:
        """Indices of valid keys in the concatenation of these ranks' local sequences (None: all valid)."""
        key = (tuple(sp_ranks), str(device))
        if key not in self._cache:
            local = sum(self.local[s] for s in self.segments)
            idx = [i * local + p for i, r in enumerate(sp_ranks) for p in self.valid_positions(r)]
            full = len(idx) == local * len(sp_ranks)
            self._cache[key] = None if full else torch.tensor(idx, device=device, dtype=torch.long)
        return self._cache[key]


# ---- attention pieces -------------------------------------------------------------------------------------------
def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention [B, S, H, D] plus the log-sum-exp of the scores [B, H, S] (float32), for merging partial results.

    With `key_mask` [B, S_k] (True = attend) each sample attends to its own valid keys only (one call per sample,
    so the fast kernel takes them without a mask); a sample with none gets a zero output and a log-sum-exp of -inf,
    which the merge weighs as nothing."""
    if key_mask is not None:
        outs, lses = [], []
        for b in range(q.shape[0]):
            keys = key_mask[b].nonzero().squeeze(1)
            if keys.numel() == 0:
                outs.append(torch.zeros_like(q[b : b + 1]))
                lses.append(q.new_full((1, q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32))
                continue
            o, lse = attention_with_lse(q[b : b + 1], k[b : b + 1, keys], v[b : b + 1, keys])
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if _cudnn_can_take(q):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
        return out.transpose(1, 2), lse.float().reshape(q.shape[0], q.shape[2], q.shape[1])
    scores = (qt.float() @ kt.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vt.float()
    return out.transpose(1, 2).to(q.dtype), lse


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: SequenceParallelGroups, block_keys, block_mask=None
) -> torch.Tensor:
    """q against the K/V blocks of every ring rank. block_keys(j) gives the valid-key index of ring rank j's block;
    block_mask(j) (if given) its key mask [B, valid keys] (see `attention_with_lse`)."""
    out = lse = None
    kv = torch.stack([k, v])  # one buffer, so each step passes one message on
    size, rank = groups.ring_size, groups.ring_rank
    for step in range(size):
        source = (rank - step) % size  # whose block we hold at this step
        if step < size - 1:  # start passing this block on while we compute with it
            kv_next = torch.empty_like(kv)
            requests = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, kv, groups.ring_ranks[(rank + 1) % size], groups.ring_group),
                    dist.P2POp(dist.irecv, kv_next, groups.ring_ranks[(rank - 1) % size], groups.ring_group),
                ]
            )
        idx = block_keys(source)
        kb, vb = kv.unbind(0) if idx is None else kv.index_select(2, idx).unbind(0)
        if kb.shape[1]:
            o, l_ = attention_with_lse(q, kb, vb, block_mask(source) if block_mask is not None else None)
            if out is None:
                out, lse = o.float(), l_
            else:
                new_lse = torch.logaddexp(lse, l_)
                # lse is [B, H, S]; outputs are [B, S, H, D]. A masked-out block (-inf) weighs nothing.
                w_old = torch.exp(lse - new_lse).nan_to_num(0.0).transpose(1, 2)[..., None]
                w_new = torch.exp(l_ - new_lse).nan_to_num(0.0).transpose(1, 2)[..., None]
                out = out * w_old + o.float() * w_new
                lse = new_lse
        if step < size - 1:
            for request in requests:
                request.wait()
            kv = kv_next
    return out.to(q.dtype)  # type: ignore[union-attr]


def _head_chunk(t: torch.Tensor, size: int, chunks: int, j: int) -> torch.Tensor:
    """[B, S, H, D] → [size, B, S, H/(size·chunks), D]: for each rank u, chunk j of the heads it will own."""
    b, s, h, d = t.shape
    return t.view(b, s, size, chunks, h // (size * chunks), d)[:, :, :, j].permute(2, 0, 1, 3, 4)


def message_layout(b: int, s: int, h: int, d: int, size: int, chunks: int) -> tuple[int, ...]:
    """The outgoing messages of one Ulysses exchange, all head groups in one buffer: [chunks, ranks, S, 3, B, hc, D]
    (group j's messages, buffer[j], are contiguous, as an all-to-all sends them)."""
    return (chunks, size, s, 3, b, h // (size * chunks), d)


def message_views(message: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B, S, ranks, chunks, hc, D] views of the messages: head u·(chunks·hc) + j·hc + i goes to rank u in
    group j, as `_head_chunk` splits them."""
    return tuple(message[:, :, :, i].permute(3, 2, 1, 0, 4, 5) for i in range(3))  # type: ignore[return-value]


def ulysses_attention(
    q,
    k,
    v,
    group,
    size: int,
    chunks: int,
    attend,
    alongside=None,
    message=None,
    alongside_carveout: int = 0,
    project=None,
    project_in_pieces: bool = True,
    exchange=None,
):
    """Ulysses: q, k, v [B, S, H, D] hold all heads of this rank's sequence shard; an all-to-all gives each rank
    the whole sequence for H/size heads, `attend(q, k, v)` runs on that ([B, size·S, h, D]), and another
    all-to-all brings the output back to [B, S, H, D].

    Each message to a rank is one piece [S, 3, B, h, D] (q, k and v together, token-major), so each exchange is
    one all-to-all, and what arrives from every rank, in rank order, reads as the whole sequence with one stride:
    attention takes q, k and v as strided views of the received buffer, with no regrouping after receiving (three
    separate pieces would make the exchange slower than that regrouping costs: docs/parallel.md). With `message`
    (from `message_layout`, which q, k and v are then views of: the model wrote them there, see
    `SequenceParallelAttention.input_buffers`) nothing is copied before sending either. Otherwise heads are
    regrouped into the messages with `copy_rows`, which moves whole rows where torch's strided copy moves one
    element at a time (docs/parallel.md).

    With `chunks` > 1 the heads go in that many groups so communication overlaps attention: every group's q/k/v
    exchange is queued at once (NCCL runs them in order on its own stream), attention on group j waits only for
    group j's exchange, and its output is sent back while group j+1 is computed. The result is the same as with
    one group: attention is independent per head.

    `alongside` (see `Attention`) runs once every exchange is queued, before the first wait; the call then returns
    (output, its result). Its GEMMs leave `alongside_carveout` SMs free for the exchange (see
    `ALONGSIDE_SM_CARVEOUT`; 0: none).

    With `project` (see `Attention`) the call returns the projected output, summed from alongside's result. With
    `project_in_pieces` the output is never assembled: each rank already holds its own tokens of the heads it
    attended to, so their product runs (with the same carve-out) while the output exchange brings the other
    ranks' heads, whose products follow as they arrive, one piece per rank. Otherwise the whole output is
    projected once it is back.

    `exchange` (from `make_exchange`; None: NCCL's all-to-all) moves the pieces: one receive buffer ("slot") per
    exchange, q/k/v of group j in slot j, its output in slot chunks + j.
    """
    b, s, d = q.shape[0], q.shape[1], q.shape[-1]
    h = math.prod(q.shape[2:-1])
    hc = h // (size * chunks)
    if message is None:
        message = q.new_empty(message_layout(b, s, h, d, size, chunks))
        for t, part in zip((q, k, v), message_views(message)):
            copy_rows(part, t.reshape(part.shape))
    if exchange is None:
        exchange = NcclExchange(group)
    exchange.prepare([message[0].numel()] * chunks + [message[0].numel() // 3] * chunks, q.dtype, q.device)
    incoming = [exchange.start(message[j], j) for j in range(chunks)]
    side = None
    if alongside is not None:
        with gemm_sm_carveout(alongside_carveout):
            side = alongside()
    outgoing, outputs = [], []
    for j, (received, work) in enumerate(incoming):
        work.wait()
        # received[u] is rank u's sequence shard of our chunk-j heads: in rank order they are the sequence.
        sequence = received.view(size * s, 3, b, hc, d)
        qj, kj, vj = (sequence[:, i].transpose(0, 1) for i in range(3))  # [B, size·S, hc, D], strided
        oj = attend(qj, kj, vj)
        send = oj.reshape(b, size, s, hc, d).permute(1, 0, 2, 3, 4)  # sequence shard u goes to rank u
        if not send.is_contiguous():  # batch > 1 (with one sample the shards are already in rank order)
            send = copy_rows(oj.new_empty(send.shape), send)
        outgoing.append((j, *exchange.start(send, chunks + j)))
        outputs.append(oj)

    def first_head(u: int, j: int) -> int:  # of rank u's chunk-j heads, as `_head_chunk` numbers them
        return (u * chunks + j) * hc

    if project is not None and project_in_pieces:
        me, partial = dist.get_rank(group), side
        with gemm_sm_carveout(alongside_carveout):
            for j, oj in enumerate(outputs):  # our own tokens of the heads we attended to need no exchange
                partial = project(oj[:, me * s : (me + 1) * s], first_head(me, j), partial)
        for j, back, work in outgoing:
            work.wait()
            for u in range(size):
                if u != me:
                    partial = project(back[u], first_head(u, j), partial)
        return partial
    out = q.new_empty((b, s, h, d))
    for j, back, work in outgoing:
        work.wait()
        copy_rows(_head_chunk(out, size, chunks, j), back)  # back[u]: our tokens, rank u's chunk-j heads
    if project is not None:
        return project(out, 0, side)
    return out if alongside is None else (out, side)


# SMs that the GEMMs run beside a Ulysses exchange (`alongside`) leave free, up to `CARVEOUT_MAX_TOKENS` tokens in
# the whole sequence. cuBLAS's Hopper GEMMs are persistent kernels that fill every SM, and NCCL's kernel needs SMs of
# its own to move data: without free SMs the exchange waits for the GEMM to end. On longer sequences NCCL's kernel
# runs on more SMs than are left free, and a carve-out only slows the exchange. The measurements: docs/parallel.md,
# "Why the thresholds are what they are".
ALONGSIDE_SM_CARVEOUT = 16
CARVEOUT_MAX_TOKENS = 8192


@contextlib.contextmanager
def gemm_sm_carveout(sms: int):
    """cuBLAS GEMMs issued inside (also when captured into a CUDA graph) use all but `sms` SMs. A no-op for 0, or
    where this torch lacks the (experimental) setting. torch prints a one-time warning when it is first set."""
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if not sms or setter is None:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    setter(sms)
    try:
        yield
    finally:
        setter(before)


# The output projection runs in pieces beside the output exchange above this many tokens in the whole sequence.
# Below it each piece is a small GEMM, and the pieces cost more than overlapping the exchange wins. The
# measurements: docs/parallel.md, "Why the thresholds are what they are".
PIECEWISE_PROJECTION_MIN_TOKENS = 8192


# Pure Ulysses pipelines two head groups up to this many tokens in the whole sequence, and sends all heads at once
# above it: long sequences keep attention busy long enough to cover the exchange, and halving the head count per
# kernel then costs more than the overlap wins. The measurements: docs/parallel.md, "Why the thresholds are what
# they are".
PIPELINED_MAX_TOKENS = 8192


class SequenceParallelAttention(nn.Module):
    """USP attention: Ulysses all-to-all (heads ↔ sequence) around Ring attention over the gathered shards."""

    def __init__(
        self,
        inner: Attention,
        groups: SequenceParallelGroups,
        ulysses_chunks: int | None = None,
        alongside_carveout: int | None = None,
        project_in_pieces: bool | None = None,
        exchange=None,
    ):
        super().__init__()
        self.inner = inner
        self.groups = groups
        # Head groups pipelined through pure Ulysses (1: one exchange each way; None: by sequence length, above).
        self.ulysses_chunks = ulysses_chunks
        # SMs the GEMMs beside an exchange leave free (None: by sequence length, above).
        self.alongside_carveout = alongside_carveout
        # The output projection in pieces beside the output exchange (None: by sequence length, above).
        self.project_in_pieces = project_in_pieces
        # How Ulysses's all-to-alls move (see parallel/exchange.py), one for every attention of the model.
        self.exchange = exchange if exchange is not None else NcclExchange(groups.ulysses_group)
        self.segments: tuple[str, ...] = inner.segments  # type: ignore[assignment]
        self.layout: SegmentLayout | None = None  # set by the model wrapper for each forward
        # The key mask of the whole sequence in the layout's order: every sp rank's local sequence, in rank order
        # ([B, ranks · local length]); set by the model wrapper for each forward (None: the model has no masks).
        self.key_mask: torch.Tensor | None = None
        self.message: torch.Tensor | None = None  # handed out by input_buffers, sent by the next forward

    @torch.compiler.disable
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alongside=None, project=None, key_mask=None, gate=None
    ):
        g, layout = self.groups, self.layout
        gate = self.gate_of_my_heads(gate) if self.inner.reads_gate else None
        # The model's `key_mask` is its local part: the whole sequence's comes from the wrapper (`self.key_mask`).
        full_mask = self.key_mask if key_mask is not None else None
        if key_mask is not None and full_mask is None:
            raise RuntimeError("a key mask was given, but the model declares no key_masks input to shard it from")
        if layout is None:
            raise RuntimeError("sequence-parallel attention called outside a sharded model forward")
        heads = math.prod(q.shape[2:-1])
        if g.ulysses_size > 1 and heads % g.ulysses_size:
            raise ValueError(f"{heads} heads cannot be split over ulysses degree {g.ulysses_size}")
        message, self.message = self.message, None
        if message is not None and not (q.dim() == 6 and q.data_ptr() == message.data_ptr()):
            message = None  # not the q we handed out

        def block_keys(ring_rank: int) -> torch.Tensor | None:
            ranks = [ring_rank * g.ulysses_size + u for u in range(g.ulysses_size)]
            return layout.key_index(ranks, q.device)

        def block_mask(ring_rank: int) -> torch.Tensor:
            """The key mask of ring rank j's block (its Ulysses group's local sequences), valid keys only."""
            local = full_mask.shape[1] // g.size  # type: ignore[union-attr]
            start = ring_rank * g.ulysses_size * local
            mask = full_mask[:, start : start + g.ulysses_size * local]  # type: ignore[index]
            idx = block_keys(ring_rank)
            return mask if idx is None else mask.index_select(1, idx)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Attention of this rank's heads over every token of the sequence-parallel group."""
            if g.ring_size > 1:
                if self.inner.is_sparse:
                    raise ValueError("sparse attention runs under Ulysses (heads split), not Ring")
                return ring_attention(q, k, v, g, block_keys, block_mask if full_mask is not None else None)
            idx = block_keys(0)
            if idx is not None:
                k, v = k.index_select(1, idx), v.index_select(1, idx)
                if self.inner.is_sparse:  # a pattern over the token grid: its queries are exactly the tokens
                    out = torch.zeros_like(q)
                    tokens_gate = None if gate is None else gate.index_select(1, idx)
                    return out.index_copy_(1, idx, self.inner(q.index_select(1, idx), k, v, gate=tokens_gate))
            if full_mask is not None:
                return self.inner(q, k, v, key_mask=block_mask(0))
            return self.inner(q, k, v, gate=gate)

        if g.ulysses_size == 1:  # Ring alone: its first exchange starts inside; the other work simply goes first
            return run_alongside(lambda: attend(q, k, v), alongside, project)
        chunks = self.chunks(heads, q.shape[1])
        carveout = self.carveout(q.shape[1]) if q.is_cuda else 0
        return ulysses_attention(
            q,
            k,
            v,
            g.ulysses_group,
            g.ulysses_size,
            chunks,
            attend,
            alongside,
            message=message,
            alongside_carveout=carveout,
            project=project,
            project_in_pieces=self.projects_in_pieces(q.shape[1]),
            exchange=self.exchange,
        )

    def gate_of_my_heads(self, gate: torch.Tensor | None) -> torch.Tensor | None:
        """VSA's gate [B, S, H, D] of this rank's tokens → [B, ranks·S, H/ranks, D], the whole sequence for the
        heads this rank attends to: one all-to-all, as q's (in one head group: `chunks` is 1 for a gate)."""
        g = self.groups
        if gate is None or g.ulysses_size == 1:
            return gate
        b, s, h, d = gate.shape
        size = g.ulysses_size
        send = _head_chunk(gate, size, 1, 0).contiguous()  # [ranks, B, S, h, D]: the heads as q's exchange splits them
        received = torch.empty_like(send)  # received[u]: rank u's tokens of our heads, in rank order the sequence
        dist.all_to_all_single(received, send, group=g.ulysses_group)
        return received.permute(1, 0, 2, 3, 4).reshape(b, size * s, h // size, d)

    def chunks(self, heads: int, tokens: int) -> int:
        """Head groups for pure Ulysses with `tokens` in this rank's shard (under Ring each group would pass its own
        K/V around the ring; a gate, VSA's, is exchanged for all of a rank's heads at once)."""
        if self.groups.ring_size > 1 or self.inner.reads_gate:
            return 1
        chunks = self.ulysses_chunks
        if chunks is None:
            chunks = 2 if self.gathered(tokens) <= PIPELINED_MAX_TOKENS else 1
        return chunks if (heads // self.groups.ulysses_size) % chunks == 0 else 1

    def projects_in_pieces(self, tokens: int) -> bool:
        """Whether the output projection runs in pieces beside the output exchange (see `ulysses_attention`), with
        `tokens` in this rank's shard."""
        if self.project_in_pieces is not None:
            return self.project_in_pieces
        return self.gathered(tokens) > PIECEWISE_PROJECTION_MIN_TOKENS

    def carveout(self, tokens: int) -> int:
        """SMs the work run beside a Ulysses exchange leaves free, with `tokens` in this rank's shard."""
        if self.alongside_carveout is not None:
            return self.alongside_carveout
        return ALONGSIDE_SM_CARVEOUT if self.gathered(tokens) <= CARVEOUT_MAX_TOKENS else 0

    def gathered(self, tokens: int) -> int:
        """The tokens one Ulysses exchange gathers, from `tokens` in this rank's shard: what the rules above count
        (the "whole sequence" their measurements name, which it is without Ring). Under Ring the exchange gathers
        one ring block; what the rules weigh, the exchange's size against the GEMMs beside it on this rank's shard,
        scales with that block and not with the whole sequence."""
        return tokens * self.groups.ulysses_size

    @torch.compiler.disable
    def input_buffers(
        self, like: torch.Tensor, shape: tuple[int, ...], value: torch.Tensor | None = None, fp8_qk: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With Ulysses: q, k and v as views of the outgoing messages (see `Attention.input_buffers`), so that the
        model's writes are the packing; kept until forward sends them. q and k are never handed out in FP8 here
        (`fp8_qk`): the exchanges and Ring's kernel move and read them in the model's dtype."""
        b, s, h, d = shape
        if self.groups.ulysses_size == 1 or h % self.groups.ulysses_size:
            return self.inner.input_buffers(like, shape, value)
        self.message = like.new_empty(message_layout(b, s, h, d, self.groups.ulysses_size, self.chunks(h, s)))
        return message_views(self.message)


def enable_sequence_parallel(
    model: nn.Module,
    groups: SequenceParallelGroups,
    ulysses_chunks: int | None = None,
    alongside_carveout: int | None = None,
    project_in_pieces: bool | None = None,
    ulysses_exchange: str = "auto",
    one_machine: bool = True,
    graphed: bool = True,
) -> nn.Module:
    """Shard a DiT's forward over the sequence-parallel group as its class's `sequence_sharding` declares (see the
    module docstring).

    `ulysses_chunks`: with pure Ulysses, attention runs in this many head groups so that their exchanges overlap
    the attention of the others (used when the heads per rank divide by it; 1 turns it off; None, the default:
    2 up to `PIPELINED_MAX_TOKENS` tokens, else 1). `alongside_carveout`: SMs that the model's work run beside a
    Ulysses exchange leaves free for it (0: none; None, the default: `ALONGSIDE_SM_CARVEOUT` up to
    `CARVEOUT_MAX_TOKENS` tokens, else 0). `project_in_pieces`: whether a Ulysses attention given the output
    projection (see `Attention`) projects each rank's heads as they are there, beside the output exchange (None,
    the default: above `PIECEWISE_PROJECTION_MIN_TOKENS` tokens). `ulysses_exchange`: how the all-to-alls move,
    "auto", "nccl" or "copy-engine" (see parallel/exchange.py), `one_machine` saying whether the ranks share one
    and `graphed` whether the forward will replay as a CUDA graph (which "auto" weighs)."""
    if groups.size == 1:
        return model
    sharding: SequenceSharding | None = getattr(model, "sequence_sharding", None)
    if sharding is None:
        raise ValueError(f"{type(model).__name__} declares no sequence_sharding: it cannot run sequence-parallel")
    exchange = None
    if groups.ulysses_size > 1:
        exchange = make_exchange(groups.ulysses_group, ulysses_exchange, one_machine, graphed)
    wrappers: list[SequenceParallelAttention] = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Attention) and child.segments is not None:
                unknown = set(child.segments) - set(sharding.segments)
                if unknown:
                    raise ValueError(f"{child_name}: segments {sorted(unknown)} are not among the sharded inputs")
                wrapper = SequenceParallelAttention(
                    child, groups, ulysses_chunks, alongside_carveout, project_in_pieces, exchange
                )
                setattr(module, child_name, wrapper)
                wrappers.append(wrapper)
    original_forward = model.forward
    signature = inspect.signature(original_forward)
    n, r = groups.size, groups.rank
    # Layouts per segment lengths, kept: their key indices are made once, on the first forward, not during a CUDA
    # graph capture (which cannot copy from host memory).
    layouts: dict[tuple, dict[tuple[str, ...], SegmentLayout]] = {}

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        totals: dict[str, int] = {}
        for name, how in sharding.inputs.items():
            tensor = bound.arguments.get(name)
            if tensor is None:
                continue
            length = tensor.shape[how.dim]
            if totals.setdefault(how.segment, length) != length:
                raise ValueError(f"{name}: {length} {how.segment} tokens, but another input has {totals[how.segment]}")
        key = tuple(sorted(totals.items()))
        if key not in layouts:
            local = {s: shard_lengths(total, n)[0] for s, total in totals.items()}
            valid = {s: shard_lengths(total, n)[1] for s, total in totals.items()}
            layouts[key] = {w.segments: SegmentLayout(w.segments, local, valid) for w in wrappers}
        for wrapper in wrappers:
            wrapper.layout = layouts[key][wrapper.segments]
            wrapper.key_mask = _whole_key_mask(wrapper.segments, sharding, bound.arguments, totals, n)
        for name, how in sharding.inputs.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = shard_sequence(bound.arguments[name], how.dim, n, r)
        out = original_forward(*bound.args, **bound.kwargs)
        dim = sharding.output.dim
        valid = shard_lengths(totals[sharding.output.segment], n)[1]
        gathered = [torch.empty_like(out) for _ in range(n)]
        dist.all_gather(gathered, out.contiguous(), group=groups.sp_group)
        return torch.cat([piece.narrow(dim, 0, valid[i]) for i, piece in enumerate(gathered)], dim=dim)

    model.forward = forward  # type: ignore[method-assign]
    return model


def _whole_key_mask(
    segments: tuple[str, ...], sharding: SequenceSharding, arguments: dict, totals: dict[str, int], parts: int
) -> torch.Tensor | None:
    """The key mask of one attention's whole sequence, as its keys arrive from every rank (each rank's shard of each
    segment, padded, in the attention's order; rank after rank); padding is False. None when no segment of it has
    a mask input given."""
    masks = {s: arguments.get(sharding.key_masks[s]) for s in segments if s in sharding.key_masks}
    given = [m for m in masks.values() if m is not None]
    if not given:
        return None
    batch, device = given[0].shape[0], given[0].device
    pieces = []
    for rank in range(parts):
        for segment in segments:
            mask = masks.get(segment)
            if mask is None:
                mask = torch.ones((batch, totals[segment]), dtype=torch.bool, device=device)
            pieces.append(shard_sequence(mask.bool(), 1, parts, rank))
    return torch.cat(pieces, dim=1)


def disable_sequence_parallel(model: nn.Module) -> nn.Module:
    """Undo enable_sequence_parallel: the plain forward and the plain attention modules again."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SequenceParallelAttention):
                setattr(module, child_name, child.inner)
    model.__dict__.pop("forward", None)
    return model


__all__ = [
    "SegmentLayout",
    "SequenceParallelAttention",
    "SequenceParallelGroups",
    "attention_with_lse",
    "build_sequence_parallel_groups",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "shard_lengths",
    "shard_sequence",
]
