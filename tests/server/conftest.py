"""Real server processes for the server tests: started once per test module on a free port, driven over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300  # model load on a busy 2-core CI box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics: 'name{labels}' -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def run_server(
    argv: list[str], log: Path, api_key: str | None = None, env: dict | None = None
) -> Iterator[RunningServer]:
    """Runs `python <argv> --port P` and waits for /health; stops it (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *argv, "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log, api_key)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode} at start-up:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_config(path: Path, **fields) -> Path:
    path.write_text(json.dumps(fields))
    return path
