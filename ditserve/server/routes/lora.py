"""The LoRA routes. Each operation is queued behind the requests already accepted, so every request runs with one
whole LoRA state."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from ditserve.server.errors import ERROR_RESPONSES, ApiError
from ditserve.server.schemas import MergeLoraRequest, SetLoraRequest, UnmergeLoraRequest
from ditserve.server.state import Server

router = APIRouter()


@router.post("/v1/set_lora", responses=ERROR_RESPONSES)
async def set_lora(request: Request, body: SetLoraRequest, server: Server):
    kwargs = body.model_dump()
    paths = kwargs["lora_path"]
    lora_dir = server.settings.lora_dir
    if isinstance(paths, list):
        kwargs["lora_path"] = [_lora_file(lora_dir, p) for p in paths]
    else:
        kwargs["lora_path"] = _lora_file(lora_dir, paths)
    return await server.control(request, "set_lora", kwargs)


@router.post("/v1/merge_lora_weights", responses=ERROR_RESPONSES)
async def merge_lora_weights(request: Request, body: MergeLoraRequest, server: Server):
    return await server.control(request, "merge_lora_weights", body.model_dump())


@router.post("/v1/unmerge_lora_weights", responses=ERROR_RESPONSES)
async def unmerge_lora_weights(request: Request, body: UnmergeLoraRequest, server: Server):
    return await server.control(request, "unmerge_lora_weights", body.model_dump())


@router.get("/v1/list_loras", responses=ERROR_RESPONSES)
async def list_loras(request: Request, server: Server):
    return await server.control(request, "list_loras", {})


def _lora_file(lora_dir: Path | None, path: str | None) -> str | None:
    """A path from the request, resolved inside --lora-dir; anything else is refused (nothing outside the
    configured folders is ever read on a client's word)."""
    if path is None:
        return None
    if lora_dir is None:
        raise ApiError(
            400, "this server loads no LoRA files: start it with --lora-dir", "invalid_request_error", "lora_path"
        )
    root = Path(lora_dir).resolve()
    resolved = None if "\x00" in path else (root / path).resolve()
    if resolved is None or not resolved.is_relative_to(root):
        raise ApiError(
            400, f"lora_path {path!r} is outside the server's LoRA folder", "invalid_request_error", "lora_path"
        )
    return str(resolved)
