"""aisight.wire: gunicorn's responses leave in as few writes as their body allows, and still parse as HTTP."""

from __future__ import annotations

import http.client
import io
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from gunicorn.config import Config

from aisight.wire import OneWriteResponse

ROOT = Path(__file__).resolve().parents[2]


class Req:
    """What a gunicorn Response reads of its request."""

    version = (1, 1)
    method = "GET"

    def should_close(self) -> bool:
        return False


class CountingSocket:
    """A socket end that records each sendall as one write."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.writes = sock, []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.sock.sendall(data)


def serve(headers: list[tuple[str, str]], parts: list[bytes], method: str = "GET"):
    """Answer one request through OneWriteResponse; return (writes, parsed response, body)."""
    a, b = socket.socketpair()
    with a, b:
        out = CountingSocket(a)
        req = Req()
        req.method = method
        resp = OneWriteResponse(req, out, Config())
        resp.start_response("200 OK", headers)
        for part in parts:
            resp.write(part)
        resp.close()
        a.shutdown(socket.SHUT_WR)
        raw = b"".join(iter(lambda: b.recv(65536), b""))
    parsed = http.client.HTTPResponse(FakeSock(raw), method=method)
    parsed.begin()
    return out.writes, parsed, parsed.read()


class FakeSock:
    """Hands http.client the bytes that crossed the socket."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.raw)


def test_a_json_answer_leaves_in_one_write():
    body = b'{"label": "diseased", "probability": 0.97}'
    writes, parsed, got = serve([("Content-Type", "application/json"), ("Content-Length", str(len(body)))], [body])
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(body)
    assert parsed.status == 200 and parsed.getheader("Content-Type") == "application/json" and got == body


def test_a_streamed_page_sends_its_head_with_the_first_part():
    parts = [b"<p>verdict</p>", b"<img>heatmap</img>"]
    writes, parsed, got = serve([("Content-Type", "text/html")], parts)
    assert len(writes) == 3  # head + first chunk, second chunk, the last (empty) chunk
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nE\r\n<p>verdict</p>\r\n")
    assert parsed.getheader("Transfer-Encoding") == "chunked" and got == b"".join(parts)


@pytest.mark.parametrize("method, headers", [
    ("GET", [("Content-Length", "0")]),  # an empty body: the head still goes out, once
    ("HEAD", [("Content-Length", "12")]),  # no body allowed: the head alone
])
def test_an_answer_without_body_bytes_still_sends_its_head(method, headers):
    writes, parsed, got = serve(headers, [b"dropped-body"] if method == "HEAD" else [], method=method)
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n")
    assert parsed.status == 200 and got == b""


def test_an_empty_chunked_answer_is_head_and_last_chunk_in_one_write():
    writes, parsed, got = serve([("Content-Type", "text/plain")], [])
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n0\r\n\r\n") and got == b""


def test_gunicorn_conf_installs_it_before_the_workers_fork():
    code = ("import runpy, gunicorn.http.wsgi as w; runpy.run_path('gunicorn.conf.py'); "
            "from aisight.wire import OneWriteResponse; print(w.Response is OneWriteResponse)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
