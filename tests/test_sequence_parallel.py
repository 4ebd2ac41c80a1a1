"""Sequence parallelism on CPU (gloo): Ulysses, Ring and both give the single-process result, also for sequences
that do not divide by the degree. Tolerance: 1e-4 absolute in float32 (the sharded run sums attention in another
order; the single-process outputs are O(10))."""

from __future__ import annotations

import pytest
import ranks
import torch
import torch.distributed as dist

from ditserve.engine.distributed import free_port
from ditserve.loader.weights import build_on_meta, init_dummy_weights, materialize
from ditserve.models.flux import FluxConfig, FluxTransformer
from ditserve.parallel.exchange import CopyEngineExchange
from ditserve.parallel.sequence import build_sequence_parallel_groups, enable_sequence_parallel, shard_lengths
from ditserve.parallel.sharding import SequenceSharding, Sharded

CONFIG = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)


def make_model() -> FluxTransformer:
    model = materialize(build_on_meta(lambda: FluxTransformer(FluxConfig.from_dict(CONFIG)), torch.float32), "cpu")
    init_dummy_weights(model, seed=5, std=0.2)
    return model.eval()


def make_inputs(h: int, w: int, text: int) -> dict:
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(2, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(2, text, 32, generator=g),
        pooled_projections=torch.randn(2, 24, generator=g),
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5, 3.5]),
    )


class _SlotsOnCpu(CopyEngineExchange):
    """The copy-engine exchange's layout and checks, on the CPU: its receive buffers are slots of one local tensor,
    filled by gloo's all-to-all instead of the copy engines. Slots of one call that overlapped, or a send that
    broke the exchange's contract (contiguous, one piece per rank, the size laid out), would show here; on GPUs
    only the CUDA tests would see them."""

    def _grow(self, numel, dtype, device):
        self.buffer = torch.full((numel,), float("nan"), dtype=dtype)  # a slot read before it is filled: NaN

    def start(self, send, slot):
        offset, numel = self.slot_for(send, slot)
        received = self.buffer.narrow(0, offset, numel).view(send.shape)
        dist.all_to_all_single(received, send, group=self.group)
        return received, dist.barrier(group=self.group, async_op=True)


def _worker(
    rank: int,
    world: int,
    port: int,
    ulysses: int,
    ring: int,
    shape: tuple,
    queue,
    compiled: bool = False,
    slots: bool = False,
) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        from ditserve.parallel import sequence

        if slots:
            sequence.make_exchange = lambda group, *args: _SlotsOnCpu(group)
        model = enable_sequence_parallel(make_model(), build_sequence_parallel_groups(ulysses, ring))
        if compiled:
            from ditserve.accel.compile import compile_repeated_blocks

            compile_repeated_blocks(model)
        # Every Ulysses exchange must send what the model wrote into its messages, with no packing copy.
        sent_in_place = []
        plain = sequence.ulysses_attention

        def recording(*args, message=None, **kwargs):
            sent_in_place.append(message is not None)
            return plain(*args, message=message, **kwargs)

        sequence.ulysses_attention = recording
        with torch.no_grad():
            out = model(**make_inputs(*shape))
        assert all(sent_in_place) and len(sent_in_place) == (4 if ulysses > 1 else 0), sent_in_place
        if rank == 0:
            queue.put(out.numpy())  # by value: the child exits before the parent reads
    finally:
        dist.destroy_process_group()


def run_parallel(ulysses: int, ring: int, shape: tuple, compiled: bool = False, slots: bool = False) -> torch.Tensor:
    queue = ranks.queue()
    world = ulysses * ring
    ranks.start(_worker, (world, free_port(), ulysses, ring, shape, queue, compiled, slots), world)
    return torch.from_numpy(queue.get(timeout=60))


