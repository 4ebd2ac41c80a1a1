"""`ditserve serve` and `ditserve bench-serve`: parser setup and handlers (registered by ditserve.cli)."""

from __future__ import annotations

import argparse
import os

from ditserve.cli_common import UsageError, add_engine_flags, add_lora_flags, engine_args_from, lora_request


def register_server_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health/live (or set DITSERVE_API_KEY)",
    )
    serve.add_argument(
        "--admin-key",
        default=None,
        help="key for the operator routes POST /start_profile and /stop_profile, sent as 'X-Admin-Key: KEY' (or set "
        "DITSERVE_ADMIN_KEY); without one those routes answer 403",
    )
    serve.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header names answered, '*' for any (default: the --host address and localhost)",
    )
    serve.add_argument(
        "--public-url",
        default=None,
        help="base URL of `url` image answers, e.g. https://images.example.com (default: relative urls)",
    )
    serve.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve /docs and /openapi.json (behind the API key when there is one)",
    )
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=4,
        help="images per batched forward: compatible waiting requests are run together up to this many images",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds per request, queue included; past it the request is cancelled (504)",
    )
    serve.add_argument(
        "--cancel-grace",
        type=float,
        default=3.0,
        help="seconds a cancelled batch may go on (inside a long step) before its worker is killed and restarted",
    )
    serve.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="worker restarts allowed within an hour; one more and the server answers 503 until restarted",
    )
    serve.add_argument(
        "--output-dir", default=None, help="where url images and videos are kept (default: a temporary folder)"
    )
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted")
    serve.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's headers"
    )
    serve.add_argument("--body-timeout", type=float, default=60.0, help="seconds a client has to send a request's body")
    serve.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at once (each waiting request holds one); one more is answered 503 and closed",
    )
    serve.add_argument("--max-prompt-chars", type=int, default=8192)
    limits = serve.add_argument_group("request limits (a request over one gets 400 naming the field)")
    limits.add_argument(
        "--max-pixels", type=int, default=None, help="width × height of one image (default: CPU 1024², CUDA 4096²)"
    )
    limits.add_argument("--max-frames", type=int, default=None, help="frames of one clip (default: CPU 33, CUDA 1025)")
    limits.add_argument("--max-steps", type=int, default=None, help="denoising steps (default 200)")
    limits.add_argument(
        "--max-request-seconds",
        type=float,
        default=None,
        help="the longest estimated run time of one request (default: --request-timeout; 0: no estimate)",
    )
    serve.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder's name)")
    serve.add_argument("--url-ttl", type=float, default=3600.0, help="seconds a url image stays downloadable")
    videos = serve.add_argument_group("video jobs (POST /v1/videos)")
    videos.add_argument(
        "--video-timeout",
        type=float,
        default=3600.0,
        help="seconds a video job may take from admission, queue included (default 3600; /v1/videos/sync: "
        "--request-timeout)",
    )
    videos.add_argument(
        "--video-store-mb",
        type=float,
        default=10240.0,
        help="MB the finished videos' files may take together; past it the oldest are deleted (default 10240)",
    )
    videos.add_argument(
        "--video-ttl", type=float, default=3600.0, help="seconds a finished video job stays (default 3600)"
    )
    videos.add_argument(
        "--max-video-jobs",
        type=int,
        default=1000,
        help="jobs kept; past it the oldest finished are forgotten (default 1000)",
    )
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--lora-dir", default=None, help="folder POST /v1/set_lora may load LoRA files from (default: none)"
    )
    serve.add_argument(
        "--max-lora-strength", type=float, default=10.0, help="largest |strength| set_lora and merge accept"
    )
    add_lora_flags(serve)  # LoRAs active from the first request
    serve.set_defaults(handler=cmd_serve)

    bench = sub.add_parser("bench-serve", help="load-test a running server: throughput and latency percentiles")
    from ditserve.server.bench import add_bench_flags

    add_bench_flags(bench)
    bench.set_defaults(handler=cmd_bench_serve)


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise UsageError(f"ditserve serve: --{name} must be positive, got {value}")


