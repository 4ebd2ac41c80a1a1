"""The HTTP server end to end: a live `ditserve serve` on loopback with a tiny model, driven by real clients.

Sizes are 32x32 and 2 steps so the whole file runs in a couple of minutes on two CPU cores. The worker runs with
DITSERVE_TESTING=1, which enables its test-only prompt hooks: "[[fail]]" raises inside the denoising loop and
"[[sleep=S]]" sleeps S seconds per step (to keep requests in flight).

Starting a server takes most of ten seconds here, so tests share one where their flags allow (ServerSlot): the tests
that end a server (SIGTERM, a spent restart budget) come after the others that share it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from ditserve.server.launch import RunningServer, start_server

TESTING = {"DITSERVE_TESTING": "1"}
FAST = {"size": "32x32", "num_inference_steps": 2}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def b64_pixels(item: dict) -> np.ndarray:
    return pixels(base64.b64decode(item["b64_json"]))


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=kw.pop("timeout", 120), **kw)


@dataclass
class Loading:
    """What a server answered while its model loaded: each change of /health, and a request sent meanwhile."""

    health: list[tuple[int, str]]
    early: tuple[int, str] | None  # (status, error message) of a request sent at the first 503


def start_watching_the_load(model: str, *args: str, **kw) -> tuple[RunningServer, Loading]:
    """start_server, polling /health from the moment the process starts until the model is loaded."""
    s = start_server(model, *args, wait_ready=False, **kw)
    seen: list[tuple[int, str]] = []
    early = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and s.proc.poll() is None:
        try:
            r = httpx.get(f"{s.url}/health", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        seen.append((r.status_code, r.json()["status"]))
        if r.status_code == 503 and len(seen) == 1:
            answer = post(s.url, {"prompt": "x", **FAST})
            early = (answer.status_code, answer.json()["error"]["message"] if answer.status_code != 200 else "")
        if r.status_code == 200:
            break
        time.sleep(0.05)
    return s.wait_ready(), Loading(seen, early)  # wait_ready raises, with the log, if it never got ready


class ServerSlot:
    """A server that several tests of this file share: started (its load watched) when a test first asks for it, and
    started again if a test left it unusable (ended by SIGTERM, or dead with its restart budget spent), so that each
    test gets a working server whatever ran before it. The tests that end a server come last of those sharing it."""

    def __init__(self, model: str, args: tuple[str, ...], tmp_path_factory, name: str):
        self.model, self.args, self.tmp, self.name = model, args, tmp_path_factory, name
        self.current: RunningServer | None = None
        self.loading: Loading | None = None

    def get(self) -> RunningServer:
        if self.current is None or not self._usable():
            self.stop()
            self.current, self.loading = start_watching_the_load(
                self.model, *self.args, env=TESTING, log_path=str(self.tmp.mktemp("logs") / f"{self.name}.log")
            )
        return self.current

    def _usable(self) -> bool:
        if self.current.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.current.url}/health", timeout=10).json()["status"] not in ("dead", "failed")
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture(scope="module")
def shared(tiny_dev, tmp_path_factory):
    """The server of most tests here: batching on (4), a small prompt limit, a small body limit. The /health while
    loading test reads how its load went; the SIGTERM test ends it (last in this file)."""
    out = str(tmp_path_factory.mktemp("outputs"))
    args = ("--max-batch-size", "4", "--max-prompt-chars", "200", "--max-body-mb", "1", "--output-dir", out)
    slot = ServerSlot(str(tiny_dev), (*args, "--served-model-name", "tiny-dev"), tmp_path_factory, "server")
    yield slot
    slot.stop()


@pytest.fixture
def server(shared):
    return shared.get()


def test_openai_client_b64_and_url(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"num_inference_steps": 2, "seed": 7}
    b64 = client.images.generate(prompt="a red fox", size="32x32", response_format="b64_json", extra_body=extra)
    assert len(b64.data) == 1 and b64.data[0].b64_json
    image = Image.open(io.BytesIO(base64.b64decode(b64.data[0].b64_json)))
    assert image.size == (32, 32) and image.format == "PNG"

    url = client.images.generate(prompt="a red fox", size="32x32", response_format="url", extra_body=extra)
    link = url.data[0].url
    assert link.startswith("/files/images/")  # relative: never built from the Host header a client sends
    fetched = httpx.get(server.url + link, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    # Same seed, same settings: the url image is the b64 image (the server is deterministic for a seed).
    assert np.array_equal(pixels(fetched.content), b64_pixels(b64.data[0].model_dump()))


def test_response_fields_formats_and_n(server):
    for fmt, pil_format in (("jpeg", "JPEG"), ("webp", "WEBP")):
        r = post(server.url, {"prompt": "x", "n": 2, "output_format": fmt, "seed": 3, **FAST})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) == 2
        assert {"created", "inference_time_s", "peak_memory_mb", "seed", "size"} <= set(body)
        assert body["seed"] == 3 and body["size"] == "32x32" and body["inference_time_s"] > 0
        # Memory per stage and per rank (None figures on this CPU server).
        assert set(body["memory"]["stages"]) == {"encode", "prepare", "denoise", "decode"}
        assert [r["device"] for r in body["memory"]["ranks"]] == ["cpu"]
        for item in body["data"]:
            image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            assert image.format == pil_format and image.size == (32, 32)
    wide = post(server.url, {"prompt": "x", "width": 48, "height": 32, "num_inference_steps": 2})
    assert wide.status_code == 200 and b64_pixels(wide.json()["data"][0]).shape == (32, 48, 3)


def test_32_concurrent_requests_all_answered_correctly(server):
    """32 at once, two shapes: each answer is for its own request (checked against the same request sent alone),
    none lost, none duplicated, and compatible requests were batched."""
    before = server.info()["completed"]

    def body(i: int) -> dict:
        size = "32x32" if i % 2 == 0 else "48x32"
        return {"prompt": f"request number {i}", "seed": 1000 + i, "size": size, "num_inference_steps": 2}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/images/generations", json=body(i)) for i in range(32)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert [b["seed"] for b in bodies] == [1000 + i for i in range(32)]
    assert [b["size"] for b in bodies] == [body(i)["size"] for i in range(32)]
    images = [b64_pixels(b["data"][0]) for b in bodies]
    assert len({img.tobytes() for img in images}) == 32  # no request got another's image
    assert server.info()["completed"] - before == 32  # none lost, none run twice
    assert max(b["batch_size"] for b in bodies) > 1  # batching happened
    # A batched image equals the image of the same request alone, within 1 intensity level on average: on the
    # CPU in float32 a batched matmul may differ from a single one in the last bits, nothing more.
    for i in (0, 1, 17, 30):
        alone = post(server.url, body(i))
        assert alone.json()["batch_size"] == 1
        assert np.abs(b64_pixels(alone.json()["data"][0]) - images[i]).mean() <= 1.0


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "x", "size": "34x32"}, "size", "multiple of 4"),
        ({"prompt": "x", "size": "32x32", "width": 48}, "width", "size says"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal"),
        ({"prompt": "x", "num_inference_steps": 100000}, "num_inference_steps", "less than or equal"),
        ({"prompt": "x", "n": 17}, "n", "less than or equal"),
        ({"prompt": "x" * 201}, "prompt", "limit is 200"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "png"),
        ({"prompt": "x", "response_format": "xml"}, "response_format", "b64_json"),
        ({"prompt": "x", "colour": "red"}, "colour", "Extra inputs"),
        ({"prompt": ""}, "prompt", "at least 1"),
        ({"size": "32x32"}, "prompt", "required"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal"),
        ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale", "number"),
        ({"prompt": "x", "size": "32x32", "attention": "sdpa"}, "attention", "--attention-backend"),
    ],
)
def test_bad_input_is_400_naming_the_field(server, body, param, words):
    r = post(server.url, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"] and param in error["message"]


def test_malformed_bodies(server):
    url = f"{server.url}/v1/images/generations"
    not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    wrong_model = post(server.url, {"prompt": "x", "model": "dall-e-3", **FAST})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    assert "serves 'tiny-dev'" in wrong_model.json()["error"]["message"]
    too_big = httpx.post(url, json={"prompt": "x" * (2 * 2**20)}, timeout=30)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b"x" * 65536

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"


def test_edits_answer_a_clear_400(server):
    from openai import BadRequestError, OpenAI

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as e:
        client.images.edit(image=("in.png", png.getvalue(), "image/png"), prompt="make it blue", size="32x32")
    assert "cannot edit images" in str(e.value)
    edits = f"{server.url}/v1/images/edits"
    garbage = httpx.post(edits, files={"image": ("x.png", b"not an image", "image/png")}, data={"prompt": "x"})
    assert garbage.status_code == 400 and garbage.json()["error"]["param"] == "image"
    missing = httpx.post(edits, data={"prompt": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"
    bad_size = httpx.post(
        edits, files={"image": ("x.png", png.getvalue(), "image/png")}, data={"prompt": "x", "size": "nope"}
    )
    assert bad_size.status_code == 400 and bad_size.json()["error"]["param"] == "size"


def test_videos_answer_a_clear_400_and_jobs_are_empty(server):
    # 2 s at 16 fps: 33 frames, a CPU server's limit (4 s would be refused as over --max-frames, before the task)
    r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a fox running", "size": "32x32", "seconds": "2"})
    assert r.status_code == 400 and "does not generate video" in r.json()["error"]["message"]
    bad = httpx.post(f"{server.url}/v1/videos", json={"prompt": "x", "size": "wide"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
    videos = f"{server.url}/v1/videos"
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "green").save(png, format="PNG")
    multipart = httpx.post(
        videos, files={"input_reference": ("ref.png", png.getvalue(), "image/png")}, data={"prompt": "x"}
    )
    assert multipart.status_code == 400 and "does not generate video" in multipart.json()["error"]["message"]
    garbage = httpx.post(
        videos, files={"input_reference": ("ref.png", b"\x00" * 64, "image/png")}, data={"prompt": "x"}
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["param"] == "input_reference"
    unknown = httpx.post(videos, json={"prompt": "x", "frame_rate": 24})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "frame_rate"
    listing = httpx.get(f"{server.url}/v1/videos").json()
    assert listing["object"] == "list" and listing["data"] == []
    for method, path in (("GET", "video_abc"), ("GET", "video_abc/content"), ("DELETE", "video_abc")):
        missing = httpx.request(method, f"{server.url}/v1/videos/{path}")
        assert missing.status_code == 404 and "no video job" in missing.json()["error"]["message"]


def test_files_route_reads_only_its_own_files(server):
    for name in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "0" * 32 + ".png", "server.log"):
        r = httpx.get(f"{server.url}/files/images/{name}")
        assert r.status_code == 404
    assert httpx.get(f"{server.url}/files/images/../../../etc/passwd").status_code == 404


def test_models_health_metrics_info(server):
    post(server.url, {"prompt": "x", "size": "oops"})
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-dev"  # from --served-model-name
    named = post(server.url, {"prompt": "x", "model": "tiny-dev", **FAST})
    assert named.status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    post(server.url, {"prompt": "metrics", **FAST})
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "ditserve_queue_length",
        "ditserve_running_requests",
        'ditserve_requests_total{endpoint="images/generations",outcome="success"}',
        "ditserve_request_latency_seconds_bucket",
        "ditserve_queue_time_seconds_bucket",
        'ditserve_stage_seconds_count{stage="denoise"}',
        "ditserve_peak_memory_mb",
        "ditserve_device_memory_allocated_mb",  # per device (no sample on this CPU server)
        "ditserve_device_memory_reserved_mb",
        "ditserve_device_memory_peak_mb",
        'ditserve_requests_total{endpoint="images/generations",outcome="invalid"}',
    ):
        assert name in text, name
    info = server.info()
    assert info["state"] == "ready" and info["worker_pid"] and info["max_batch_size"] == 4
    off = httpx.post(f"{server.url}/start_profile", json={}, headers={"X-Admin-Key": "x"})
    assert off.status_code == 403 and "--admin-key" in off.json()["error"]["message"]  # no admin key: no profiling
    assert info["model"]["memory_plan"]["dit_layerwise_offload"] is False  # the offloads in effect (none here)


def test_a_failing_request_fails_alone(server):
    failed = post(server.url, {"prompt": "boom [[fail]]", **FAST})
    assert failed.status_code == 500 and "injected fault" in failed.json()["error"]["message"]
    assert post(server.url, {"prompt": "fine", **FAST}).status_code == 200

    async def together():  # batched with good requests: the batch is retried one by one, only the bad one fails
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            slow = c.post("/v1/images/generations", json={"prompt": "hold [[sleep=0.3]]", **FAST})
            first = asyncio.ensure_future(slow)
            await asyncio.sleep(0.2)
            rest = [
                c.post("/v1/images/generations", json={"prompt": p, "seed": 5, **FAST})
                for p in ("ok one", "bad [[fail]]", "ok two")
            ]
            return [await first, *await asyncio.gather(*rest)]

    codes = [r.status_code for r in asyncio.run(together())]
    assert codes == [200, 200, 500, 200]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_client_disconnect_cancels_the_request(server):
    with pytest.raises(httpx.ReadTimeout):
        post(server.url, {"prompt": "slow [[sleep=0.5]]", "size": "32x32", "num_inference_steps": 40}, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.info()["running"]:
        time.sleep(0.1)
    assert server.info()["running"] == 0  # cancelled long before its 20 s of steps
    assert 'outcome="client_disconnected"' in httpx.get(f"{server.url}/metrics").text


def test_health_is_503_while_the_model_loads(shared):
    """The shared server's start was watched from the moment its process started (start_watching_the_load)."""
    server = shared.get()
    seen, early = shared.loading.health, shared.loading.early
    # uvicorn answers within a second; loading the model (in the worker) takes longer than that
    assert seen[0] == (503, "loading") and seen[-1] == (200, "ok"), seen
    assert early is not None and early[0] == 503 and "still loading" in early[1], early
    assert post(server.url, {"prompt": "x", **FAST}).status_code == 200