@pytest.mark.parametrize(
    "ulysses, ring, shape",
    [
        # shards that do not divide evenly (the divisible case is the simpler path of the same code, and
        # tests/test_parallel_engine.py runs it through the engine)
        (2, 1, (5, 3, 7)),  # Ulysses-2, 15 image and 7 text tokens: padded shards
        (1, 2, (5, 3, 7)),  # Ring-2
        (2, 2, (5, 5, 6)),  # USP 2 × 2
        (4, 1, (3, 3, 5)),  # Ulysses-4 over 4 heads, padded
    ],
)
def test_sequence_parallel_matches_single_process(ulysses, ring, shape):
    with torch.no_grad():
        expected = make_model()(**make_inputs(*shape))
    got = run_parallel(ulysses, ring, shape)
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("ulysses, shape", [(2, (5, 3, 7))])
def test_ulysses_through_exchange_slots_matches_single_process(ulysses, shape):
    """Ulysses through the copy-engine exchange's slots (see _SlotsOnCpu): two head groups on 2 ranks (four slots a
    call), batch 2 (whose outputs are regrouped before sending), padded shards."""
    with torch.no_grad():
        expected = make_model()(**make_inputs(*shape))
    got = run_parallel(ulysses, 1, shape, slots=True)
    assert (got - expected).abs().max().item() < 1e-4


def test_compiled_blocks_with_ulysses_match_single_process():
    """torch.compile'd blocks around Ulysses attention, which sits outside the graph and receives the single-stream
    blocks' MLP product as a function to run alongside its exchange (a closure crossing the graph break)."""
    with torch.no_grad():
        expected = make_model()(**make_inputs(4, 4, 8))
    got = run_parallel(2, 1, (4, 4, 8), compiled=True)
    assert (got - expected).abs().max().item() < 1e-4


def _pieces_worker(rank: int, world: int, port: int, degrees: tuple, shape: tuple, queue) -> None:
    from ditserve.loader.weights import load_checkpoint
    from ditserve.models.flux import map_diffusers_key, to_diffusers_state_dict
    from ditserve.parallel import sequence
    from ditserve.parallel.groups import ParallelConfig, init_parallel_groups
    from ditserve.parallel.state import set_tensor_parallel_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ulysses, ring, tp = degrees
        model = make_model()
        state = to_diffusers_state_dict(model)  # unsharded: built before the groups
        groups = init_parallel_groups(ParallelConfig(world, ulysses, ring, False, tp))
        if tp > 1:  # each rank loads its shard of the same weights, as from a checkpoint
            meta = build_on_meta(lambda: FluxTransformer(FluxConfig.from_dict(CONFIG)), torch.float32)
            model = materialize(meta, torch.device("cpu"))
            load_checkpoint(model, iter(state.items()), map_diffusers_key)
        enable_sequence_parallel(model.eval(), groups.sequence, project_in_pieces=True)
        calls = []
        plain = sequence.ulysses_attention

        def recording(*args, project=None, project_in_pieces=False, **kwargs):
            calls.append(project is not None and project_in_pieces)
            return plain(*args, project=project, project_in_pieces=project_in_pieces, **kwargs)

        sequence.ulysses_attention = recording
        with torch.no_grad():
            out = model(**make_inputs(*shape))
        assert calls == [True] * 4, calls  # every block's attention projected its output in pieces
        if rank == 0:
            queue.put(out.numpy())
    finally:
        set_tensor_parallel_group(None)
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "degrees, shape",
    [
        # Ulysses alone is the same exchange as inside these two (its degrees: test_sequence_parallel_matches_...)
        ((2, 2, 1), (5, 5, 6)),  # USP 2 × 2
        ((2, 1, 2), (4, 4, 8)),  # Ulysses-2 on tensor-parallel heads
    ],
    ids=["U2R2", "U2T2"],
)
def test_output_projection_in_pieces_matches_single_process(degrees, shape):
    """Each rank projects its own tokens of the heads it attended to, then the other ranks' heads as they arrive,
    and never assembles the attention output: the same result as one process."""
    with torch.no_grad():
        expected = make_model()(**make_inputs(*shape))
    world = degrees[0] * degrees[1] * degrees[2]
    queue = ranks.queue()
    ranks.start(_pieces_worker, (world, free_port(), degrees, shape, queue), world)
    got = torch.from_numpy(queue.get(timeout=60))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_output_projection_in_pieces_follows_sequence_length():
    """Pieces for long sequences only, unless the caller fixed it."""
    from ditserve.layers.attention import Attention
    from ditserve.parallel.sequence import (
        PIECEWISE_PROJECTION_MIN_TOKENS,
        SequenceParallelAttention,
        SequenceParallelGroups,
    )

    def attention(ulysses: int, ring: int = 1, pieces: bool | None = None) -> SequenceParallelAttention:
        groups = SequenceParallelGroups(None, ulysses, 0, None, ring, 0, None)
        return SequenceParallelAttention(Attention(segments=("text", "image")), groups, project_in_pieces=pieces)

    over = PIECEWISE_PROJECTION_MIN_TOKENS // 2 + 1  # per rank, at degree 2
    assert attention(2).projects_in_pieces(over)
    assert not attention(2).projects_in_pieces(over - 1)
    # Under Ring, the tokens one Ulysses exchange gathers count (as for head groups and the carve-out), not the
    # whole sequence over the ring.
    assert attention(2, ring=2).projects_in_pieces(over)
    assert not attention(2, ring=2).projects_in_pieces(over - 1)
    assert not attention(2, pieces=False).projects_in_pieces(over)
    assert attention(2, pieces=True).projects_in_pieces(1)