def cmd_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from ditserve.engine.scheduler import SchedulerConfig
    from ditserve.loader.folder import resolve_model
    from ditserve.server.admission import RequestLimits
    from ditserve.server.app import ServerSettings, create_app
    from ditserve.server.connections import ConnectionLimits, guarded_protocol
    from ditserve.server.jobs import StoreLimits

    for name in (
        "max_queue",
        "max_batch_size",
        "request_timeout",
        "max_body_mb",
        "max_prompt_chars",
        "port",
        "url_ttl",
        "max_lora_strength",
        "cancel_grace",
        "header_timeout",
        "body_timeout",
        "max_connections",
        "video_timeout",
        "video_store_mb",
        "video_ttl",
        "max_video_jobs",
    ):
        _check_positive(name.replace("_", "-"), getattr(ns, name))
    for name in ("max_pixels", "max_frames", "max_steps"):
        if getattr(ns, name) is not None:
            _check_positive(name.replace("_", "-"), getattr(ns, name))
    if ns.max_request_seconds is not None and ns.max_request_seconds < 0:
        raise UsageError(f"ditserve serve: --max-request-seconds must be 0 (off) or more, got {ns.max_request_seconds}")
    if ns.max_restarts < 0:
        raise UsageError(f"ditserve serve: --max-restarts must be 0 or more, got {ns.max_restarts}")
    engine_args = engine_args_from(ns)  # validates every engine flag before anything starts
    # A wrong --model (or --backend) fails here, not in the worker.
    source = resolve_model(engine_args.model, engine_args.load_format, engine_args.backend)
    print(f"ditserve: {source.describe_backend()}", flush=True)
    if ns.output_dir is not None and os.path.exists(ns.output_dir) and not os.path.isdir(ns.output_dir):
        raise UsageError(f"ditserve serve: --output-dir {ns.output_dir!r} exists and is not a folder")
    from ditserve.engine.worker import MAX_LORA_STRENGTH_KEY, STARTUP_LORA_KEY

    worker_args = engine_args.to_dict()  # every field, so every engine flag of `generate` reaches the worker
    startup_lora = lora_request(ns)  # checks the --lora-* flags (paths exist, counts agree) before starting
    if startup_lora:
        worker_args[STARTUP_LORA_KEY] = startup_lora
    worker_args[MAX_LORA_STRENGTH_KEY] = ns.max_lora_strength
    if ns.lora_dir is not None and not os.path.isdir(ns.lora_dir):
        raise UsageError(f"ditserve serve: --lora-dir {ns.lora_dir!r} is not a folder")
    if ns.public_url is not None and not ns.public_url.startswith(("http://", "https://")):
        raise UsageError(f"ditserve serve: --public-url {ns.public_url!r} must start with http:// or https://")
    allowed_hosts = allowed_hosts_from(ns.allowed_hosts, ns.host)
    settings = ServerSettings(
        engine_args=worker_args,
        scheduler=SchedulerConfig(
            max_queue=ns.max_queue,
            max_batch_size=ns.max_batch_size,
            request_timeout=ns.request_timeout,
            cancel_grace=ns.cancel_grace,
            max_restarts=ns.max_restarts,
        ),
        api_key=ns.api_key or os.environ.get("DITSERVE_API_KEY") or None,
        admin_key=ns.admin_key or os.environ.get("DITSERVE_ADMIN_KEY") or None,
        output_dir=ns.output_dir,
        max_body_bytes=int(ns.max_body_mb * 2**20),
        max_prompt_chars=ns.max_prompt_chars,
        url_ttl_s=ns.url_ttl,
        served_model_name=ns.served_model_name,
        lora_dir=ns.lora_dir,
        allowed_hosts=allowed_hosts,
        public_url=ns.public_url,
        docs=ns.docs,
        limits=RequestLimits(ns.max_pixels, ns.max_frames, ns.max_steps, ns.max_request_seconds),
        video_store=StoreLimits(
            max_jobs=ns.max_video_jobs, max_bytes=int(ns.video_store_mb * 2**20), ttl_s=ns.video_ttl
        ),
        video_timeout=ns.video_timeout,
    )
    if ns.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(
            f"ditserve: warning: serving on {ns.host} without --api-key: anyone who can reach it can use it", flush=True
        )
    if ns.host in ("0.0.0.0", "::") and ns.allowed_hosts is None:
        print(
            f"ditserve: warning: bound to {ns.host}, but only Host headers naming localhost are answered; "
            "pass --allowed-hosts with this machine's names (or '*')",
            flush=True,
        )
    app = create_app(settings)
    print(f"ditserve: serving on http://{ns.host}:{ns.port} (model loads in the background; see /health)", flush=True)
    limits = ConnectionLimits(ns.header_timeout, ns.body_timeout, ns.max_connections)
    metrics = app.state.server.metrics
    protocol = guarded_protocol(limits, on_refusal=lambda reason: metrics.refusals.labels(reason).inc())
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, waits for in-flight requests, then runs our shutdown,
    # which answers every queued request before stopping the worker.
    uvicorn.run(
        app,
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        access_log=ns.log_level == "debug",
        http=protocol,
        timeout_keep_alive=5,
    )
    return 0


def allowed_hosts_from(flag: str | None, bind: str) -> tuple[str, ...]:
    """--allowed-hosts as names; by default the bind address and localhost's names."""
    from ditserve.server.state import LOOPBACK_HOSTS

    if flag is None:
        return tuple(dict.fromkeys([bind.strip("[]").lower(), *LOOPBACK_HOSTS]))
    names = tuple(h.strip().lower() for h in flag.split(",") if h.strip())
    if not names:
        raise UsageError("ditserve serve: --allowed-hosts names no host; give names, or '*' for any")
    return names


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from ditserve.server.bench import print_report, run_bench_serve

    report = asyncio.run(run_bench_serve(ns))
    print_report(report, ns.json)
    return 0 if report["failed"] == 0 else 1
