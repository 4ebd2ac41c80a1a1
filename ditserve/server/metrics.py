"""Prometheus metrics of one server, in a registry of its own (no process-global state, so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("ditserve_queue_length", "Requests waiting in the queue", registry=r)
        self.running = Gauge("ditserve_running_requests", "Requests the worker is running now", registry=r)
        self.requests = Counter(
            "ditserve_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.latency = Histogram(
            "ditserve_request_latency_seconds",
            "Admission to answer",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ditserve_queue_time_seconds", "Time spent waiting in the queue", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.stage_time = Histogram(
            "ditserve_stage_seconds",
            "Pipeline stage time of each request (requests of one batch share it)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ditserve_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.peak_memory = Gauge("ditserve_peak_memory_mb", "Largest peak device memory of any request", registry=r)
        # Per device, as the worker reported after its last completed request (the worker holds the devices).
        self.device_allocated = Gauge(
            "ditserve_device_memory_allocated_mb",
            "Device memory allocated after the last request",
            ["device"],
            registry=r,
        )
        self.device_reserved = Gauge(
            "ditserve_device_memory_reserved_mb",
            "Device memory held by the caching allocator after the last request",
            ["device"],
            registry=r,
        )
        self.device_peak = Gauge(
            "ditserve_device_memory_peak_mb",
            "Peak device memory allocated during the last request",
            ["device"],
            registry=r,
        )
        self.worker_up = Gauge("ditserve_worker_up", "1 while the worker is ready", registry=r)
        # Why requests were turned away before they ran: a limit (max_pixels, max_steps, max_frames,
        # max_request_seconds), queue_full, unavailable, auth, host, body_too_large, unsupported_media_type,
        # read_timeout (a client stalled sending its request), too_many_connections.
        self.refusals = Counter(
            "ditserve_refusals", "Requests refused before they ran, by reason", ["reason"], registry=r
        )
        # Video jobs: how each ended (completed, failed, cancelled: deleted before it finished), and the jobs in the
        # store now by status (queued, in_progress, completed, failed) with the bytes of their files.
        self.video_jobs = Counter("ditserve_video_jobs", "Video jobs finished, by outcome", ["status"], registry=r)
        self.video_jobs_stored = Gauge(
            "ditserve_video_jobs_stored", "Video jobs in the job store, by status", ["status"], registry=r
        )
        self.video_store_bytes = Gauge("ditserve_video_store_bytes", "Bytes of the stored videos", registry=r)
        self.restarts = Counter(
            "ditserve_worker_restarts", "Worker processes replaced, by reason (deadline, died)", ["reason"], registry=r
        )

    def observe_result(self, endpoint: str, latency_s: float, queue_s: float, timings: dict, peak: float | None):
        self.requests.labels(endpoint, "success").inc()
        self.latency.labels(endpoint).observe(latency_s)
        self.queue_time.observe(queue_s)
        for stage in ("encode", "prepare", "denoise", "decode"):
            if isinstance(timings.get(stage), int | float):
                self.stage_time.labels(stage).observe(timings[stage])
        if peak is not None and peak > (self.peak_memory._value.get() or 0):
            self.peak_memory.set(peak)
        memory = timings.get("memory") if isinstance(timings, dict) else None
        for rank in (memory or {}).get("ranks") or []:
            device = str(rank.get("device"))
            for gauge, key in (
                (self.device_allocated, "allocated_mb"),
                (self.device_reserved, "reserved_mb"),
                (self.device_peak, "peak_allocated_mb"),
            ):
                if isinstance(rank.get(key), int | float):
                    gauge.labels(device).set(rank[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)
