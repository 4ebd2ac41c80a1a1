"""The HTTP API: OpenAI-compatible routes over the scheduler. HTTP only: no model code runs in this process.

The routes live in routes/ by area (images, videos, LoRA, admin); errors.py answers every failure in OpenAI's
shape; state.py holds what the routes share and the one path a request takes to the scheduler and back.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ditserve.server.errors import install_error_handlers
from ditserve.server.middleware import BearerAuth, BodyLimit
from ditserve.server.routes import admin, images, lora, videos
from ditserve.server.state import ServerSettings, ServerState

__all__ = ["ServerSettings", "create_app"]


def create_app(settings: ServerSettings) -> FastAPI:
    """The app for these settings. Building it starts nothing: the worker starts with the app's lifespan."""
    from ditserve import __version__

    server = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="ditserve", version=__version__, lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    for routes in (images, videos, lora, admin):
        app.include_router(routes.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    return app
