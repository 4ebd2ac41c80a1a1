"""Every error the server answers, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, and the one
translation of each failure into its status, type and code.

400 for a bad request (naming the field), 401 without the API key, 404 for an unknown id, 413 for a body over the
limit, 429 when the queue is full (with Retry-After), 499 when the client went away, 500 when the model failed on a
request, 503 while the model loads or after the worker died, 504 past the request timeout.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.engine.scheduler import QueueFull, RequestFailed, Unavailable
from ditserve.server.schemas import ErrorResponse, InvalidRequest

# The error answers every route may give, for the OpenAPI schema.
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}
# RequestFailed's kinds → HTTP status ("invalid" is a 400 of its own, naming the field).
_FAILURE_STATUS = {"timeout": 504, "worker_died": 503, "cancelled": 499, "out_of_memory": 500, "error": 500}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


# What can end a request that was handed to the scheduler, besides its result.
SCHEDULER_FAILURES = (QueueFull, Unavailable, RequestFailed, ClientGone)


def failure_error(e: Exception) -> tuple[str, ApiError]:
    """A request that did not complete (one of SCHEDULER_FAILURES) as (the outcome the metrics count it under, the
    error to answer)."""
    if isinstance(e, QueueFull):
        error = ApiError(429, str(e), "rate_limit_error", None, "queue_full", {"Retry-After": str(e.retry_after)})
        return "queue_full", error
    if isinstance(e, Unavailable):
        return "unavailable", ApiError(503, str(e), "server_error", None, "unavailable")
    if isinstance(e, RequestFailed):
        if e.kind == "invalid":
            return e.kind, ApiError(400, str(e), "invalid_request_error", e.param, "invalid_value")
        return e.kind, ApiError(_FAILURE_STATUS.get(e.kind, 500), str(e), "server_error", None, e.kind)
    if isinstance(e, ClientGone):
        error = ApiError(499, "the client disconnected", "invalid_request_error", None, "cancelled")
        return "client_disconnected", error
    raise TypeError(f"not a scheduler failure: {e!r}")


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _count_invalid(request: Request) -> None:
    route = request.scope.get("route")
    path = getattr(route, "path", "")
    if path.startswith("/v1/") and request.method == "POST":  # known routes only: bounded label values
        request.app.state.server.metrics.requests.labels(path.removeprefix("/v1/"), "invalid").inc()


async def _api_error(request: Request, e: ApiError):
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers or None)


async def _invalid(request: Request, e: InvalidRequest):
    _count_invalid(request)
    message = f"{e.param}: {e.message}" if e.param else e.message
    return error_response(e.status, message, "invalid_request_error", e.param, e.code)


async def _validation(request: Request, e: RequestValidationError):
    _count_invalid(request)
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return error_response(
            400, f"the body is not valid JSON: {detail}", "invalid_request_error", None, "invalid_json"
        )
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header", "form")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(400, message, "invalid_request_error", param, "invalid_value")


async def _http(request: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code)
    return error_response(e.status_code, str(e.detail), "invalid_request_error", None, code)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(InvalidRequest, _invalid)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
