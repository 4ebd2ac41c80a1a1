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
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (or set DITSERVE_API_KEY)"
    )
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=4,
        help="images per batched forward: compatible waiting requests are run together up to this many images",
    )
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request, queue included")
    serve.add_argument("--output-dir", default=None, help="where url images are kept (default: a temporary folder)")
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted")
    serve.add_argument("--max-prompt-chars", type=int, default=8192)
    serve.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder's name)")
    serve.add_argument("--url-ttl", type=float, default=3600.0, help="seconds a url image stays downloadable")
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--lora-dir", default=None, help="folder POST /v1/set_lora may load LoRA files from (default: none)"
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
    from ditserve.server.app import ServerSettings, create_app

    for name in (
        "max_queue",
        "max_batch_size",
        "request_timeout",
        "max_body_mb",
        "max_prompt_chars",
        "port",
        "url_ttl",
    ):
        _check_positive(name.replace("_", "-"), getattr(ns, name))
    engine_args = engine_args_from(ns)  # validates every engine flag before anything starts
    resolve_model(engine_args.model, engine_args.load_format)  # a wrong --model fails here, not in the worker
    if ns.output_dir is not None and os.path.exists(ns.output_dir) and not os.path.isdir(ns.output_dir):
        raise UsageError(f"ditserve serve: --output-dir {ns.output_dir!r} exists and is not a folder")
    from ditserve.engine.worker import STARTUP_LORA_KEY

    worker_args = engine_args.to_dict()  # every field, so every engine flag of `generate` reaches the worker
    startup_lora = lora_request(ns)  # checks the --lora-* flags (paths exist, counts agree) before starting
    if startup_lora:
        worker_args[STARTUP_LORA_KEY] = startup_lora
    if ns.lora_dir is not None and not os.path.isdir(ns.lora_dir):
        raise UsageError(f"ditserve serve: --lora-dir {ns.lora_dir!r} is not a folder")
    settings = ServerSettings(
        engine_args=worker_args,
        scheduler=SchedulerConfig(
            max_queue=ns.max_queue, max_batch_size=ns.max_batch_size, request_timeout=ns.request_timeout
        ),
        api_key=ns.api_key or os.environ.get("DITSERVE_API_KEY") or None,
        output_dir=ns.output_dir,
        max_body_bytes=int(ns.max_body_mb * 2**20),
        max_prompt_chars=ns.max_prompt_chars,
        url_ttl_s=ns.url_ttl,
        served_model_name=ns.served_model_name,
        lora_dir=ns.lora_dir,
    )
    if ns.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(
            f"ditserve: warning: serving on {ns.host} without --api-key: anyone who can reach it can use it", flush=True
        )
    app = create_app(settings)
    print(f"ditserve: serving on http://{ns.host}:{ns.port} (model loads in the background; see /health)", flush=True)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, waits for in-flight requests, then runs our shutdown,
    # which answers every queued request before stopping the worker.
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, access_log=ns.log_level == "debug")
    return 0


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from ditserve.server.bench import print_report, run_bench_serve

    report = asyncio.run(run_bench_serve(ns))
    print_report(report, ns.json)
    return 0 if report["failed"] == 0 else 1
