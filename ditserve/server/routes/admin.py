"""What operators and clients ask about the server itself: /v1/models, /health, /metrics, /server_info."""

from __future__ import annotations

import dataclasses
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ditserve.server.errors import ERROR_RESPONSES
from ditserve.server.state import Server

router = APIRouter()


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(server: Server):
    info = server.ready_info()
    return {
        "object": "list",
        "data": [
            {"id": server.served_name(info), "object": "model", "created": int(server.started), "owned_by": "ditserve"}
        ],
    }


@router.get("/health")
async def health(server: Server):
    scheduler = server.scheduler
    up = scheduler.state == "ready"
    server.metrics.worker_up.set(1 if up else 0)
    body = {"status": "ok" if up else scheduler.state}
    if not up:
        body["message"] = scheduler.describe_unavailable()
    return JSONResponse(body, status_code=200 if up else 503)


@router.get("/metrics")
async def metrics_route(server: Server):
    scheduler, metrics = server.scheduler, server.metrics
    metrics.queue_length.set(len(scheduler.queue))
    metrics.running.set(len(scheduler.running))
    metrics.worker_up.set(1 if scheduler.state == "ready" else 0)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/server_info")
async def server_info(server: Server):
    from ditserve import __version__

    scheduler, settings = server.scheduler, server.settings
    info = scheduler.info
    cfg = settings.scheduler
    return {
        "version": __version__,
        "state": scheduler.state,
        "model": None if info is None else dataclasses.asdict(info),
        "worker_pid": scheduler.worker_pid,
        "queue_length": len(scheduler.queue),
        "running": len(scheduler.running),
        "completed": scheduler.completed,
        "max_queue": cfg.max_queue,
        "max_batch_size": cfg.max_batch_size,
        "request_timeout": cfg.request_timeout,
        "auth": settings.api_key is not None,
        "max_body_bytes": settings.max_body_bytes,
        "uptime_s": round(time.time() - server.started, 1),
    }