def test_shard_lengths():
    assert shard_lengths(8, 2) == (4, [4, 4])
    assert shard_lengths(7, 2) == (4, [4, 3])
    assert shard_lengths(5, 4) == (2, [2, 2, 1, 0])


def test_ulysses_head_groups_follow_sequence_length():
    """Two pipelined head groups for short sequences, one exchange for long ones (PIPELINED_MAX_TOKENS), unless
    the caller fixed the count; never under Ring, nor when the heads per rank don't divide."""
    from ditserve.layers.attention import Attention
    from ditserve.parallel.sequence import PIPELINED_MAX_TOKENS, SequenceParallelAttention, SequenceParallelGroups

    def attention(ulysses: int, ring: int = 1, chunks: int | None = None) -> SequenceParallelAttention:
        groups = SequenceParallelGroups(None, ulysses, 0, None, ring, 0, None)
        return SequenceParallelAttention(Attention(segments=("text", "image")), groups, chunks)

    short, long = PIPELINED_MAX_TOKENS // 2, PIPELINED_MAX_TOKENS // 2 + 1  # per rank, at degree 2
    assert attention(2).chunks(24, short) == 2  # FLUX.1 at 1024²: 4608 tokens
    assert attention(2).chunks(24, long) == 1
    assert attention(4).chunks(24, 4224) == 1  # FLUX.1 at 2048² on 4 ranks: 16896 tokens
    assert attention(2, chunks=2).chunks(24, long) == 2
    assert attention(2, chunks=1).chunks(24, short) == 1
    assert attention(2, ring=2).chunks(24, short) == 1
    assert attention(2).chunks(6, short) == 1  # 3 heads per rank


