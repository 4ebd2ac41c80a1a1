"""ASGI middleware, checked before a request reaches a route, outermost first: the Host header, the API key, the
body size limit. Each refusal is counted in the metrics by its reason."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.server.errors import error_response


class BodyLimit:
    """Refuse bodies over the limit (by Content-Length, and by counting a streamed body)."""

    def __init__(self, app, limit: int, metrics=None):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a streamed body: FastAPI passes an HTTPException through as is
                    _count(self.metrics, "body_too_large")
                    raise StarletteHTTPException(413, self._message())
            return message

        return await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes"

    async def _refuse(self, scope, receive, send):
        _count(self.metrics, "body_too_large")
        response = error_response(413, self._message(), "invalid_request_error", None, "body_too_large")
        await response(scope, receive, send)


class BearerAuth:
    """Every route needs `Authorization: Bearer <key>` when a key is set, but the liveness probe: an orchestrator
    must be able to tell a live server without holding its key, and that answer tells nothing else."""

    OPEN = ("/health/live",)

    def __init__(self, app, api_key: str, metrics=None):
        self.app, self.key, self.metrics = app, api_key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            header = dict(scope.get("headers", [])).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                _count(self.metrics, "auth")
                response = error_response(
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class AllowedHosts:
    """Answer only requests whose Host header names this server (`*` allows any). Without it, a web page elsewhere
    can reach a server on loopback by pointing its own name at 127.0.0.1 (DNS rebinding)."""

    def __init__(self, app, hosts: tuple[str, ...], metrics=None):
        self.app, self.metrics = app, metrics
        self.any = "*" in hosts
        self.hosts = {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.any:
            header = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            host = host_name(header)
            if host not in self.hosts:
                _count(self.metrics, "host")
                response = error_response(
                    400,
                    f"the Host header {header[:100]!r} does not name this server (its --allowed-hosts)",
                    "invalid_request_error",
                    None,
                    "invalid_host",
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The host of a Host header, lower case, without the port or an IPv6 address's brackets."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _count(metrics, reason: str) -> None:
    if metrics is not None:
        metrics.refusals.labels(reason).inc()
