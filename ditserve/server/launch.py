"""Start `ditserve serve` as a child process on a free loopback port and wait until it is ready.

Used by the tests and by scripts that benchmark a server they start themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from ditserve.engine.distributed import free_port


@dataclass
class RunningServer:
    proc: subprocess.Popen
    url: str
    log_path: str
    headers: dict = field(default_factory=dict)  # the API key's header, when the server has one

    def info(self) -> dict:
        return httpx.get(f"{self.url}/server_info", headers=self.headers, timeout=10).json()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 180) -> RunningServer:
        """Return once /health/ready answers 200; RuntimeError (the log in it) if the server exits or takes longer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health/ready", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self.log()}")

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
    """`python -m ditserve serve --model MODEL --port <free> ARGS...`, logging to log_path; ready once
    /health/ready answers 200 (asked with the API key of --api-key or DITSERVE_API_KEY, when there is one)."""
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    key = args[args.index("--api-key") + 1] if "--api-key" in args else full_env.get("DITSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ditserve", "serve", "--model", model, "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = RunningServer(proc, f"http://127.0.0.1:{port}", log_path, headers)
    return server.wait_ready(ready_timeout) if wait_ready else server