def test_alongside_carveout_follows_sequence_length():
    """16 SMs left to the exchange for short sequences (where it measured faster), none for long ones, unless the
    caller fixed it."""
    from ditserve.layers.attention import Attention
    from ditserve.parallel.sequence import (
        ALONGSIDE_SM_CARVEOUT,
        CARVEOUT_MAX_TOKENS,
        SequenceParallelAttention,
        SequenceParallelGroups,
    )

    def attention(ulysses: int, carveout: int | None = None) -> SequenceParallelAttention:
        return SequenceParallelAttention(
            Attention(segments=("text", "image")),
            SequenceParallelGroups(None, ulysses, 0, None, 1, 0, None),
            None,
            carveout,
        )

    assert ALONGSIDE_SM_CARVEOUT > 0
    assert attention(4).carveout(1152) == ALONGSIDE_SM_CARVEOUT  # FLUX.1 at 1024²: 4608 tokens
    assert attention(2).carveout(CARVEOUT_MAX_TOKENS // 2 + 1) == 0
    assert attention(2).carveout(8448) == 0  # 2048²: 16896 tokens
    assert attention(2, carveout=32).carveout(8448) == 32
    assert attention(2, carveout=0).carveout(1152) == 0


def test_disable_restores_the_plain_model():
    from ditserve.layers.attention import Attention
    from ditserve.parallel.sequence import SequenceParallelGroups, disable_sequence_parallel

    model = make_model()
    groups = SequenceParallelGroups(None, 2, 0, None, 1, 0, None)
    enable_sequence_parallel(model, groups)
    assert "forward" in model.__dict__
    disable_sequence_parallel(model)
    assert "forward" not in model.__dict__
    assert all(type(m.attn) is Attention for m in model.repeated_blocks())
    with torch.no_grad():
        assert model(**make_inputs(2, 2, 3)).shape == (2, 4, 16)


def _compiled_tensor_parallel_worker(rank: int, port: int, queue) -> None:
    from ditserve.accel.compile import compile_repeated_blocks
    from ditserve.parallel.state import set_tensor_parallel_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        set_tensor_parallel_group(dist.group.WORLD)  # before the model is built: its linears shard themselves
        model = make_model()
        with torch.no_grad():
            eager = model(**make_inputs(4, 4, 8))
            compiled = compile_repeated_blocks(model)(**make_inputs(4, 4, 8))
        if rank == 0:
            queue.put((eager - compiled).abs().max().item())
    finally:
        set_tensor_parallel_group(None)
        dist.destroy_process_group()


def test_compiled_blocks_with_tensor_parallelism_match_eager():
    """torch.compile'd blocks (whole graphs) around the row-parallel layers' all-reduces give the eager output."""
    queue = ranks.queue()
    ranks.start(_compiled_tensor_parallel_worker, (free_port(), queue), 2)
    assert queue.get(timeout=60) < 1e-4


def test_gemm_sm_carveout_is_set_inside_and_restored():
    from ditserve.parallel.sequence import gemm_sm_carveout

    get = torch._C._get_sm_carveout_experimental
    assert get() is None
    with gemm_sm_carveout(0):
        assert get() is None
    with gemm_sm_carveout(16):
        assert get() == 16
        with gemm_sm_carveout(32):
            assert get() == 32
        assert get() == 16
    assert get() is None
    with pytest.raises(RuntimeError), gemm_sm_carveout(8):
        raise RuntimeError("work failed")
    assert get() is None


def _alongside_worker(rank: int, port: int, queue) -> None:
    from ditserve.parallel.sequence import ulysses_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 8, 4, 16, generator=g) for _ in range(3))  # the whole sequence, same on both
        shard = [t[:, rank * 4 : (rank + 1) * 4] for t in (q, k, v)]
        seen, seen_by_attention = [], []

        def attend(q, k, v):
            seen_by_attention.append(torch._C._get_sm_carveout_experimental())
            return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(
                1, 2
            )

        def alongside():
            seen.append(torch._C._get_sm_carveout_experimental())
            return "side"

        out, side = ulysses_attention(*shard, dist.group.WORLD, 2, 1, attend, alongside, alongside_carveout=12)
        after = torch._C._get_sm_carveout_experimental()
        expected = attend(q, k, v)[:, rank * 4 : (rank + 1) * 4]
        queue.put((rank, seen, seen_by_attention[0], side, after, (out - expected).abs().max().item()))
    finally:
        dist.destroy_process_group()


def test_ulysses_runs_the_work_alongside_its_exchange_with_the_sm_carveout():
    """The model's work run beside the Ulysses exchange is issued with the carve-out (so its GEMMs leave SMs to
    NCCL's kernel), and only that work: the setting is restored before attention, and the result is exact."""
    queue = ranks.queue()
    ranks.start(_alongside_worker, (free_port(), queue), 2)
    for _ in range(2):
        rank, seen, seen_by_attention, side, after, err = queue.get(timeout=60)
        assert seen == [12] and side == "side" and seen_by_attention is None and after is None, rank
        assert err < 1e-5, (rank, err)


