"""The one table from the scheduler's failures to HTTP answers, and the routes' shared request path."""

from __future__ import annotations

import pytest

from ditserve.engine.scheduler import QueueFull, RequestFailed, Unavailable
from ditserve.server.errors import ClientGone, failure_error


@pytest.mark.parametrize(
    "failure, outcome, status, type_, code",
    [
        (RequestFailed("timeout", "too slow"), "timeout", 504, "server_error", "timeout"),
        (RequestFailed("worker_died", "gone"), "worker_died", 503, "server_error", "worker_died"),
        (RequestFailed("cancelled", "cancelled"), "cancelled", 499, "server_error", "cancelled"),
        (RequestFailed("out_of_memory", "oom"), "out_of_memory", 500, "server_error", "out_of_memory"),
        (RequestFailed("error", "boom"), "error", 500, "server_error", "error"),
        (RequestFailed("something new", "?"), "something new", 500, "server_error", "something new"),
        (Unavailable("loading"), "unavailable", 503, "server_error", "unavailable"),
        (ClientGone(), "client_disconnected", 499, "invalid_request_error", "cancelled"),
    ],
)
def test_each_failure_has_one_answer(failure, outcome, status, type_, code):
    counted, error = failure_error(failure)
    assert (counted, error.status, error.type, error.code, error.param) == (outcome, status, type_, code, None)
    assert error.headers == {}


def test_a_full_queue_says_when_to_retry():
    counted, error = failure_error(QueueFull(7))
    assert (counted, error.status, error.type, error.code) == ("queue_full", 429, "rate_limit_error", "queue_full")
    assert error.headers == {"Retry-After": "7"} and "retry in about 7 s" in error.message


def test_an_invalid_operation_names_its_field():
    counted, error = failure_error(RequestFailed("invalid", "strength: must be finite", param="strength"))
    assert (counted, error.status, error.type, error.code) == ("invalid", 400, "invalid_request_error", "invalid_value")
    assert error.param == "strength" and error.message == "strength: must be finite"


def test_other_exceptions_are_not_translated():
    with pytest.raises(TypeError):
        failure_error(ValueError("not from the scheduler"))
