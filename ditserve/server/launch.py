"""Start `ditserve serve` as a child process on a free loopback port and wait until it is ready.

Used by the tests and by scripts that benchmark a server they start themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from ditserve.engine.distributed import free_port


@dataclass
class RunningServer:
    proc: subprocess.Popen
    url: str
    log_path: str

    def info(self) -> dict:
        return httpx.get(f"{self.url}/server_info", timeout=10).json()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(
    model: str,
    *args: str,
    env: dict | None = None,
    log_path: str,
    ready_timeout: float = 180,
    wait_ready: bool = True,
) -> RunningServer:
    """`python -m ditserve serve --model MODEL --port <free> ARGS...`, logging to log_path."""
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ditserve", "serve", "--model", model, "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = RunningServer(proc, f"http://127.0.0.1:{port}", log_path)
    if not wait_ready:
        return server
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the server was not ready within {ready_timeout} s:\n{server.log()}")