def test_ulysses_exchange_choice_and_fallback(monkeypatch, caplog):
    """ "auto" takes the copy engines only on NCCL within one machine under CUDA graphs, for subgroups too; a
    copy-engine exchange that cannot set up symmetric memory goes through the group's own all-to-all when it was
    chosen by "auto", and raises when asked for by name. On the CPU, with a one-rank gloo group and symmetric
    memory made to fail."""
    import torch.distributed._symmetric_memory as symm_mem

    from ditserve.parallel.exchange import NcclExchange, make_exchange

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        assert isinstance(make_exchange(group, "auto"), NcclExchange)  # gloo
        assert isinstance(make_exchange(group, "nccl"), NcclExchange)
        with pytest.raises(ValueError, match="NCCL in one machine"):
            make_exchange(group, "copy-engine")
        with pytest.raises(ValueError, match="not one of"):
            make_exchange(group, "nvlink")
        with monkeypatch.context() as m:  # as if on GPUs
            m.setattr(dist, "get_backend", lambda group=None: "nccl")
            assert isinstance(make_exchange(group, "auto"), CopyEngineExchange)
            assert isinstance(make_exchange(group, "auto", one_machine=False), NcclExchange)
            assert isinstance(make_exchange(group, "auto", graphed=False), NcclExchange)  # eager
            assert isinstance(make_exchange(group, "copy-engine", graphed=False), CopyEngineExchange)
            with pytest.raises(ValueError, match="one machine"):
                make_exchange(group, "copy-engine", one_machine=False)
            m.setattr(dist, "get_world_size", lambda group=None: 1 if group is not None else 2)
            assert isinstance(make_exchange(group, "auto"), CopyEngineExchange)  # a Ulysses subgroup too

        def no_peer_access(*args, **kwargs):
            raise RuntimeError("peer access is not supported between these devices")

        monkeypatch.setattr(symm_mem, "empty", no_peer_access)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        send = torch.arange(12.0).view(1, 3, 4)
        auto = CopyEngineExchange(group, fall_back_when_unavailable=True)
        with caplog.at_level("WARNING", logger="ditserve.parallel.exchange"):
            auto.prepare([send.numel()], send.dtype, send.device)
        assert auto.unavailable and "using NCCL" in caplog.text
        received, work = auto.start(send, 0)
        work.wait()
        assert torch.equal(received, send)
        auto.prepare([send.numel()], send.dtype, send.device)  # no second attempt
        assert not auto.ready
        named = CopyEngineExchange(group)
        with pytest.raises(RuntimeError, match="peer access"):
            named.prepare([send.numel()], send.dtype, send.device)
    finally:
        dist.destroy_process_group()


class VideoStyleToy(torch.nn.Module):
    """A model shaped like a video DiT: self-attention over one segment ("video"), then cross-attention to text
    that is not split (segments None), with the text a forward argument the sharding does not name."""

    sequence_sharding = SequenceSharding(inputs={"video": Sharded(1, "video")}, output=Sharded(1, "video"))

    def __init__(self):
        from ditserve.layers.attention import Attention

        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.qkv = torch.nn.Parameter(torch.randn(16, 48, generator=g) * 0.3)
        self.q_cross = torch.nn.Parameter(torch.randn(16, 16, generator=g) * 0.3)
        self.kv_cross = torch.nn.Parameter(torch.randn(8, 32, generator=g) * 0.3)
        self.self_attn = Attention(segments=("video",))
        self.cross_attn = Attention(segments=None)

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (4, 4)) for t in (video @ self.qkv).chunk(3, dim=-1))
        x = video + self.self_attn(q, k, v).flatten(2)
        k, v = (t.unflatten(-1, (4, 4)) for t in (text @ self.kv_cross).chunk(2, dim=-1))
        return x + self.cross_attn((x @ self.q_cross).unflatten(-1, (4, 4)), k, v).flatten(2)


def _toy_inputs() -> dict:
    g = torch.Generator().manual_seed(4)
    return dict(video=torch.randn(2, 7, 16, generator=g), text=torch.randn(2, 5, 8, generator=g))


def _toy_worker(rank: int, world: int, port: int, ulysses: int, ring: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = enable_sequence_parallel(VideoStyleToy(), build_sequence_parallel_groups(ulysses, ring))
        wrapped = {name for name, m in model.named_children() if type(m).__name__ == "SequenceParallelAttention"}
        assert wrapped == {"self_attn"}, wrapped  # the cross-attention keeps its whole keys: not wrapped
        with torch.no_grad():
            out = model(**_toy_inputs())
        if rank == 0:
            queue.put(out.numpy())
    finally:
        dist.destroy_process_group()


def test_single_segment_self_attention_and_unsplit_cross_attention(ulysses=2, ring=1):
    """The sharding a model declares, beyond FLUX's [text | image]: one segment of 7 tokens (padded shards), and a
    cross-attention whose keys come whole on every rank."""
    with torch.no_grad():
        expected = VideoStyleToy()(**_toy_inputs())
    queue = ranks.queue()
    world = ulysses * ring
    ranks.start(_toy_worker, (world, free_port(), ulysses, ring, queue), world)
    got = torch.from_numpy(queue.get(timeout=60))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
