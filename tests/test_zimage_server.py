"""A second family behind the same server: `ditserve serve` with a tiny Z-Image folder answers the OpenAI client as
for FLUX.1, with the image the Engine makes in-process for the same request."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from ditserve import Engine
from ditserve.server.launch import start_server


def test_openai_client_gets_the_engines_image(tiny_zimage, tmp_path):
    from openai import OpenAI

    server = start_server(str(tiny_zimage), "--served-model-name", "tiny-zimage", log_path=str(tmp_path / "log"))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-zimage"]
        extra = {"num_inference_steps": 2, "seed": 5, "guidance_scale": 0.0}
        response = client.images.generate(
            prompt="a red fox", size="48x32", response_format="b64_json", extra_body=extra
        )
        served = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
        assert served.size == (48, 32) and served.format == "PNG"
    finally:
        server.stop()
    local = Engine.from_pretrained(str(tiny_zimage)).generate(
        "a red fox", width=48, height=32, num_inference_steps=2, seed=5, guidance_scale=0.0
    )
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(local.images[0]))
