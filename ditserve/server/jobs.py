"""Asynchronous jobs (videos): a job is created at once, runs through the scheduler, and is polled by id.

The store keeps jobs in memory (bounded: the oldest finished jobs are forgotten first) and their content as files
under its own directory, named by job id only, so no request can name a path. `run` drives one job through any
`submit` coroutine (the scheduler's), so the lifecycle is the same whatever model produces the content.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

_JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
FINISHED = ("completed", "failed", "cancelled")


@dataclass
class Job:
    id: str
    model: str
    prompt: str
    size: str | None = None
    seconds: str | None = None
    status: str = "queued"  # queued → in_progress → completed | failed | cancelled
    progress: int = 0  # percent
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    error: dict | None = None
    content_type: str = "video/mp4"
    task: asyncio.Task | None = None

    def public(self) -> dict:
        """The job as OpenAI's API shows a video object."""
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "size": self.size,
            "seconds": self.seconds,
            "prompt": self.prompt,
            "error": self.error,
        }


class JobStore:
    def __init__(self, directory: Path, max_jobs: int = 1000):
        self.directory = directory
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def create(self, model: str, prompt: str, size: str | None = None, seconds: str | None = None) -> Job:
        self._evict()
        job = Job(id=f"video_{uuid.uuid4().hex}", model=model, prompt=prompt, size=size, seconds=seconds)
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        if not _JOB_ID.match(job_id):
            return None
        return self.jobs.get(job_id)

    def list(self, limit: int = 20, after: str | None = None) -> list[Job]:
        jobs = list(reversed(self.jobs.values()))  # newest first, as OpenAI lists
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit]

    def content_path(self, job: Job) -> Path:
        return self.directory / f"{job.id}.mp4"  # the id matched _JOB_ID: no separator, no '..'

    def cancel(self, job: Job) -> None:
        """Cancel a queued or running job; a finished job is deleted with its content."""
        if job.status in FINISHED:
            self.jobs.pop(job.id, None)
            with contextlib.suppress(FileNotFoundError):
                self.content_path(job).unlink()
            return
        if job.task is not None:
            job.task.cancel()
        job.status = "cancelled"
        job.completed_at = int(time.time())

    async def run(self, job: Job, submit: Callable[[Callable[[float], None]], Awaitable[bytes]]) -> None:
        """Run `submit(on_progress) -> content bytes` for the job and record its outcome."""

        def on_progress(fraction: float) -> None:
            job.status = "in_progress"
            job.progress = max(job.progress, min(99, int(fraction * 100)))

        try:
            content = await submit(on_progress)
        except asyncio.CancelledError:
            job.status = "cancelled"
            job.completed_at = int(time.time())
            return
        except Exception as e:  # noqa: BLE001 - the job records why it failed; the server lives on
            job.status = "failed"
            job.error = {"code": getattr(e, "kind", "error"), "message": str(e)}
            job.completed_at = int(time.time())
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.content_path(job).write_bytes(content)
        job.status, job.progress, job.completed_at = "completed", 100, int(time.time())

    def _evict(self) -> None:
        while len(self.jobs) >= self.max_jobs:
            finished = next((j for j in self.jobs.values() if j.status in FINISHED), None)
            if finished is None:
                return
            self.cancel(finished)
