"""LoRA over HTTP on a live loopback server: set, list, merge, unmerge; errors name the field and change nothing;
paths outside --lora-dir are refused; --lora-* flags on serve. The same server's profiling window (--admin-key)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from lora_writers import write_ai_toolkit
from PIL import Image

from ditserve import Engine
from ditserve.server.launch import start_server

ADMIN_KEY = "operator-key"
REQUEST = {"prompt": "a boat", "size": "32x32", "num_inference_steps": 2, "seed": 5, "response_format": "b64_json"}


def image(base: str) -> np.ndarray:
    r = httpx.post(f"{base}/v1/images/generations", json=REQUEST, timeout=120)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(tiny_dev, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_ai_toolkit(tiny_dev, folder / "style.safetensors", seed=3)
    return folder


@pytest.fixture(scope="module")
def server(tiny_dev, lora_dir, tmp_path_factory):
    s = start_server(
        str(tiny_dev),
        "--lora-dir",
        str(lora_dir),
        "--admin-key",
        ADMIN_KEY,
        log_path=str(tmp_path_factory.mktemp("l") / "log"),
    )
    yield s
    s.stop()


def test_set_merge_unmerge_over_http(server, tiny_dev, lora_dir):
    base = image(server.url)
    r = httpx.post(
        f"{server.url}/v1/set_lora",
        json={"lora_nickname": "style", "lora_path": "style.safetensors", "strength": 0.8},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    listed = httpx.get(f"{server.url}/v1/list_loras", timeout=60).json()
    assert listed == r.json()
    assert "style" in str(listed)
    dynamic = image(server.url)
    assert np.abs(dynamic - base).mean() > 1.0  # the adapter changes the picture

    # The same LoRA through the Python API gives the same picture.
    engine = Engine.from_pretrained(str(tiny_dev))
    engine.set_lora("style", str(lora_dir / "style.safetensors"), strength=0.8)
    api = engine.generate("a boat", height=32, width=32, num_inference_steps=2, seed=5).images[0]
    assert np.abs(np.asarray(api, dtype=np.int16) - dynamic).mean() <= 1.0

    assert httpx.post(f"{server.url}/v1/merge_lora_weights", json={}, timeout=120).status_code == 200
    merged = image(server.url)
    assert np.abs(merged - dynamic).mean() <= 1.0
    assert httpx.post(f"{server.url}/v1/unmerge_lora_weights", json={}, timeout=120).status_code == 200
    assert np.array_equal(image(server.url), base)  # W0 back, bit for bit
    # Off again, for the other tests of this module.
    assert httpx.post(f"{server.url}/v1/set_lora", json={"lora_nickname": []}, timeout=60).status_code == 200


@pytest.mark.parametrize(
    "body, param",
    [
        ({"lora_nickname": "x", "lora_path": "../../etc/passwd"}, "lora_path"),
        ({"lora_nickname": "x", "lora_path": "/etc/passwd"}, "lora_path"),
        ({"lora_nickname": "x", "lora_path": "missing.safetensors"}, "lora_path"),
        ({"lora_nickname": "never-loaded"}, "lora_nickname"),
        ({"lora_nickname": "style", "lora_path": "style.safetensors", "target": "transformer_2"}, "target"),
    ],
)
def test_bad_lora_requests_are_400_and_change_nothing(server, body, param):
    before = httpx.get(f"{server.url}/v1/list_loras", timeout=60).json()
    r = httpx.post(f"{server.url}/v1/set_lora", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(f"{server.url}/v1/list_loras", timeout=60).json() == before


def test_schema_errors_name_the_field(server):
    r = httpx.post(f"{server.url}/v1/merge_lora_weights", json={"strength": "strong"}, timeout=60)
    assert r.status_code == 400 and "strength" in str(r.json()["error"]["param"])


def test_serve_lora_flags_apply_from_the_first_request(tiny_dev, lora_dir, tmp_path):
    s = start_server(
        str(tiny_dev),
        "--lora-path",
        str(lora_dir / "style.safetensors"),
        "--lora-scale",
        "0.8",
        log_path=str(tmp_path / "log"),
    )
    try:
        listed = httpx.get(f"{s.url}/v1/list_loras", timeout=60).json()
        assert "style" in str(listed)
        # Without --lora-dir, the server loads no files on a client's word.
        r = httpx.post(
            f"{s.url}/v1/set_lora", json={"lora_nickname": "b", "lora_path": "style.safetensors"}, timeout=60
        )
        assert r.status_code == 400 and "--lora-dir" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_a_restarted_worker_has_the_loras_set_before(server):
    """The supervisor replaces a worker that dies; the LoRA changes made over HTTP are made again on the fresh one,
    so the pictures stay those of the adapters the clients set."""
    import os
    import signal
    import time

    set_ = httpx.post(
        f"{server.url}/v1/set_lora",
        json={"lora_nickname": "style", "lora_path": "style.safetensors", "strength": 0.6},
        timeout=120,
    )
    assert set_.status_code == 200, set_.text
    assert httpx.post(f"{server.url}/v1/merge_lora_weights", json={}, timeout=120).status_code == 200
    try:
        before, state = image(server.url), httpx.get(f"{server.url}/v1/list_loras", timeout=60).json()
        pid = server.info()["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = server.info()
            if info["worker_pid"] != pid and info["state"] == "ready":
                break
            time.sleep(0.2)
        assert server.info()["worker_restarts"] == 1
        assert httpx.get(f"{server.url}/v1/list_loras", timeout=60).json() == state
        assert np.abs(image(server.url) - before).mean() <= 1.0
    finally:
        httpx.post(f"{server.url}/v1/unmerge_lora_weights", json={}, timeout=120)
        httpx.post(f"{server.url}/v1/set_lora", json={"lora_nickname": []}, timeout=60)


def test_profiling_window_over_http(server):
    url = f"{server.url}/start_profile"
    assert httpx.post(url, json={}, timeout=60).status_code == 401  # no X-Admin-Key
    wrong = httpx.post(url, json={}, headers={"X-Admin-Key": "guess"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_key"
    admin = {"X-Admin-Key": ADMIN_KEY}
    bad = httpx.post(url, json={"steps": "3:1"}, headers=admin, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps", bad.text
    assert httpx.post(url, json={"stages": ["render"]}, headers=admin, timeout=60).status_code == 400
    started = httpx.post(url, json={"steps": "0:1"}, headers=admin, timeout=60)
    assert started.status_code == 200 and started.json()["steps"] == [0, 1], started.text
    again = httpx.post(url, json={}, headers=admin, timeout=60)
    assert again.status_code == 400 and again.json()["error"]["param"] == "profile"
    image(server.url)
    stopped = httpx.post(f"{server.url}/stop_profile", headers=admin, timeout=60)
    assert stopped.status_code == 200, stopped.text
    (trace,) = [Path(p) for p in stopped.json()["traces"]]
    assert trace.name == "000-steps-0-1.rank0.json" and '"step 0"' in trace.read_text()
    after = httpx.post(f"{server.url}/stop_profile", headers=admin, timeout=60).json()
    assert after == {"profiling": False, "traces": []}
