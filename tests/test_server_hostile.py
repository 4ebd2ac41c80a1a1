"""The server against a hostile or careless client: each finding of the report that asked for this file, sent again
as it was (or as near as a tiny model allows), against one live server with a key, a LoRA folder holding a poisoned
LoRA, a public url, short read timeouts and few connections.

1. work over a limit is refused before it queues (deadlines that hold are in test_server.py);
2. a poisoned LoRA is refused; 3. nothing leaks; 4. the Host header is checked and never builds a url;
5. stalled connections are closed; 6. parsing is strict.
"""

from __future__ import annotations

import base64
import io
import socket
import time

import httpx
import pytest
from lora_writers import write_ai_toolkit, write_poisoned
from PIL import Image

from ditserve.server.launch import start_server

KEY = {"Authorization": "Bearer s3cret"}
FAST = {"size": "32x32", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def lora_dir(tiny_dev, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_ai_toolkit(tiny_dev, folder / "style.safetensors", seed=3)
    write_poisoned(tiny_dev, folder / "poisoned.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(tiny_dev, lora_dir, tmp_path_factory):
    s = start_server(
        str(tiny_dev),
        "--api-key",
        "s3cret",
        "--lora-dir",
        str(lora_dir),
        "--public-url",
        "https://images.example.test/ditserve",
        "--url-ttl",
        "1",
        "--max-request-seconds",
        "5",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-connections",
        "12",
        env={"DITSERVE_TESTING": "1"},
        log_path=str(tmp_path_factory.mktemp("hostile") / "server.log"),
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=KEY, timeout=120) as c:
        yield c


def generate(client, body: dict) -> httpx.Response:
    return client.post("/v1/images/generations", json=body)


def refusals(client) -> str:
    return "\n".join(line for line in client.get("/metrics").text.splitlines() if "refusals_total{" in line)


# ---- 1. work over a limit --------------------------------------------------------------------------------------
def test_a_request_too_costly_for_the_server_is_refused_naming_the_field(client):
    huge = generate(client, {"prompt": "the digit 7", "size": "4096x4096", "num_inference_steps": 1})
    assert huge.status_code == 400, huge.text
    error = huge.json()["error"]
    assert (error["param"], error["code"]) == ("size", "max_pixels_exceeded")
    assert "4096x4096 is 16777216 pixels" in error["message"] and "--max-pixels" in error["message"]
    # Under the pixel limit, but estimated over --max-request-seconds (5 s) on two CPU cores.
    slow = generate(client, {"prompt": "the digit 7", "size": "1024x1024", "num_inference_steps": 1})
    assert slow.status_code == 400, slow.text
    error = slow.json()["error"]
    assert (error["param"], error["code"]) == ("size", "max_request_seconds_exceeded")
    assert "would take about" in error["message"] and "--max-request-seconds" in error["message"]
    steps = generate(client, {"prompt": "x", "size": "32x32", "num_inference_steps": 500})
    assert steps.status_code == 400 and steps.json()["error"]["code"] == "max_steps_exceeded"
    assert steps.json()["error"]["param"] == "num_inference_steps"
    many = generate(client, {"prompt": "x", "size": "512x512", "num_inference_steps": 100, "n": 16})
    assert many.status_code == 400 and many.json()["error"]["param"] == "n"
    counted = refusals(client)
    for reason in ("max_pixels", "max_request_seconds", "max_steps"):
        assert f'reason="{reason}"' in counted, reason
    assert generate(client, {"prompt": "x", **FAST}).status_code == 200  # cheap work is served
    info = client.get("/server_info").json()
    assert info["limits"]["max_pixels"] == 1024 * 1024 and info["limits"]["max_request_seconds"] == 5
    assert info["cost"]["flops_per_s"] > 0


# ---- 2. a poisoned LoRA -----------------------------------------------------------------------------------------
def _image(client) -> bytes:
    body = {"prompt": "a boat", "seed": 5, "response_format": "b64_json", **FAST}
    r = generate(client, body)
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"lora_nickname": "bad", "lora_path": "poisoned.safetensors"},
            "lora_path",
            "lora_B.weight holds NaN or infinite values",
        ),
        ({"lora_nickname": "loud", "lora_path": "style.safetensors", "strength": -1e9}, "strength", "between -10"),
        ({"lora_nickname": "n" * 100_000, "lora_path": "style.safetensors"}, "lora_nickname", "at most 64"),
        ({"lora_nickname": "../x", "lora_path": "style.safetensors"}, "lora_nickname", "only letters"),
    ],
)
def test_a_poisoned_or_wild_lora_is_refused_and_changes_nothing(client, body, param, words):
    before_state, before_image = client.get("/v1/list_loras").json(), _image(client)
    r = client.post("/v1/set_lora", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    assert client.get("/v1/list_loras").json() == before_state
    assert _image(client) == before_image  # the model is as it was, bit for bit


# ---- 3. nothing leaks -------------------------------------------------------------------------------------------
def test_paths_are_relative_to_the_lora_folder(client, lora_dir):
    r = client.post("/v1/set_lora", json={"lora_nickname": "style", "lora_path": "style.safetensors"})
    assert r.status_code == 200, r.text
    try:
        listed = client.get("/v1/list_loras")
        assert listed.json()["loaded"][0]["path"] == "style.safetensors"
        missing = client.post("/v1/set_lora", json={"lora_nickname": "m", "lora_path": "sub/missing.safetensors"})
        assert missing.status_code == 400 and "sub/missing.safetensors" in missing.json()["error"]["message"]
        for answer in (r, listed, missing):
            assert str(lora_dir) not in answer.text and "/tmp" not in answer.text
    finally:
        client.post("/v1/set_lora", json={"lora_nickname": []})


def test_a_bad_upload_names_no_object(client):
    r = client.post("/v1/images/edits", files={"image": ("x.png", b"not an image", "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert "object at 0x" not in r.text and "BytesIO" not in r.text


def test_every_route_but_liveness_needs_the_key(server, client):
    for path in ("/server_info", "/docs", "/openapi.json", "/metrics", "/health", "/health/ready", "/v1/models"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert client.get(path).status_code == 200, path
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "alive"}
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", **FAST}, headers={"Authorization": "x"})
    assert r.status_code == 401


def test_url_images_need_the_key_and_expire(server, client):
    def url_image() -> str:
        r = generate(client, {"prompt": "x", "response_format": "url", **FAST})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["url"]

    first = url_image()
    base = "https://images.example.test/ditserve"
    assert first.startswith(base + "/files/images/")  # from --public-url, whatever Host the client sent
    path = first.removeprefix(base)
    assert httpx.get(server.url + path).status_code == 401
    assert client.get(path).status_code == 200
    time.sleep(1.5)
    second = url_image().removeprefix(base)  # writing a new one removes those past --url-ttl
    assert client.get(path).status_code == 404 and client.get(second).status_code == 200


# ---- 4. the Host header -----------------------------------------------------------------------------------------
def test_an_unknown_host_is_refused_and_never_builds_a_url(client):
    evil = {"Host": "evil.example:666"}
    r = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url", **FAST}, headers=evil)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    assert client.get("/health/live", headers=evil).status_code == 400
    ok = client.post(
        "/v1/images/generations",
        json={"prompt": "x", "response_format": "url", **FAST},
        headers={"Host": "localhost:1"},  # an allowed name: still not where the url points
    )
    assert ok.status_code == 200 and ok.json()["data"][0]["url"].startswith("https://images.example.test/")
    assert 'reason="host"' in refusals(client)


# ---- 5. stalled connections -------------------------------------------------------------------------------------
def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stalled_clients_are_closed(server, client):
    for partial, words in (
        (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le", b"headers did not arrive"),
        (
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer s3cret\r\nContent-Length: 100\r\n\r\n" + b'{"prompt": ',
            b"body did not arrive",
        ),
    ):
        sock = _connect(server)
        start = time.monotonic()
        sock.sendall(partial)
        answer = _read_until_closed(sock)  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - start < 5
        assert answer.startswith(b"HTTP/1.1 408") and words in answer
        sock.close()
    idle = _connect(server)
    assert _read_until_closed(idle) == b""  # a connection that sends nothing is closed too, without an answer
    assert 'reason="read_timeout"} 2.0' in refusals(client)


def test_connections_are_capped(server, client):
    held = [_connect(server) for _ in range(12)]
    try:
        time.sleep(0.3)
        extra = _connect(server)
        answer = _read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert client.get("/health").status_code == 200  # the server is fine once they are gone


# ---- 6. strict parsing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "x", "n": "2", **FAST}, "n", "valid integer"),
        ({"prompt": "x", "n": True, **FAST}, "n", "valid integer"),
        ({"prompt": "x", "size": "\u0663\u0662x\u0663\u0662"}, "size", "ASCII digits"),
        ({"prompt": "x", "size": "100000x100000"}, "size", "a width of 100000; each side must be 1 to 4096"),
        ({"prompt": "x", "seed": "7", **FAST}, "seed", "valid integer"),
        ({"prompt": "x", "num_inference_steps": 2.0, "size": "32x32"}, "num_inference_steps", "valid integer"),
    ],
)
def test_parsing_is_strict(client, body, param, words):
    r = generate(client, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["code"]


def test_errors_name_the_field_and_always_have_a_code(server, client):
    union = client.post("/v1/set_lora", json={"lora_nickname": "x", "strength": "strong"})
    assert union.status_code == 400 and union.json()["error"]["param"] == "strength"  # not strength.float
    answers = [
        union,
        client.get("/nowhere"),
        client.delete("/v1/models"),
        client.post("/v1/images/generations", content=b"{oops", headers={"Content-Type": "application/json"}),
        client.post("/v1/images/generations", json=[1, 2]),
        client.get("/v1/videos/video_x"),
        httpx.get(f"{server.url}/v1/models"),
    ]
    for r in answers:
        assert r.status_code >= 400 and isinstance(r.json()["error"]["code"], str), r.text


def test_a_form_body_on_a_json_route_is_415_with_a_hint(client):
    # What `curl -d '{"prompt": ...}'` sends: JSON text labelled as a form.
    r = client.post(
        "/v1/images/generations",
        content=b'{"prompt": "x", "size": "32x32"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["error"]["message"] and "curl" in r.json()["error"]["message"]
    assert client.post("/v1/set_lora", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415


def test_edit_and_video_fields_are_checked_before_the_models_abilities(client):
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    image = {"image": ("in.png", png.getvalue(), "image/png")}
    for fields, param in (
        ({"prompt": "x", "n": "2x"}, "n"),
        ({"prompt": "x", "n": "\u0663"}, "n"),
        ({"prompt": "x", "size": "31x32"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "colour": "red"}, "colour"),
    ):
        r = client.post("/v1/images/edits", files=image, data=fields)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    able = client.post("/v1/images/edits", files=image, data={"prompt": "x", "n": "2", **FAST})
    assert able.status_code == 400 and able.json()["error"]["code"] == "unsupported_task"
    for body, param in (
        ({"prompt": "x", "size": "31x32"}, "size"),
        ({"prompt": "x", "seconds": "four"}, "seconds"),
        ({"prompt": "x", "seconds": 60}, "seconds"),  # 961 frames: over --max-frames on a CPU server
        ({"prompt": "x", "num_inference_steps": "4"}, "num_inference_steps"),
    ):
        r = client.post("/v1/videos", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    cheap = {"prompt": "x", "seconds": "1", "size": "32x32", "num_inference_steps": 2}  # under every limit
    video = client.post("/v1/videos", json=cheap)
    assert video.status_code == 400 and video.json()["error"]["code"] == "unsupported_task", video.text
