"""POST /v1/images/edits for real: `ditserve serve` with a tiny Qwen-Image-Edit-2509 folder answers OpenAI's client
(multipart `image`) and a JSON body (`images` as b64_json) with the image the Engine makes in-process for the same
request and input; too many images are refused naming the field."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from ditserve import Engine
from ditserve.server.launch import start_server

EXTRA = {"num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory):
    from ditserve.tiny.qwenimage import make_tiny_qwenimage_edit_folder

    return make_tiny_qwenimage_edit_folder(tmp_path_factory.mktemp("tiny-qwenimage-edit-server"))


def test_edits_return_the_engines_image(tiny_edit, tmp_path):
    from openai import OpenAI

    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    server = start_server(str(tiny_edit), "--served-model-name", "tiny-edit", log_path=str(tmp_path / "log"))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        response = client.images.edit(
            image=("in.png", png.getvalue(), "image/png"),
            prompt="make it red",
            size="48x32",
            response_format="b64_json",
            extra_body=EXTRA,
        )
        assert response.size == "48x32"
        served = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB")
        body = {"prompt": "make it red", "size": "48x32", **EXTRA}
        as_json = httpx.post(
            f"{server.url}/v1/images/edits",
            json={**body, "images": [{"b64_json": base64.b64encode(png.getvalue()).decode()}]},
            timeout=120,
        )
        assert as_json.status_code == 200, as_json.text
        from_json = Image.open(io.BytesIO(base64.b64decode(as_json.json()["data"][0]["b64_json"]))).convert("RGB")
        too_many = httpx.post(
            f"{server.url}/v1/images/edits",
            json={**body, "images": [{"b64_json": base64.b64encode(png.getvalue()).decode()}] * 4},
        )
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "images", too_many.text
        remote = httpx.post(
            f"{server.url}/v1/images/edits", json={**body, "images": [{"url": "http://example.com/a.png"}]}
        )
        assert remote.status_code == 400 and remote.json()["error"]["param"] == "images"
    finally:
        server.stop()
    local = Engine.from_pretrained(str(tiny_edit)).generate(
        "make it red", images=[Image.fromarray(pixels)], width=48, height=32, **EXTRA
    )
    assert served.size == (48, 32) and np.asarray(local.images[0]).std() > 5
    assert np.array_equal(np.asarray(served), np.asarray(local.images[0]))
    assert np.array_equal(np.asarray(from_json), np.asarray(local.images[0]))
