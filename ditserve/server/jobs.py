"""Asynchronous jobs (videos): a job is created at once, runs through the scheduler, and is polled by id.

The store keeps jobs in memory and their content as files under its own directory, named by job id only: an id is
`video_` and 128 random bits (it cannot be guessed), and only ids of that shape are looked up, so no request can name
a path. The store is bounded three ways, checked whenever a job is created, finishes, or is looked up:
- age: a finished job (and its file) is forgotten `ttl_s` seconds after it finished (`expires_at`);
- size: the files of completed jobs hold at most `max_bytes` together; past it the oldest go first;
- count: at most `max_jobs` jobs; past it the oldest finished go first (unfinished jobs are bounded by the queue).
Files outlive nothing: a deleted, expired or evicted job's file is removed with it, and files no job names (left by a
server that stopped) are removed when a store opens and when it closes.

`run` records one job's outcome from any awaitable that returns the content (the scheduler's result), so the
lifecycle is the same whatever model produces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

_JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
_CONTENT_FILE = re.compile(r"^video_[0-9a-f]{32}\.mp4$")
FINISHED = ("completed", "failed")
STATUSES = ("queued", "in_progress", "completed", "failed")  # as OpenAI's video object has them


class ContentTooLarge(Exception):
    """A finished video larger than the whole store."""


@dataclass
class StoreLimits:
    max_jobs: int = 1000
    max_bytes: int = 10 * 2**30  # the completed videos' files together
    ttl_s: float = 3600.0  # seconds a finished job stays after it finished


@dataclass
class Job:
    id: str
    model: str
    prompt: str
    size: str | None = None
    seconds: str | None = None
    status: str = "queued"  # queued → in_progress → completed | failed
    progress: int = 0  # percent: the denoising steps done, 100 once the file is written
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None  # {"code", "message", "param"} of a failed job
    content_type: str = "video/mp4"
    content_bytes: int = 0
    task: asyncio.Task | None = None  # the task awaiting the job's content
    request_id: str | None = None  # its request in the scheduler

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
            "expires_at": self.expires_at,
            "size": self.size,
            "seconds": self.seconds,
            "prompt": self.prompt,
            "error": self.error,
        }

    def advance(self, fraction: float) -> None:
        """The worker took the job (0.0) or finished a share of its denoising steps; 100 waits for the file."""
        if self.status == "queued":
            self.status = "in_progress"
        self.progress = max(self.progress, min(99, int(fraction * 100)))


class JobStore:
    def __init__(
        self,
        directory: Path,
        limits: StoreLimits | None = None,
        on_finish: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.directory = directory
        self.limits = limits or StoreLimits()
        self.on_finish = on_finish  # called with each job's outcome: completed, failed or cancelled
        self.clock = clock
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # oldest first
        self.remove_stray_files()

    # ---- lookup -------------------------------------------------------------------------------------------------
    def create(self, model: str, prompt: str, size: str | None = None, seconds: str | None = None) -> Job:
        self.sweep()
        while len(self.jobs) >= self.limits.max_jobs:
            oldest = next((j for j in self.jobs.values() if j.status in FINISHED), None)
            if oldest is None:
                break
            self._forget(oldest)
        job = Job(
            id=f"video_{secrets.token_hex(16)}",
            model=model,
            prompt=prompt,
            size=size,
            seconds=seconds,
            created_at=int(self.clock()),
        )
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        if not _JOB_ID.match(job_id):
            return None
        self.sweep()
        return self.jobs.get(job_id)

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> list[Job]:
        """Jobs newest first ("desc", as OpenAI lists) or oldest first, from the one after `after`."""
        self.sweep()
        jobs = list(self.jobs.values())
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit]

    def content_path(self, job: Job) -> Path:
        return self.directory / f"{job.id}.mp4"  # the id matched _JOB_ID: no separator, no '..'

    @property
    def bytes_used(self) -> int:
        return sum(j.content_bytes for j in self.jobs.values())

    def counts(self) -> dict[str, int]:
        """Jobs in the store by status."""
        counts = dict.fromkeys(STATUSES, 0)
        for job in self.jobs.values():
            counts[job.status] += 1
        return counts

    # ---- deleting ------------------------------------------------------------------------------------------------
    def delete(self, job: Job) -> None:
        """Forget a job and delete its file; a queued or running one is cancelled (its task, and so its request in
        the scheduler, which the worker stops at its next denoising step)."""
        if job.status not in FINISHED:
            if job.task is not None:
                job.task.cancel()
            self._finished("cancelled")
        self._forget(job)

    def discard(self, job: Job) -> None:
        """Forget a job that never ran (its request could not be queued)."""
        self._forget(job)

    def sweep(self) -> None:
        """Forget what is past its age, then the oldest completed jobs while their files exceed the size limit."""
        now = self.clock()
        for job in [j for j in self.jobs.values() if j.expires_at is not None and j.expires_at <= now]:
            self._forget(job)
        if self.bytes_used > self.limits.max_bytes:
            for job in [j for j in self.jobs.values() if j.status == "completed"]:
                self._forget(job)
                if self.bytes_used <= self.limits.max_bytes:
                    break

    def close(self) -> None:
        """Cancel what is unfinished and delete every file (the jobs die with the server)."""
        for job in list(self.jobs.values()):
            if job.task is not None and not job.task.done():
                job.task.cancel()
        self.jobs.clear()
        self.remove_stray_files()

    def remove_stray_files(self) -> None:
        """Delete content files no job of this store names."""
        if not self.directory.is_dir():
            return
        known = {f"{job_id}.mp4" for job_id in self.jobs}
        for path in self.directory.iterdir():
            if _CONTENT_FILE.match(path.name) and path.name not in known:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _forget(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        with contextlib.suppress(FileNotFoundError):
            self.content_path(job).unlink()

    # ---- running --------------------------------------------------------------------------------------------------
    async def run(
        self, job: Job, content: Callable[[], Awaitable[bytes]], describe: Callable[[Exception], dict]
    ) -> None:
        """Await the job's content, write it, and record the outcome; `describe` turns a failure into the job's
        error ({"code", "message", "param"}). Cancelling the task (delete) leaves the job to `delete`."""
        try:
            data = await content()
            if len(data) > self.limits.max_bytes:
                raise ContentTooLarge(
                    f"the video is {len(data)} bytes, more than this server keeps for all videos together "
                    f"({self.limits.max_bytes} bytes, --video-store-mb)"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self.content_path(job).write_bytes, data)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the job records why it failed; the server lives on
            self._finish(job, "failed", error=describe(e))
            return
        if job.id not in self.jobs:  # deleted while the file was written
            with contextlib.suppress(FileNotFoundError):
                self.content_path(job).unlink()
            return
        job.content_bytes = len(data)
        self._finish(job, "completed")
        self.sweep()  # the new file may push the oldest past the size limit

    def _finish(self, job: Job, status: str, error: dict | None = None) -> None:
        now = int(self.clock())
        job.status, job.error, job.completed_at = status, error, now
        job.expires_at = int(now + self.limits.ttl_s)
        if status == "completed":
            job.progress = 100
        self._finished(status)

    def _finished(self, status: str) -> None:
        if self.on_finish is not None:
            self.on_finish(status)
