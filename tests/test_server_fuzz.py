"""Fuzzing every endpoint from the server's own OpenAPI schema (schemathesis on hypothesis), against a live server.

Valid and invalid inputs alike (`mode: all`): the server must never answer 5xx to anything a client sends, and
must still be healthy afterwards. Valid image requests are made cheap (2 steps, 32x32, one image) before they
are sent, so that fuzzing tests the HTTP layer without spending minutes on the model; everything else is as
generated. The example count is modest so the file stays well under a minute or two on two cores.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from ditserve.server.launch import start_server

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server(tiny_dev, tmp_path_factory):
    s = start_server(
        str(tiny_dev),
        "--max-batch-size",
        "4",
        "--max-body-mb",
        "1",
        log_path=str(tmp_path_factory.mktemp("fuzz-logs") / "server.log"),
    )
    yield s
    s.stop()


def _schema():
    """The OpenAPI schema as the app publishes it (building the app starts nothing; the worker starts on serve)."""
    from ditserve.server.app import ServerSettings, create_app

    return schemathesis.openapi.from_dict(create_app(ServerSettings()).openapi())


SCHEMA = _schema()
OPERATIONS = {op.ok().label: op.ok() for op in SCHEMA.get_all_operations()}


def _cheapen(body) -> None:
    """Shrink valid-but-expensive image settings; leave invalid values alone, they are what is being tested."""
    if not isinstance(body, dict):
        return
    steps = body.get("num_inference_steps")
    if steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps > 2):
        body["num_inference_steps"] = 2
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        body["n"] = 1
    for side in ("width", "height"):
        value = body.get(side)
        if isinstance(value, int) and not isinstance(value, bool) and value > 64:
            body[side] = 32
    if "size" not in body or body.get("size") in (None, "auto") or _large_size(body.get("size")):
        body["size"] = "32x32"


def _large_size(size) -> bool:
    if not isinstance(size, str) or "x" not in size:
        return False
    w, _, h = size.partition("x")
    return w.strip().isdigit() and h.strip().isdigit() and (int(w) > 64 or int(h) > 64)


def test_every_endpoint_is_fuzzed():
    paths = {label.split(" ", 1)[1] for label in OPERATIONS}
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/videos", "/v1/videos/{video_id}"} <= paths
    assert {"/v1/models", "/health", "/metrics", "/server_info", "/files/images/{name}"} <= paths


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_input_gives_a_server_error(fuzz_server, label, mode):
    operation = OPERATIONS[label]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        if case.path == "/v1/images/generations":
            _cheapen(case.body)
        response = case.call(base_url=fuzz_server.url, timeout=120)
        assert response.status_code < 500, f"{label} → {response.status_code}: {response.text[:500]}"

    try:
        check()
    except Unsatisfiable:
        # Only for negative mode on operations whose inputs are all free strings: the schema admits every value,
        # so there is no malformed input to generate (the positive run covers them).
        assert mode is GenerationMode.NEGATIVE
        pytest.skip(f"{label}: the schema allows every input, nothing malformed to send")


def test_still_healthy_after_fuzzing(fuzz_server):
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    r = httpx.post(
        f"{fuzz_server.url}/v1/images/generations",
        json={"prompt": "after the storm", "size": "32x32", "num_inference_steps": 2},
        timeout=120,
    )
    assert r.status_code == 200
