"""A real server, started the way ``make run`` starts it, and real Chromium to drive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("AISIGHT_CHROMIUM", "/usr/bin/chromium"))
# Without these Chromium keeps calling home on a closed network and slows everything down.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READY_TIMEOUT = 240  # TensorFlow's import and the model load on a busy 2-core machine


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    log_file: Any
    # Probes seen while starting: /healthz answering while /readyz still said 503.
    alive_before_ready: bool = False
    ready_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_of(url: str, timeout: float = 5) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def start_server(model_dir: Path, log: Path, **env: str) -> Server:
    """Run the server as ``make run`` does (``python -m aisight.serve``: nginx + gunicorn) on a free port."""
    port = free_port()
    full_env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PYTHONPATH": str(ROOT),
        "AISIGHT_MODEL_DIR": str(model_dir),
        "WEB_CONCURRENCY": "1",
        **env,
    }
    out = open(log, "wb")  # kept as a test artifact; closed in stop_server
    proc = subprocess.Popen(
        [sys.executable, "-m", "aisight.serve"],
        cwd=ROOT,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log, out)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{server.log_tail()}")
        if time.monotonic() - t0 > READY_TIMEOUT:
            stop_server(server)
            pytest.fail(f"server not ready after {READY_TIMEOUT}s:\n{server.log_tail()}")
        ready = status_of(server.url + "/readyz")
        if ready == 200:
            break
        if ready == 503 and status_of(server.url + "/healthz") == 200:
            server.alive_before_ready = True
        time.sleep(0.2)
    server.ready_seconds = time.monotonic() - t0
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)  # the supervisor's graceful shutdown
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
    server.log_file.close()


@pytest.fixture(scope="session")
def server(model_dir, artifacts_dir):
    """One gunicorn server for the e2e tests, serving the test model."""
    s = start_server(model_dir, artifacts_dir / "e2e-server.log", AISIGHT_RATE_LIMIT="off")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium through Playwright, or a skip that says how to get it."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}: run `make browser` (or set AISIGHT_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)  # present but broken: fail
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()
