"""Shared layers against plain torch references."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb, get_timestep_embedding

from ditserve.layers import linear as linear_mod
from ditserve.layers.attention import attention, attention_reference
from ditserve.layers.embeddings import sinusoidal_embedding
from ditserve.layers.rotary import apply_rope, multi_axis_rope
from ditserve.parallel.state import TensorParallelGroup


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "math", "reference"])
def test_attention_backends_match_reference(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=g) for _ in range(3))
    out = attention(q, k, v, backend)
    ref = attention_reference(q.double(), k.double(), v.double())
    assert out.shape == q.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "sdpa"])
def test_attention_backends_cuda_bf16(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 300, 4, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, backend)
    ref = attention_reference(q.double(), k.double(), v.double())
    assert out.shape == q.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_rope_matches_diffusers():
    ids = torch.cat(
        [
            torch.zeros(5, 3),
            torch.stack(
                torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1
            ).reshape(-1, 3),
        ]
    )
    ours = multi_axis_rope(ids, [4, 6, 6])
    theirs = FluxPosEmbed(10000, [4, 6, 6])(ids)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    x = torch.randn(2, ids.shape[0], 3, 16)
    assert torch.equal(apply_rope(x, *ours), apply_rotary_emb(x, theirs, sequence_dim=1))


def test_sinusoidal_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.5, 999.0, 500.25])
    expected = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(sinusoidal_embedding(t, 256), expected)


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_shards_reassemble(monkeypatch, rank):
    """Each rank's shards, computed as the layers load them, reassemble into the full layer's output."""
    size = 2
    monkeypatch.setattr(linear_mod, "tp_group", lambda: TensorParallelGroup(None, rank, size))
    g = torch.Generator().manual_seed(1)
    wq, wk, wmlp = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.randn(12, 6, generator=g)
    bq = torch.randn(8, generator=g)
    merged = linear_mod.MergedColumnParallelLinear(6, [8, 8, 12])
    for i, (w, b) in enumerate(((wq, bq), (wk, bq), (wmlp, torch.zeros(12)))):
        merged.weight_loader(merged.weight, w, i)
        merged.weight_loader(merged.bias, b, i)
    x = torch.randn(3, 6, generator=g)
    q, k, m = merged.split(merged(x))
    assert torch.allclose(q, (x @ wq.T + bq)[:, rank * 4 : (rank + 1) * 4], atol=1e-6)
    assert torch.allclose(m, (x @ wmlp.T)[:, rank * 6 : (rank + 1) * 6], atol=1e-6)

    w_out = torch.randn(5, 20, generator=g)  # reads [attention (8) | mlp (12)]
    row = linear_mod.RowParallelLinear(20, 5, input_sizes=[8, 12])
    row.weight_loader(row.weight, w_out)
    expected_cols = torch.cat([w_out[:, rank * 4 : (rank + 1) * 4], w_out[:, 8 + rank * 6 : 8 + (rank + 1) * 6]], 1)
    assert torch.equal(row.weight.data, expected_cols)


def test_shape_mismatch_is_reported():
    layer = linear_mod.MergedColumnParallelLinear(4, [4, 4])
    with pytest.raises(linear_mod.ShapeMismatchError, match=r"part 1.*\(3, 4\)"):
        layer.weight_loader(layer.weight, torch.zeros(3, 4), 1)


def _column_pieces_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from ditserve.layers.linear import LinearLoRA, RowParallelLinear
    from ditserve.parallel.state import set_tensor_parallel_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        set_tensor_parallel_group(dist.group.WORLD)
        g = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(6, 12, generator=g), torch.randn(6, generator=g)
        down, up, scale = torch.randn(3, 12, generator=g), torch.randn(6, 3, generator=g), 0.7
        x = torch.randn(1, 7, 12, generator=g)  # [part 0 (4) | part 1 (8)]
        layer = RowParallelLinear(12, 6, input_sizes=[4, 8])
        layer.weight_loader(layer.weight, weight)
        layer.weight_loader(layer.bias, bias)
        down_shard, up_shard, _ = layer.lora_shard(down, up)
        layer.lora.append(LinearLoRA(down_shard, up_shard, scale))
        p0, p1 = x[..., rank * 2 : (rank + 1) * 2], x[..., 4 + rank * 4 : 4 + (rank + 1) * 4]
        mlp_start = layer.part_start(1)
        with torch.no_grad():
            in_order = layer.finish(layer.add_columns(p1, mlp_start, layer.add_columns(p0, 0)))
            # part 1 first, then part 0 in two pieces of one column each, the later one first
            partial = layer.add_columns(p1, mlp_start)
            partial = layer.add_columns(p0[..., 1:], 1, partial)
            pieces = layer.finish(layer.add_columns(p0[..., :1], 0, partial))
            concatenated = layer(torch.cat([p0, p1], -1))
            reference = F.linear(x, weight, bias) + scale * (x @ down.T @ up.T)
        with pytest.raises(ValueError, match="outside"):
            layer.add_columns(p1, 3)  # 4 columns from 3 of 6
        if rank == 0:
            queue.put(tuple(t.numpy() for t in (in_order, pieces, concatenated, reference)))
    finally:
        set_tensor_parallel_group(None)
        dist.destroy_process_group()


def test_row_parallel_column_pieces_match_unsharded():
    """A row-parallel product summed over column pieces on two ranks (its input parts, or smaller pieces, in any
    order), with a LoRA adapter, equals the unsharded layer, as does forward on the concatenated parts."""
    import numpy as np
    import ranks

    from ditserve.engine.distributed import free_port

    queue = ranks.queue()
    ranks.start(_column_pieces_worker, (free_port(), queue), 2)
    in_order, pieces, concatenated, reference = queue.get(timeout=60)
    assert reference.shape == (1, 7, 6)
    for out in (in_order, pieces, concatenated):
        assert out.shape == reference.shape
        np.testing.assert_allclose(out, reference, atol=1e-5)


DTYPES = (torch.bfloat16, torch.float32, torch.float16)  # float16: the kernel's dtypes exclude it (NCCL)


def _symmetric_all_reduce_worker(rank: int, port: int, queue) -> None:
    """Row-parallel layers on 2 GPUs, summed by NCCL and by the two-shot kernel; rank 0 returns, for each case, the
    largest differences between the methods and to the exact sum (small messages: a queue's pipe holds little
    until the parent reads it)."""
    import torch.distributed as dist

    from ditserve.layers.linear import LinearLoRA, RowParallelLinear
    from ditserve.parallel.state import set_tensor_parallel_group, tp_group

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    graphs = []
    released = []  # per method and dtype: whether a dropped sum gave the buffer back
    try:
        g = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(64, 96, generator=g), torch.randn(64, generator=g)
        down, up = torch.randn(4, 96, generator=g), torch.randn(64, 4, generator=g)
        inputs = {dtype: torch.randn(2, 50, 96, generator=g) for dtype in DTYPES}
        for method in ("nccl", "two-shot"):
            set_tensor_parallel_group(dist.group.WORLD, method)
            out = {}
            for dtype in DTYPES:
                layer = RowParallelLinear(96, 64, input_sizes=[32, 64]).to("cuda", dtype)
                layer.weight_loader(layer.weight, weight.to(dtype))
                layer.weight_loader(layer.bias, bias.to(dtype))
                x = inputs[dtype].to("cuda", dtype)
                p0, p1 = x[..., rank * 16 : (rank + 1) * 16], x[..., 32 + rank * 32 : 32 + (rank + 1) * 32]
                mine = torch.cat([p0, p1], -1)
                with torch.no_grad():
                    out[(dtype, "plain")] = layer(mine)
                    partial = layer.add_columns(p0, 0, layer.add_columns(p1, layer.part_start(1)))
                    out[(dtype, "parts")] = layer.finish(partial)
                    out[(dtype, "larger")] = layer(torch.cat([mine, mine], 1))  # the buffer grows
                    d, u, _ = layer.lora_shard(down.to("cuda", dtype), up.to("cuda", dtype))
                    layer.lora.append(LinearLoRA(d, u, 0.5))
                    out[(dtype, "lora")] = layer(mine)  # the product is copied into the buffer
                    layer.lora.clear()
                    first = layer.add_columns(mine, 0)  # written into the buffer (two-shot)
                    second = layer.add_columns(mine * 2, 0)  # started while the first waits: written apart
                    out[(dtype, "crossed second")] = layer.finish(second)  # summed first: the first stays intact
                    out[(dtype, "crossed first")] = layer.finish(first)
                    layer.add_columns(mine, 0)  # a sum dropped unfinished (as by an exception mid-forward)
                    released.append(getattr(tp_group().all_reduce, "claimed", None) is None)
                    out[(dtype, "after drop")] = layer(mine)
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        layer(mine)  # warm-up outside the capture
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        captured = layer(mine)
                    graph.replay()
                    out[(dtype, "graphed")] = captured.clone()
                    graphs.append(graph)
            # Copies now: a sum handed back in place could be overwritten by a later call (which this would catch).
            results[method] = {k: v.double().cpu() for k, v in out.items()}
            results[method]["kind"] = type(tp_group().all_reduce).__name__
        if rank == 0:
            report = {}
            for key, nccl in results["nccl"].items():
                if key == "kind":
                    continue
                dtype, case = key
                # The exact sum, in float64, from the inputs as rounded to this dtype.
                x = inputs[dtype].to(dtype).double()
                x = torch.cat([x, x], 1) if case == "larger" else 2 * x if case == "crossed second" else x
                w, b = weight.to(dtype).double(), bias.to(dtype).double()
                exact = x @ w.T + b
                if case == "lora":
                    exact = exact + 0.5 * (x @ down.to(dtype).double().T) @ up.to(dtype).double().T
                two_shot = results["two-shot"][key]
                report[f"{str(dtype)[6:]} {case}"] = (
                    (two_shot - nccl).abs().max().item(),
                    (two_shot - exact).abs().max().item(),
                    (nccl - exact).abs().max().item(),
                    exact.abs().max().item(),
                )
            queue.put((results["two-shot"]["kind"], report, released))
    finally:
        # NCCL's teardown waits while a graph that captured its collectives lives (float16's and the "nccl"
        # method's sums are NCCL's): free them first (pytorch/pytorch#115388).
        for graph in graphs:
            graph.reset()
        set_tensor_parallel_group(None)
        dist.destroy_process_group()


@pytest.mark.gpu
def test_two_shot_all_reduce_matches_nccl():
    """The two-shot all-reduce through symmetric memory sums as NCCL does, to within the dtype's rounding of the
    exact float64 sum: written into the buffer by the GEMM or copied in (LoRA), for a part started earlier, a
    larger message, two sums finished in the other order than started, a sum after one dropped unfinished, a CUDA
    graph, and float16 (which falls back to NCCL)."""
    import ranks

    from ditserve.engine.distributed import free_port

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    queue = ranks.queue()
    ranks.start(_symmetric_all_reduce_worker, (free_port(), queue), 2)
    kind, report, released = queue.get(timeout=120)
    assert kind == "SymmetricAllReduce"
    assert len(report) == 24
    assert released == [True] * 6
    table = "\n".join(
        f"{case:16} vs NCCL {a:.3g}, vs exact {b:.3g} (NCCL's {c:.3g}), largest {m:.3g}"
        for case, (a, b, c, m) in report.items()
    )
    for case, (_, error, nccl_error, magnitude) in report.items():
        # Each method rounds the rank's GEMM output and then the sum to the dtype: two roundings of values up to
        # `magnitude` (one more in the LoRA case), so a few units in the last place of the largest value. A sum
        # that was wrong (a rank's part missing, a buffer overwritten) would be off by the magnitude itself.
        ulp = {"bfloat16": 2**-7, "float16": 2**-10, "float32": 2**-23}[case.split()[0]] * magnitude
        assert error <= 4 * ulp and nccl_error <= 4 * ulp, f"{case}\n{table}"
