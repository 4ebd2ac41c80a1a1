"""The server's parts on their own: batched pipeline runs, batch formation, the wire format, the job store, sizes."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from ditserve.config import SamplingParams
from ditserve.engine import messages as msg
from ditserve.engine.scheduler import RequestFailed, Scheduler, SchedulerConfig, _Pending
from ditserve.server.jobs import JobStore, StoreLimits
from ditserve.server.schemas import InvalidRequest, parse_size


@pytest.fixture(scope="module")
def engine(tiny_dev):
    from ditserve.engine.engine import Engine

    return Engine.from_pretrained(str(tiny_dev), device="cpu")


def _resolved(engine, **kw) -> SamplingParams:
    return engine.pipeline.resolve(SamplingParams(height=32, width=32, num_inference_steps=2, **kw))


def test_run_batch_matches_each_request_alone(engine):
    """Each batched result equals the request run alone, within 1 intensity level on average (on the CPU in
    float32 a batched matmul can differ from a single one in the last bits); latents agree to 1e-4."""
    pipe = engine.pipeline
    batch = [
        _resolved(engine, prompt="a red fox", seed=1),
        _resolved(engine, prompt="a blue whale", seed=2, num_images=2),
        _resolved(engine, prompt=["two", "prompts"], seed=3),
    ]
    batched = pipe.run_batch(batch)
    assert [len(out.images) for out in batched] == [1, 2, 2]
    assert all(out.timings["batch_size"] == 3 for out in batched)
    for params, out in zip(batch, batched):
        alone = pipe(params)
        for a, b in zip(alone.images, out.images):
            diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
            assert diff.mean() <= 1.0
        lat_alone = pipe(params.replace(output_type="latent")).images
        lat_batch = pipe.run_batch([p.replace(output_type="latent") for p in batch])[batch.index(params)].images
        for a, b in zip(lat_alone, lat_batch):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Not merely similar images: different requests give different pictures.
    assert not np.array_equal(np.asarray(batched[0].images[0]), np.asarray(batched[1].images[0]))


def test_run_batch_with_true_cfg_matches_alone(engine):
    pipe = engine.pipeline
    batch = [
        _resolved(engine, prompt="fox", negative_prompt="blur", true_cfg_scale=2.0, seed=4, output_type="latent"),
        _resolved(engine, prompt="owl", negative_prompt="dark", true_cfg_scale=2.0, seed=5, output_type="latent"),
    ]
    for params, out in zip(batch, pipe.run_batch(batch)):
        torch.testing.assert_close(pipe(params).images[0], out.images[0], atol=1e-4, rtol=1e-4)


def test_run_batch_refuses_mixed_shapes(engine):
    with pytest.raises(ValueError, match="batch_key"):
        engine.pipeline.run_batch(
            [_resolved(engine, prompt="a", seed=1), _resolved(engine, prompt="b", seed=1).replace(height=64)]
        )


def _pending(rid: str, key: tuple, n: int = 1) -> _Pending:
    loop = asyncio.new_event_loop()
    try:
        return _Pending(msg.WorkItem(rid, {"prompt": rid, "num_images": n}), key, loop.create_future())
    finally:
        loop.close()


def test_batches_take_the_head_and_later_compatible_requests_in_order():
    s = Scheduler({}, SchedulerConfig(max_batch_size=3))
    s.info = msg.ModelInfo("m", "flux", ["text-to-image"], 16, 512, {}, True, "cpu", "float32", 0)
    for rid, key in (("a", (32,)), ("b", (64,)), ("c", (32,)), ("d", (32,)), ("e", (32,))):
        s.queue.append(_pending(rid, key))
    assert [p.item.request_id for p in s._next_batch()] == ["a", "c", "d"]
    assert [p.item.request_id for p in s.queue] == ["b", "e"]
    s.info.supports_batching = False
    assert [p.item.request_id for p in s._next_batch()] == ["b"]
    # The limit counts images: a request of n images counts n, and the head goes even when it alone is larger.
    s.info.supports_batching = True
    s.queue.clear()
    for rid, n in (("f", 2), ("g", 2), ("h", 1), ("i", 1)):
        s.queue.append(_pending(rid, (32,), n))
    assert [p.item.request_id for p in s._next_batch()] == ["f", "h"]
    s.queue.clear()
    s.queue.extend([_pending("big", (32,), 5), _pending("small", (32,))])
    assert [p.item.request_id for p in s._next_batch()] == ["big"]


def test_cancel_removes_a_queued_request():
    async def scenario():
        s = Scheduler({}, SchedulerConfig())
        s.queue.append(_Pending(msg.WorkItem("x", {}), (), asyncio.get_running_loop().create_future()))
        future = s.queue[0].future
        assert s.cancel("x") and not s.queue
        with pytest.raises(RequestFailed, match="cancelled"):
            await future
        assert not s.cancel("x")

    asyncio.run(scenario())


def test_messages_round_trip_and_reject_garbage():
    # every setting a request can make reaches the worker (a field left out here is silently dropped there)
    params = SamplingParams(prompt="p", height=32, width=48, seed=5, num_images=2, attention="sla:0.2", cache="fora")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert fields - set(msg.params_to_dict(params)) == {"output_type", "images"}  # encoded by the worker; blobs
    frames = msg.run_message("b1", [msg.WorkItem("r1", msg.params_to_dict(params), "webp")])
    message, blobs = msg.decode(frames)
    item = msg.items_from(message)[0]
    assert message["type"] == "run" and blobs == [] and item.output_format == "webp"
    assert msg.params_from_dict(item.params) == params
    message, blobs = msg.decode(msg.result_message("r1", [b"\x89PNG..", b"\x00\x01"], {"seed": 5}))
    assert blobs == [b"\x89PNG..", b"\x00\x01"] and message["num_images"] == 2
    for bad in ([], [b"\x80\x81"], [b"[1, 2]"], [b'{"no": "type"}']):
        with pytest.raises(msg.ProtocolError):
            msg.decode(bad)
    # Input images travel as binary frames, each item naming its own; guidance_scale_2 in the JSON.
    video = SamplingParams(prompt="v", num_frames=5, fps=8, guidance_scale_2=3.0)
    items = [
        msg.WorkItem("a", msg.params_to_dict(video), "mp4", "image-to-video", input_images=[b"png one"]),
        msg.WorkItem("b", msg.params_to_dict(video), "mp4", "text-to-video"),
        msg.WorkItem("c", msg.params_to_dict(video), "mp4", "image-to-video", input_images=[b"png two"]),
    ]
    message, blobs = msg.decode(msg.run_message("b2", items))
    assert blobs == [b"png one", b"png two"] and b"png" not in msg.run_message("b2", items)[0]
    assert msg.items_from(message, blobs) == items
    assert msg.params_from_dict(msg.items_from(message, blobs)[0].params).guidance_scale_2 == 3.0
    with pytest.raises(msg.ProtocolError):
        msg.items_from(message, blobs[:1])  # an item naming a frame that is not there


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1024x768", (1024, 768)),
        ("32X32", (32, 32)),
        (" 16 x 48 ", (16, 48)),
        ("auto", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ("1024", "WIDTHxHEIGHT"),
        ("x32", "WIDTHxHEIGHT"),
        ("32x", "WIDTHxHEIGHT"),
        ("-32x32", "WIDTHxHEIGHT"),
        ("32x32x3", "WIDTHxHEIGHT"),
        ("3.5x32", "WIDTHxHEIGHT"),
        ("", "WIDTHxHEIGHT"),
        ("\u0663\u0662x\u0663\u0662", "ASCII digits"),  # Arabic-Indic digits: int() would read them as 32
        ("32\u00d732", "WIDTHxHEIGHT"),
        ("32\u200832", "WIDTHxHEIGHT"),
        ("999999x32", "a width of 999999; each side must be 1 to 4096"),
        ("100000x100000", "a width of 100000"),
        ("32x0", "a height of 0"),
    ],
)
def test_parse_size_rejects(size, words):
    with pytest.raises(InvalidRequest) as e:
        parse_size(size)
    assert e.value.param == "size" and words in e.value.message


def test_form_values_take_only_ascii_numbers():
    from ditserve.server.schemas import ImageOptions, form_values

    fields = {"n": "2", "seed": "\u0663", "width": "3_0", "num_inference_steps": "true", "guidance_scale": "3.5"}
    assert form_values(ImageOptions, {**fields, "prompt": "7", "size": "32x32"}) == {
        "n": 2,
        "seed": "\u0663",
        "width": "3_0",
        "num_inference_steps": "true",
        "guidance_scale": 3.5,
        "prompt": "7",
        "size": "32x32",
    }


@pytest.mark.parametrize(
    ("loc", "name"),
    [(("body", "strength", "float"), "strength"), (("body", "lora_path", 1), "lora_path"), (("body",), None)],
)
def test_an_error_names_the_field_not_the_union_member(loc, name):
    from ditserve.server.schemas import field_name

    assert field_name(loc) == name


def test_job_store_lifecycle(tmp_path):
    outcomes = []
    store = JobStore(tmp_path / "videos", StoreLimits(max_jobs=3), on_finish=outcomes.append)

    def describe(e: Exception) -> dict:
        return {"code": e.kind, "message": str(e), "param": None}

    async def scenario():
        done = store.create("m", "ok")

        async def succeed():
            done.advance(0.0)
            assert done.status == "in_progress" and done.progress == 0
            done.advance(0.5)
            assert done.progress == 50
            return b"mp4 bytes"

        await store.run(done, succeed, describe)
        assert done.status == "completed" and done.progress == 100
        assert store.content_path(done).read_bytes() == b"mp4 bytes" and store.bytes_used == 9

        failed = store.create("m", "bad")

        async def fail():
            raise RequestFailed("out_of_memory", "too big")

        await store.run(failed, fail, describe)
        assert failed.status == "failed" and failed.error == {
            "code": "out_of_memory",
            "message": "too big",
            "param": None,
        }

        running = store.create("m", "slow")
        gate = asyncio.Event()

        async def wait():
            await gate.wait()
            return b""

        running.task = asyncio.create_task(store.run(running, wait, describe))
        await asyncio.sleep(0)
        assert [j.id for j in store.list()] == [running.id, failed.id, done.id]  # newest first
        assert [j.id for j in store.list(order="asc", after=done.id)] == [failed.id, running.id]
        store.delete(running)  # cancels it: the task ends, the job is gone
        await asyncio.gather(running.task, return_exceptions=True)
        assert running.task.cancelled() and store.get(running.id) is None

        store.create("m", "third")
        store.create("m", "fourth")  # over max_jobs: the oldest finished job goes, with its content
        assert store.get(done.id) is None and not store.content_path(done).exists()
        assert outcomes == ["completed", "failed", "cancelled"]

    asyncio.run(scenario())
    for bad in ("../../etc/passwd", "video_" + "g" * 32, "video_abc", ""):
        assert store.get(bad) is None


# ---- what a request costs, and admission by it ---------------------------------------------------------------------
def test_the_cost_model_counts_flops_exactly_at_any_size(engine):
    from ditserve.engine.cost import _decode_flops, _dit_flops, _poly, measure

    cost = measure(engine)
    m = engine.pipeline.spatial_multiple
    for side in (40 * m, 64 * m):  # beyond the sizes it was measured at
        assert _poly(cost.dit, side * side) == pytest.approx(_dit_flops(engine, side), rel=1e-9)
        assert _poly(cost.decode, side * side) == pytest.approx(_decode_flops(engine.pipeline, side), rel=1e-9)
    assert cost.dit[2] > 0 and cost.flops_per_s > 0 and cost.method.startswith("timed forward")


def _fake_cost():
    from ditserve.engine.cost import CostModel

    # 1e6 FLOPs per pixel per forward, 1e3 per pixel to decode, at 1e9 FLOP/s: 1 ms per pixel-step
    return CostModel(dit=(0.0, 1e6, 0.0), decode=(0.0, 1e3, 0.0), flops_per_s=1e9, decode_flops_per_s=1e9)


def test_the_estimate_scales_with_size_steps_images_and_guidance():
    from ditserve.engine.cost import request_shape

    cost = _fake_cost()
    defaults = {"height": 32, "width": 32, "num_inference_steps": 4, "true_cfg_scale": 1.0}
    base = cost.seconds(request_shape({"prompt": "x"}, defaults))
    assert base == pytest.approx(32 * 32 * 4 * 1e-3 + 32 * 32 * 1e-6)
    double = request_shape({"prompt": "x", "num_images": 2, "num_inference_steps": 8}, defaults)
    assert cost.seconds(double) == pytest.approx(2 * 2 * 32 * 32 * 4e-3 + 2 * 32 * 32 * 1e-6)
    cfg = request_shape({"prompt": "x", "negative_prompt": "", "true_cfg_scale": 4.0}, defaults)
    assert cfg.passes == 2 and request_shape({"prompt": ["a", "b"]}, defaults).images == 2


def test_frames_are_priced_by_the_latent_tokens_they_make():
    import dataclasses

    from ditserve.engine.cost import Shape

    video = dataclasses.replace(_fake_cost(), frames=81, temporal=4)  # measured at 81 frames: 21 latent frames
    clip = Shape(pixels=1000, steps=1, images=1, passes=1, frames=81)
    assert video.effective_pixels(clip) == 1000
    assert video.effective_pixels(dataclasses.replace(clip, frames=41)) == pytest.approx(1000 * 11 / 21)
    assert video.effective_pixels(dataclasses.replace(clip, frames=None)) == 1000  # the default frames
    image = _fake_cost()  # an image model asked for frames (refused later, by the task): frames count as pixels
    assert image.effective_pixels(dataclasses.replace(clip, frames=33)) == 33_000


def test_batches_run_correct_the_speed_but_overhead_does_not():
    from ditserve.engine.cost import Shape

    cost = _fake_cost()
    shape = Shape(pixels=10_000, steps=10, images=1, passes=1, frames=None)  # predicted: 100 s of denoising
    cost.observe(shape, {"denoise": 400.0, "encode": 0.5, "prepare": 0.1})
    assert cost.flops_per_s == pytest.approx(0.5e9)  # 4x slower than thought: half way there (geometric)
    assert cost.fixed_s == pytest.approx(0.6)
    tiny = Shape(pixels=4, steps=2, images=1, passes=1, frames=None)  # predicted 8 ms: overhead, not speed
    cost.observe(tiny, {"denoise": 1.0})
    assert cost.flops_per_s == pytest.approx(0.5e9)


def test_admission_refuses_over_each_limit_naming_the_field():
    from ditserve.server.admission import OverLimit, RequestLimits, admit, resolve_limits

    defaults = {"height": 32, "width": 32, "num_inference_steps": 4}
    limits = RequestLimits(max_pixels=64 * 64, max_frames=9, max_steps=100, max_request_seconds=60)
    cost = _fake_cost()
    assert admit(SamplingParams(prompt="x"), defaults, limits, cost) == pytest.approx(4.097, rel=1e-3)
    cases = [
        (SamplingParams(prompt="x", height=96, width=64), "max_pixels", "size"),
        (SamplingParams(prompt="x", num_inference_steps=101), "max_steps", "num_inference_steps"),
        (SamplingParams(prompt="x", num_frames=17), "max_frames", "num_frames"),
        (SamplingParams(prompt="x", height=64, width=64, num_inference_steps=15), "max_request_seconds", "size"),
        (SamplingParams(prompt="x", num_inference_steps=60), "max_request_seconds", "num_inference_steps"),
        (SamplingParams(prompt="x", num_images=16), "max_request_seconds", "n"),
    ]
    for params, reason, param in cases:
        with pytest.raises(OverLimit) as e:
            admit(params, defaults, limits, cost)
        assert (e.value.reason, e.value.param, e.value.code) == (reason, param, f"{reason}_exceeded"), params
    off = RequestLimits(max_pixels=64 * 64, max_frames=9, max_steps=50, max_request_seconds=0)
    assert admit(SamplingParams(prompt="x", num_images=16), defaults, off, cost) > 60  # 0: no estimate limit
    cpu, cuda = resolve_limits(RequestLimits(), "cpu", 600), resolve_limits(RequestLimits(), "cuda:0", 600)
    assert cpu.max_pixels == 1024 * 1024 < cuda.max_pixels == 4096 * 4096 and cpu.max_request_seconds == 600
    assert resolve_limits(RequestLimits(max_pixels=5), "cuda", 9).max_pixels == 5
