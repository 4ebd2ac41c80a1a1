"""What operators and clients ask about the server itself: /v1/models, /health, /metrics, /server_info; and the
operator's profiling window, /start_profile and /stop_profile."""

from __future__ import annotations

import dataclasses
import hmac
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ditserve.server.errors import ERROR_RESPONSES, ApiError, require_json
from ditserve.server.schemas import StartProfileRequest
from ditserve.server.state import Server, ServerState

router = APIRouter()


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(server: Server):
    info = server.ready_info()
    return {
        "object": "list",
        "data": [
            {
                "id": server.served_name(info),
                "object": "model",
                "created": int(server.started),
                "owned_by": "ditserve",
                "backend": info.backend,
            }
        ],
    }


@router.get("/health")
async def health(server: Server):
    """The worker's state in a word: ok (idle) and busy answer 200; stalled (a batch without progress, or cancelled
    and not stopping), restarting, loading, failed, dead and stopping answer 503 with what it means."""
    status, message = server.scheduler.health()
    _set_gauges(server)
    body = {"status": status, "restarts": server.scheduler.total_restarts}
    if message is not None:
        body["message"] = server.redact(message)
    return JSONResponse(body, status_code=200 if status in ("ok", "busy") else 503)


@router.get("/health/live")
async def health_live(server: Server):
    """Liveness, for an orchestrator: 200 unless only a restart of the server can help (the model failed to load,
    or the worker's restart budget is spent). Loading, restarting and stalled are alive: the supervisor is at it.
    Needs no API key, and says nothing more."""
    state = server.scheduler.state
    alive = state not in ("failed", "dead")
    return JSONResponse({"status": "alive" if alive else state}, status_code=200 if alive else 503)


@router.get("/health/ready")
async def health_ready(server: Server):
    """Readiness: 200 while a request sent now would be taken and started in turn (ok or busy, the queue not full);
    503 otherwise, with the reason."""
    scheduler = server.scheduler
    status, message = scheduler.health()
    if status in ("ok", "busy") and len(scheduler.queue) >= scheduler.config.max_queue:
        status, message = "queue_full", "the queue is full"
    ready = status in ("ok", "busy")
    body = {"status": "ready" if ready else status}
    if message is not None:
        body["message"] = server.redact(message)
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics_route(server: Server):
    _set_gauges(server)
    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")


def _set_gauges(server: ServerState) -> None:
    scheduler, metrics = server.scheduler, server.metrics
    metrics.queue_length.set(len(scheduler.queue))
    metrics.running.set(len(scheduler.running))
    metrics.worker_up.set(1 if scheduler.state == "ready" else 0)
    server.jobs.sweep()
    for status, count in server.jobs.counts().items():
        metrics.video_jobs_stored.labels(status).set(count)
    metrics.video_store_bytes.set(server.jobs.bytes_used)


@router.get("/server_info")
async def server_info(server: Server):
    from ditserve import __version__

    scheduler, settings = server.scheduler, server.settings
    info = scheduler.info
    cfg = settings.scheduler
    return {
        "version": __version__,
        "state": scheduler.state,
        "model": None if info is None else {**dataclasses.asdict(info), "name": server.served_name(info)},
        "worker_pid": scheduler.worker_pid,
        "worker_restarts": scheduler.total_restarts,
        "queue_length": len(scheduler.queue),
        "running": len(scheduler.running),
        "completed": scheduler.completed,
        "max_queue": cfg.max_queue,
        "max_batch_size": cfg.max_batch_size,
        "request_timeout": cfg.request_timeout,
        "cancel_grace": cfg.cancel_grace,
        "max_restarts": cfg.max_restarts,
        "limits": None if info is None else dataclasses.asdict(server.limits(info)),
        "cost": None if scheduler.cost is None else scheduler.cost.to_dict(),
        "auth": settings.api_key is not None,
        "max_body_bytes": settings.max_body_bytes,
        "video_jobs": {
            **dataclasses.asdict(server.jobs.limits),
            "jobs": len(server.jobs.jobs),
            "bytes": server.jobs.bytes_used,
            "timeout": settings.video_timeout,
        },
        "uptime_s": round(time.time() - server.started, 1),
    }


# ---- profiling (docs/profiling.md): operator routes behind --admin-key ----------------------------------------------
def require_admin(request: Request) -> None:
    """The operator routes answer only to `X-Admin-Key: <--admin-key>`; with no admin key they are off (403)."""
    key = request.app.state.server.settings.admin_key
    if key is None:
        raise ApiError(
            403, "profiling is off on this server: start it with --admin-key", "permission_error", None, "admin_off"
        )
    given = request.headers.get("x-admin-key", "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(
            401,
            "missing or wrong admin key; send it as 'X-Admin-Key: <key>'",
            "invalid_request_error",
            None,
            "invalid_admin_key",
        )


@router.post("/start_profile", responses=ERROR_RESPONSES, dependencies=[Depends(require_admin), Depends(require_json)])
async def start_profile(request: Request, body: StartProfileRequest, server: Server):
    """Trace every request from now until POST /stop_profile: torch.profiler traces (Chrome/Perfetto JSON) of the
    chosen stages or steps, written in the server's output folder. Queued behind the requests accepted before it."""
    out_dir = server.profile_dir / time.strftime("%Y%m%d-%H%M%S")
    settings = {"stages": body.stages, "steps": body.steps, "record_shapes": body.record_shapes}
    # The operator holds the admin key and reads the traces on this machine: the answers give full paths.
    return await server.control(request, "start_profile", {"out_dir": str(out_dir), **settings})


@router.post("/stop_profile", responses=ERROR_RESPONSES, dependencies=[Depends(require_admin)])
async def stop_profile(request: Request, server: Server):
    """End the profile; the paths of the traces written since /start_profile (one per request and window)."""
    return await server.control(request, "stop_profile", {})
