"""The video jobs API end to end: a live `ditserve serve` on a tiny Wan2.2 TI2V-5B-style folder, which makes videos
from text and from an image (multipart uploads, data URLs in JSON). That an image-to-video folder refuses a request
without an image is the route's reading of the folder's tasks (WanPipeline.tasks, tested in test_wan.py).
Clips are 32x32 (or 64x32), 5 to 9 frames, 2 to 6 steps. The workers run with DITSERVE_TESTING=1: "[[fail]]" in a
prompt fails the request inside the denoising loop, "[[sleep=S]]" sleeps S seconds per step (jobs in flight).
"""

from __future__ import annotations

import base64
import io
import re
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ditserve.server.jobs import JobStore, StoreLimits
from ditserve.server.launch import start_server
from ditserve.utils.video import decode_video

TESTING = {"DITSERVE_TESTING": "1"}
CLIP = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}


def png(color: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("video-out")


@pytest.fixture(scope="module")
def ti2v(tiny_wan_ti2v, output_dir, tmp_path_factory):
    server = start_server(
        str(tiny_wan_ti2v),
        "--served-model-name",
        "tiny-ti2v",
        "--output-dir",
        str(output_dir),
        "--video-store-mb",
        "64",
        "--video-ttl",
        "600",
        env=TESTING,
        log_path=str(tmp_path_factory.mktemp("video-logs") / "ti2v.log"),
    )
    yield server
    server.stop()


def create(server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/videos", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def poll(server, job_id: str, timeout: float = 60) -> tuple[dict, list[tuple[str, int]]]:
    """The finished job, and every (status, progress) seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/videos/{job_id}", timeout=10).json()
        seen.append((job["status"], job["progress"]))
        if job["status"] in ("completed", "failed"):
            return job, seen
        time.sleep(0.03)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {seen[-3:]}")


def content(server, job_id: str) -> bytes:
    r = httpx.get(f"{server.url}/v1/videos/{job_id}/content", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    return r.content


def running(server) -> int:
    return server.info()["running"]


def test_openai_client_image_to_video_multipart(ti2v):
    """The OpenAI client's videos API: create (multipart, the image a file), retrieve, download."""
    from openai import OpenAI

    server = ti2v
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"num_frames": 5, "num_inference_steps": 2, "seed": 3, "fps": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client marks its videos API deprecated
        video = client.videos.create(
            prompt="a red ball rolls",
            size="32x32",
            input_reference=("first.png", png("red"), "image/png"),
            extra_body=extra,
        )
        assert video.id.startswith("video_") and video.status in ("queued", "in_progress")
        deadline = time.monotonic() + 60
        while video.status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            video = client.videos.retrieve(video.id)
        assert video.status == "completed" and video.progress == 100, video
        assert video.size == "32x32" and video.seconds == "0.5" and video.completed_at >= video.created_at
        data = client.videos.download_content(video.id).read()
    frames, fps = decode_video(data)
    assert frames.shape == (5, 32, 32, 3) and fps == 8
    # The same as a multipart form of plain text fields, answered by /v1/videos/sync.
    other = httpx.post(
        f"{server.url}/v1/videos/sync",
        files={"input_reference": ("first.png", png("blue"), "image/png")},
        data={"prompt": "a red ball rolls", "size": "32x32", **{k: str(v) for k, v in extra.items()}},
        timeout=60,
    )
    assert other.status_code == 200 and other.headers["content-type"] == "video/mp4"
    assert decode_video(other.content)[0].shape == (5, 32, 32, 3)


def test_a_job_goes_queued_in_progress_completed_with_progress_every_step(ti2v):
    job = create(ti2v, {"prompt": "slow fox [[sleep=0.2]]", "size": "64x32", "num_frames": 9, "fps": 12,
                        "num_inference_steps": 6, "seed": 5})  # fmt: skip
    assert job["status"] == "queued" and job["progress"] == 0 and job["object"] == "video"
    assert job["size"] == "64x32" and job["seconds"] == "0.667" and job["model"] == "tiny-ti2v"
    done, seen = poll(ti2v, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert done["completed_at"] >= done["created_at"] and done["expires_at"] == done["completed_at"] + 600
    progress = [p for status, p in seen if status == "in_progress"]
    assert len(set(progress) - {0}) >= 3, seen  # one value per step (6 steps of 0.2 s each)
    assert progress == sorted(progress) and max(progress) < 100
    statuses = [status for status, _ in seen]
    assert statuses.index("in_progress") < statuses.index("completed")
    frames, fps = decode_video(content(ti2v, job["id"]))
    assert frames.shape == (9, 32, 64, 3) and fps == 12


def test_sync_answers_the_mp4_and_json_images_are_taken_in_each_form(ti2v):
    """The clips are compared by shape only: MP4 (libx264 at CRF 23) of a random tiny model's noise-like frames is
    lossy and not bit-for-bit reproducible in a process that has run the model (PyAV 18), so two encodings of one
    clip differ by about as much as two input images make them differ. That the image drives the pipeline is
    tested without the codec, in test_the_workers_image_is_the_image_the_engine_takes."""
    body = {"prompt": "a boat", "seed": 9, **CLIP}
    synced = httpx.post(f"{ti2v.url}/v1/videos/sync", json=body, timeout=60)
    assert synced.status_code == 200 and synced.headers["content-type"] == "video/mp4"
    assert synced.headers["x-seed"] == "9" and decode_video(synced.content)[0].shape == (5, 32, 32, 3)
    red = data_url(png("red"))
    for reference in (red, {"image_url": red}, base64.b64encode(png("red", (48, 40))).decode()):
        job, _ = poll(ti2v, create(ti2v, {**body, "input_reference": reference})["id"])
        assert job["status"] == "completed", job
        assert decode_video(content(ti2v, job["id"]))[0].shape == (5, 32, 32, 3)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"num_frames": 6}, "num_frames", "4·k + 1"),
        ({"size": "48x32"}, "size", "multiple of 32"),
        ({"size": "wide"}, "size", "WIDTHxHEIGHT"),
        ({"num_frames": 37}, "num_frames", "limit of 33"),  # the CPU server's --max-frames
        ({"seconds": 3, "num_frames": None}, "seconds", "limit of 33"),  # 3 s at 16 fps: 49 frames
        ({"seconds": "4", "num_frames": 5}, "num_frames", "not both"),
        ({"fps": 0}, "fps", "greater than or equal"),
        ({"input_reference": "data:image/png;base64,AAAA"}, "input_reference", "image this server can read"),
        ({"input_reference": "not base64 !"}, "input_reference", "base64"),
        ({"input_reference": "https://example.com/a.png"}, "input_reference", "fetches no URLs"),
        ({"input_reference": {"file_id": "file_1"}}, "input_reference", "file ids"),
        ({"guidance_scale_2": 2.0}, "guidance_scale_2", "one transformer"),  # refused by the model: sync only
        ({"attention": "sla"}, "attention", "cannot run sla"),  # reaches the model, which has no SLA weights
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_bad_input_is_4xx_naming_the_field(ti2v, body, param, words):
    full = {k: v for k, v in {"prompt": "x", **CLIP, **body}.items() if v is not None}
    route = "/v1/videos/sync" if param in ("guidance_scale_2", "attention") else "/v1/videos"
    r = httpx.post(f"{ti2v.url}{route}", json=full, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_multipart_upload_that_is_not_an_image_is_refused(ti2v):
    r = httpx.post(
        f"{ti2v.url}/v1/videos",
        files={"input_reference": ("ref.png", b"\x89PNG not really", "image/png")},
        data={"prompt": "x", "size": "32x32", "num_frames": "5"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference", r.text


def test_list_pages_and_delete_removes_a_finished_jobs_file(ti2v, output_dir):
    ids = [create(ti2v, {"prompt": f"listed {i}", **CLIP})["id"] for i in range(3)]
    for job_id in ids:
        assert poll(ti2v, job_id)[0]["status"] == "completed"
    listing = httpx.get(f"{ti2v.url}/v1/videos", params={"limit": 2}).json()
    assert [j["id"] for j in listing["data"]] == ids[::-1][:2] and listing["has_more"]  # newest first
    rest = httpx.get(f"{ti2v.url}/v1/videos", params={"limit": 100, "after": listing["last_id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    oldest_first = httpx.get(f"{ti2v.url}/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]
    assert [j["id"] for j in oldest_first if j["id"] in ids] == ids

    store = Path(output_dir) / "videos"
    assert (store / f"{ids[1]}.mp4").is_file()
    gone = httpx.delete(f"{ti2v.url}/v1/videos/{ids[1]}").json()
    assert gone == {"id": ids[1], "object": "video.deleted", "deleted": True}
    assert not (store / f"{ids[1]}.mp4").exists()
    for path in (ids[1], f"{ids[1]}/content"):
        assert httpx.get(f"{ti2v.url}/v1/videos/{path}").status_code == 404
    assert httpx.delete(f"{ti2v.url}/v1/videos/{ids[1]}").status_code == 404
    for bad in ("video_" + "0" * 32, "..%2F..%2Fetc%2Fpasswd", "video_../../x"):
        assert httpx.get(f"{ti2v.url}/v1/videos/{bad}/content").status_code == 404


def test_delete_cancels_a_running_job_at_the_next_step_and_a_queued_one(ti2v):
    pid, restarts, completed = ti2v.info()["worker_pid"], ti2v.info()["worker_restarts"], ti2v.info()["completed"]
    slow = create(ti2v, {"prompt": "very slow [[sleep=0.4]]", **CLIP, "num_inference_steps": 40})
    queued = create(ti2v, {"prompt": "behind it", **CLIP})
    deadline = time.monotonic() + 30
    while httpx.get(f"{ti2v.url}/v1/videos/{slow['id']}").json()["progress"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(f"{ti2v.url}/v1/videos/{queued['id']}").json()["status"] == "queued"
    assert httpx.delete(f"{ti2v.url}/v1/videos/{queued['id']}").json()["deleted"]
    assert httpx.delete(f"{ti2v.url}/v1/videos/{slow['id']}").json()["deleted"]
    stopped_by = time.monotonic() + 3  # one step is 0.4 s; the 40 steps would take 16 s
    while running(ti2v):
        assert time.monotonic() < stopped_by, "the cancelled job kept running"
        time.sleep(0.05)
    info = ti2v.info()
    assert info["worker_pid"] == pid and info["worker_restarts"] == restarts  # stopped, not killed
    assert info["completed"] == completed and info["queue_length"] == 0  # neither ran to the end
    after = create(ti2v, {"prompt": "next", **CLIP})
    assert poll(ti2v, after["id"])[0]["status"] == "completed"  # the worker serves on


def test_a_failing_job_fails_alone_and_metrics_count_jobs_by_status(ti2v):
    failed, _ = poll(ti2v, create(ti2v, {"prompt": "boom [[fail]]", **CLIP})["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "error"
    assert "injected fault" in failed["error"]["message"] and failed["completed_at"] is not None
    assert httpx.get(f"{ti2v.url}/v1/videos/{failed['id']}/content").json()["error"]["code"] == "not_ready"
    assert poll(ti2v, create(ti2v, {"prompt": "fine", **CLIP})["id"])[0]["status"] == "completed"
    assert httpx.get(f"{ti2v.url}/health").status_code == 200
    text = httpx.get(f"{ti2v.url}/metrics").text
    for line in (
        'ditserve_video_jobs_total{status="completed"}',
        'ditserve_video_jobs_total{status="failed"}',
        'ditserve_video_jobs_stored{status="completed"}',
        'ditserve_video_jobs_stored{status="failed"} 1.0',
        'ditserve_requests_total{endpoint="videos",outcome="success"}',
        'ditserve_requests_total{endpoint="videos",outcome="error"} 1.0',
        'ditserve_requests_total{endpoint="videos/sync",outcome="success"}',
        "ditserve_video_store_bytes",
    ):
        assert line in text, line
    store = ti2v.info()["video_jobs"]
    assert store["max_bytes"] == 64 * 2**20 and store["ttl_s"] == 600 and store["bytes"] > 0


# ---- the job store's bounds -------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _finish(store: JobStore, data: bytes, prompt: str = "p"):
    import asyncio

    job = store.create("m", prompt)

    async def content() -> bytes:
        return data

    asyncio.run(store.run(job, content, lambda e: {"code": "error", "message": str(e), "param": None}))
    return job


def test_the_store_forgets_by_age_size_and_count_and_leaves_no_stray_file(tmp_path):
    directory = tmp_path / "videos"
    directory.mkdir()
    stray = directory / f"video_{'a' * 32}.mp4"
    stray.write_bytes(b"left by a server that stopped")
    (directory / "notes.txt").write_text("not ours")
    clock = Clock()
    outcomes = []
    store = JobStore(directory, StoreLimits(max_jobs=4, max_bytes=100, ttl_s=60), outcomes.append, clock)
    assert not stray.exists() and (directory / "notes.txt").exists()  # only files of our own naming

    first = _finish(store, b"1" * 40)
    clock.now += 30
    second = _finish(store, b"2" * 40)
    clock.now += 20
    assert store.bytes_used == 80 and store.content_path(first).is_file()
    third = _finish(store, b"3" * 40)  # 120 bytes: the oldest goes
    assert store.get(first.id) is None and not store.content_path(first).exists()
    assert store.bytes_used == 80 and store.get(second.id) is second

    clock.now += 41  # second finished 61 s ago, third 41 s ago (a ttl of 60 s)
    assert store.get(second.id) is None and not store.content_path(second).exists()
    assert store.get(third.id) is third and third.expires_at == int(clock.now - 41 + 60)

    huge = _finish(store, b"x" * 101)  # larger than the whole store: the job fails, the others stay
    assert huge.status == "failed" and "--video-store-mb" in huge.error["message"]
    assert store.get(third.id) is third and store.content_path(third).is_file()

    unfinished = [store.create("m", f"waiting {i}") for i in range(3)]  # at max_jobs the oldest finished go
    assert len(store.jobs) == 4 and store.get(third.id) is None and store.get(huge.id) is huge
    unfinished.append(store.create("m", "one more"))
    assert store.get(huge.id) is None and list(store.jobs.values()) == unfinished
    assert store.counts() == {"queued": 4, "in_progress": 0, "completed": 0, "failed": 0}
    store.delete(unfinished[0])
    assert outcomes == ["completed"] * 3 + ["failed", "cancelled"]

    ids = {JobStore(tmp_path / "other").create("m", "p").id for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"video_[0-9a-f]{32}", i) for i in ids)  # 128 random bits each
    store.close()  # the server stops: its jobs and their files go
    assert store.jobs == {} and not any(directory.glob("video_*.mp4"))


@pytest.fixture(scope="module")
def ti2v_engine(tiny_wan_ti2v):
    from ditserve.engine.engine import Engine

    return Engine.from_pretrained(str(tiny_wan_ti2v), device="cpu")


def test_the_workers_image_is_the_image_the_engine_takes(ti2v_engine):
    """An image sent as bytes in a run message reaches the pipeline as the image itself: the worker's request gives
    the frames of the engine called with the PIL image, and another image gives other frames."""
    from ditserve.config import SamplingParams
    from ditserve.engine import messages as msg

    params = SamplingParams(prompt="a boat", height=32, width=32, num_frames=5, num_inference_steps=2, seed=9, fps=16)

    def through_the_worker(image: bytes) -> np.ndarray:
        item = msg.WorkItem("r", msg.params_to_dict(params), "mp4", "image-to-video", input_images=[image])
        message, blobs = msg.decode(msg.run_message("b", [item]))
        request = msg.items_from(message, blobs)[0].sampling_params().replace(output_type="np")
        return np.asarray(ti2v_engine.run_batch([request])[0].videos[0])

    red = through_the_worker(png("red"))
    direct = ti2v_engine.run(params.replace(images=[Image.new("RGB", (32, 32), "red")], output_type="np"))
    assert np.array_equal(red, np.asarray(direct.videos[0]))
    assert np.abs(red - through_the_worker(png("white"))).mean() > 1e-3
    plain = ti2v_engine.run(params.replace(output_type="np")).videos[0]
    assert np.abs(red - np.asarray(plain)).mean() > 1e-3
    assert ti2v_engine.pipeline.tasks == ("text-to-video", "image-to-video")  # the server offers both


def test_a_video_models_cost_is_counted_on_one_frame_and_exact_at_its_default_frames(ti2v_engine, monkeypatch):
    """measure counts a video DiT's FLOPs on one frame (an image-to-video model's inputs are VAE-encoded for real,
    which on all frames takes minutes on a CPU) and rescales them: exact at the default frames, at any size."""
    import torch

    from ditserve.engine import cost as cost_module
    from ditserve.engine.cost import _flop_counter, _meta_inputs, _poly, measure
    from ditserve.registry import load_object

    engine = ti2v_engine
    pipe = engine.pipeline
    # The DiT's count only: the decoder's count and the timed forward (seconds on a CPU) are not what is tested.
    monkeypatch.setattr(cost_module, "_decode_flops", lambda pipe, side: 0.0)
    monkeypatch.setattr(cost_module, "_timed_forward", lambda engine, dit, torch: (1.0, "not timed"))
    cost = measure(engine)
    assert cost.frames == pipe.defaults().num_frames == 81 and cost.temporal == 4
    dit = pipe.spec.dits[0]
    m = pipe.spatial_multiple
    for side in (8 * m, 40 * m):  # at and beyond the measured sizes, on all 81 frames
        with torch.device("meta"):
            model = load_object(dit.model).from_config(engine.source.config(dit.component))
        inputs = _meta_inputs(pipe.forward_inputs(side, side), torch)  # (its text encoding is not the DiT's)
        with torch.no_grad(), _flop_counter(torch) as counter:
            model(**inputs)
        assert _poly(cost.dit, side * side) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_the_served_digits_video_model_draws_what_is_asked(tmp_path):
    """/v1/videos judged by what it draws, not only by shapes: the built-in digits-video model behind a live server,
    at its folder's defaults (48×48, 9 frames), each clip back through MP4 and scored by the video gate."""
    from ditserve.digits.clips import prompt
    from ditserve.digits.video_quality import score_videos

    asked = [(7, "up"), (3, "left"), (0, "right"), (5, "down")]
    server = start_server("digits-video", "--output-dir", str(tmp_path), log_path=str(tmp_path / "serve.log"))
    try:
        jobs = [create(server, {"prompt": prompt(d, direction), "seed": 1})["id"] for d, direction in asked]
        videos = []
        for job_id in jobs:
            job, _ = poll(server, job_id)
            assert job["status"] == "completed", job
            videos.append(decode_video(content(server, job_id))[0])
    finally:
        server.stop()
    assert videos[0].shape == (9, 48, 48, 3)
    score = score_videos(videos, [d for d, _ in asked], [direction for _, direction in asked])
    assert score.digit_accuracy == 1.0 and score.direction_accuracy == 1.0, score.summary()