# ---- servers of their own ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def narrow(tiny_dev, tmp_path_factory):
    """The server of the queue-full and killed-worker tests: one request at a time (--max-batch-size 1) with a queue
    of 2 behind it, and a restart budget of one (--max-restarts 1). The killed-worker test spends that budget and
    leaves the server dead, so it comes after the queue-full test."""
    args = ("--max-queue", "2", "--max-batch-size", "1", "--max-restarts", "1")
    slot = ServerSlot(str(tiny_dev), args, tmp_path_factory, "narrow")
    yield slot
    slot.stop()


def test_queue_full_is_429_with_retry_after(narrow):
    s = narrow.get()

    async def flood():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            slow = {"prompt": "hold [[sleep=0.5]]", **FAST}
            running = asyncio.ensure_future(c.post("/v1/images/generations", json=slow))
            await asyncio.sleep(0.5)
            queued = [asyncio.ensure_future(c.post("/v1/images/generations", json=slow)) for _ in range(2)]
            await asyncio.sleep(0.3)
            refused = await c.post("/v1/images/generations", json=slow)
            return refused, await asyncio.gather(running, *queued)

    refused, accepted = asyncio.run(flood())
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in accepted] == [200, 200, 200]


def test_past_its_deadline_a_request_stops_computing(tiny_dev, tmp_path):
    """Deadlines hold. Between steps the worker stops a cancelled request itself; inside a step that outlasts the
    deadline (the [[sleep=S]] hook sleeps inside the step) the supervisor ends the worker --cancel-grace seconds
    after the 504 and starts a fresh one, and the next request succeeds."""
    # --max-request-seconds 0: no refusal (400) by estimated cost, which on a busy machine can put these slow
    # requests over the 2 s deadline before they run; admitted, they must be stopped at the deadline.
    s = start_server(
        str(tiny_dev),
        "--request-timeout",
        "2",
        "--cancel-grace",
        "1",
        "--max-request-seconds",
        "0",
        env=TESTING,
        log_path=str(tmp_path / "log"),
    )
    try:
        start = time.monotonic()
        slow = post(s.url, {"prompt": "slow [[sleep=0.5]]", "size": "32x32", "num_inference_steps": 20})
        assert slow.status_code == 504 and time.monotonic() - start < 6  # not the 10 s its steps would take
        assert "longer than the server's limit of 2 s" in slow.json()["error"]["message"]
        assert post(s.url, {"prompt": "quick", **FAST}).status_code == 200
        assert s.info()["worker_restarts"] == 0  # stopped between steps: no restart needed

        old_pid = s.info()["worker_pid"]
        seen: list[str] = []

        async def stuck_then_watch():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                body = {"prompt": "stuck [[sleep=60]]", "size": "32x32", "num_inference_steps": 1}
                stuck = asyncio.ensure_future(c.post("/v1/images/generations", json=body))
                answered_at = None
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    status = (await c.get("/health")).json()["status"]
                    if not seen or seen[-1] != status:
                        seen.append(status)
                    if stuck.done() and answered_at is None:
                        answered_at = time.monotonic()
                    if answered_at is not None and not _alive(old_pid):
                        return await stuck, time.monotonic() - answered_at
                    await asyncio.sleep(0.1)
                raise AssertionError(f"the stuck worker {old_pid} was never ended; health went {seen}")

        r, freed_after = asyncio.run(stuck_then_watch())
        assert r.status_code == 504
        assert freed_after < 4  # the worker stopped computing within a few seconds of the 504 (grace 1 s)
        deadline = time.monotonic() + 120
        while seen[-1] != "ok" and time.monotonic() < deadline:
            status = httpx.get(f"{s.url}/health").json()["status"]
            if seen[-1] != status:
                seen.append(status)
            time.sleep(0.1)
        # /health told it as it was: running, stalled past its deadline, restarting, then ok again
        assert [x for x in seen if x != "busy"] == ["ok", "stalled", "restarting", "ok"], seen
        assert httpx.get(f"{s.url}/health/ready").status_code == 200
        assert post(s.url, {"prompt": "after", **FAST}).status_code == 200
        info = s.info()
        assert info["worker_pid"] != old_pid and info["worker_restarts"] == 1
        assert 'ditserve_worker_restarts_total{reason="deadline"} 1.0' in httpx.get(f"{s.url}/metrics").text
    finally:
        s.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped) computes nothing
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_killed_worker_is_replaced_and_the_queue_is_served(narrow):
    """SIGKILL the worker mid-request: the running request gets 503 with Retry-After, the one queued behind it
    completes on the fresh worker. With the restart budget (--max-restarts 1) spent, the next death is final:
    /health says dead and requests fail at once."""
    s = narrow.get()
    pid = s.info()["worker_pid"]

    async def kill_mid_request():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            body = {"prompt": "long [[sleep=0.5]]", "size": "32x32", "num_inference_steps": 40}
            inflight = asyncio.ensure_future(c.post("/v1/images/generations", json=body))
            await asyncio.sleep(1.0)
            queued_body = {"prompt": "queued", "size": "48x32", "num_inference_steps": 2, "seed": 3}
            queued = asyncio.ensure_future(c.post("/v1/images/generations", json=queued_body))
            await asyncio.sleep(0.5)
            assert (await c.get("/server_info")).json()["queue_length"] == 1
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            r = await inflight
            waited = time.monotonic() - killed_at
            during = (await c.get("/health")).json()["status"]
            return r, waited, during, await queued

    r, waited, during, queued = asyncio.run(kill_mid_request())
    assert r.status_code == 503 and "worker process died" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "worker_died" and int(r.headers["Retry-After"]) >= 1
    assert waited < 3 and during in ("restarting", "ok", "busy")
    assert queued.status_code == 200 and queued.json()["seed"] == 3 and queued.json()["size"] == "48x32"
    info = s.info()
    assert info["worker_pid"] != pid and info["worker_restarts"] == 1 and info["state"] == "ready"
    assert 'ditserve_worker_restarts_total{reason="died"} 1.0' in httpx.get(f"{s.url}/metrics").text

    os.kill(info["worker_pid"], signal.SIGKILL)  # the budget of one restart is spent: this death is final
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and httpx.get(f"{s.url}/health").json()["status"] != "dead":
        time.sleep(0.1)
    health = httpx.get(f"{s.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert "restart budget" in health.json()["message"]
    assert httpx.get(f"{s.url}/health/live").status_code == 503
    start = time.monotonic()
    after = post(s.url, {"prompt": "x", **FAST})
    assert after.status_code == 503 and time.monotonic() - start < 1


def test_load_failure_is_reported_by_health(tiny_dev, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dev, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")  # the folder looks right: only the worker's load finds it broken
    s = start_server(str(broken), log_path=str(tmp_path / "log"), wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        body = {}
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{s.url}/health", timeout=2)
                body = r.json()
                if body["status"] == "failed":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert body.get("status") == "failed" and "failed to load" in body["message"]
        assert post(s.url, {"prompt": "x"}).status_code == 503
    finally:
        s.stop()


def test_serve_rejects_bad_flags_before_starting(tmp_path):
    import json
    import subprocess
    import sys

    cases = [
        (["--model", str(tmp_path / "nowhere")], "--model"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--dtype", "float8"], "--dtype"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--public-url", "images.example.com"], "--public-url"),
    ]
    # One interpreter runs the command line's entry point once per case (an import of torch each would be most of
    # this test's time): each must exit with 2 before a server starts, naming its flag, without a traceback.
    script = (
        "import contextlib, io, json, sys\n"
        "from ditserve.cli import main\n"
        "results = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = main(['serve', *args])\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    results.append([code, err.getvalue()])\n"
        "print(json.dumps(results))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps([args for args, _ in cases])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for (args, words), (code, stderr) in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        assert code == 2 and words in stderr and "Traceback" not in stderr, (args, code, stderr)


# ---- last: this test ends the shared server (a test after it would start that server again) ---------------------
def test_sigterm_answers_every_accepted_request(server):
    s = server

    async def load_then_terminate():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            tasks = [
                asyncio.ensure_future(
                    c.post(
                        "/v1/images/generations",
                        json={"prompt": f"p{i} [[sleep=0.2]]", "seed": i, "size": "32x32", "num_inference_steps": 3},
                    )
                )
                for i in range(6)
            ]
            await asyncio.sleep(0.5)
            info = (await c.get("/server_info")).json()
            s.proc.send_signal(signal.SIGTERM)
            return info, await asyncio.gather(*tasks)

    info, responses = asyncio.run(load_then_terminate())
    assert info["queue_length"] + info["running"] >= 4  # most were still waiting or running at SIGTERM
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["seed"] for r in responses] == list(range(6))
    assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=2)
