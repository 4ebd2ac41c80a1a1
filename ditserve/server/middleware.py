"""ASGI middleware: the body size limit and the API key, checked before a request reaches a route."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.server.errors import error_response


class BodyLimit:
    """Refuse bodies over the limit (by Content-Length, and by counting a streamed body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

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
                    raise StarletteHTTPException(413, self._message())
            return message

        return await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes"

    async def _refuse(self, scope, receive, send):
        response = error_response(413, self._message(), "invalid_request_error", None, "body_too_large")
        await response(scope, receive, send)


class BearerAuth:
    """/v1/* needs `Authorization: Bearer <key>` when a key is set."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope.get("headers", [])).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
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
