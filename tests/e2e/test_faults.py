"""Faults an unlucky user or an attacker brings, against the server as ``make run`` starts it (nginx + gunicorn).

Slow clients, a 30 MB body written before reading, a killed worker, SIGTERM under load, overload, and a
client over its rate limit: each gets a clear answer, never a hang, a reset or a 500.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import pytest

from aisight.serve import find_nginx
from tests.conftest import fundus_jpeg, run_at_once
from tests.e2e.conftest import start_server, status_of, stop_server
from tests.e2e.test_server import multipart, post, request

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(find_nginx() is None, reason="nginx not installed: run `make nginx` (Debian's nginx-light)"),
]

PHOTO = fundus_jpeg(seed=3)


def _addr(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port


def raw_exchange(url: str, head: bytes, body_chunks, timeout: float = 60) -> bytes:
    """Write the request head and every body chunk before reading anything; return what comes back."""
    with socket.create_connection(_addr(url), timeout=timeout) as s:
        try:
            s.sendall(head)
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError) as exc:
            pytest.fail(f"the server broke the connection while the client was still sending: {exc!r}")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def gunicorn_workers(server) -> list[int]:
    masters = [p for p in children(server.proc.pid) if b"gunicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return children(masters[0]) if masters else []


def load(url: str, clients: int, stop: threading.Event, results: list, pause: float = 0.0) -> list[threading.Thread]:
    """Start ``clients`` threads posting photos until ``stop``; each outcome (status or exception) is appended."""

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status, headers, body = post(url, PHOTO)
                results.append((t0, status, headers, body))
            except Exception as exc:  # a reset or a refused connection: recorded, judged by the test
                results.append((t0, exc, {}, b""))
            time.sleep(pause)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def assert_clear_503(headers: dict, body: bytes) -> None:
    assert headers.get("Retry-After"), headers
    assert json.loads(body)["error"]["code"] in ("overloaded", "model_loading", "model_unavailable")


@pytest.fixture(scope="module")
def fault_server(model_dir, artifacts_dir):
    """Two workers with small queues, no rate limit: for killing a worker under load."""
    s = start_server(model_dir, artifacts_dir / "e2e-faults.log", WEB_CONCURRENCY="2", GUNICORN_THREADS="2",
                     AISIGHT_QUEUE_MAX="2", AISIGHT_RATE_LIMIT="off")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def tight_server(model_dir, artifacts_dir):
    """Admits one request at a time; rate limit 1/min with a burst of 2 per client, clients named by a
    trusted proxy's X-Forwarded-For."""
    s = start_server(model_dir, artifacts_dir / "e2e-tight.log", WEB_CONCURRENCY="1", GUNICORN_THREADS="1",
                     AISIGHT_QUEUE_MAX="0", AISIGHT_RATE_LIMIT="1r/m", AISIGHT_RATE_BURST="2",
                     AISIGHT_TRUSTED_PROXIES="127.0.0.1")
    yield s
    stop_server(s)


def test_slow_clients_do_not_stall_the_server(server):
    """24 clients trickling their headers and 8 trickling a body: probes and predictions still answer at once."""
    socks, stop = [], threading.Event()
    for i in range(32):
        s = socket.create_connection(_addr(server.url), timeout=30)
        if i < 24:
            s.sendall(b"P")  # "POST /api/v1/predict ..." one byte at a time
        else:
            s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n")
        socks.append(s)

    def trickle() -> None:
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.sendall(b"O")
                except OSError:
                    pass

    t = threading.Thread(target=trickle)
    t.start()
    try:
        time.sleep(2.0)
        t0 = time.monotonic()
        assert status_of(server.url + "/readyz", timeout=5) == 200
        status, _, body = post(server.url, PHOTO)
        took = time.monotonic() - t0
        assert status == 200, body[:300]
        assert took < 5.0, f"a probe and a prediction took {took:.1f}s beside 32 slow clients"
        print(f"32 slow clients: probe + prediction in {took:.2f}s")
    finally:
        stop.set()
        t.join()
        for s in socks:
            s.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_30mb_upload_written_before_reading_gets_413(server, framing):
    body, ctype = multipart(b"\0" * (30 * 1024 * 1024))
    mib = 1024 * 1024
    pieces = [body[i:i + mib] for i in range(0, len(body), mib)]
    head = f"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
    if framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n\r\n"
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n"
    answer = raw_exchange(server.url, head.encode(), pieces)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    payload = rest.split(b"\r\n\r\n", 1)[1]
    assert json.loads(payload)["error"]["code"] == "payload_too_large"
    assert status_of(server.url + "/readyz") == 200


def test_killed_worker_costs_only_what_it_held(fault_server):
    results: list = []
    stop = threading.Event()
    threads = load(fault_server.url, 6, stop, results)
    time.sleep(2.0)
    workers = gunicorn_workers(fault_server)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(6.0)
    stop.set()
    for t in threads:
        t.join(90)
    outcomes = Counter(r[1] if isinstance(r[1], int) else type(r[1]).__name__ for r in results)
    print(f"SIGKILL of a worker under 6 clients: {dict(outcomes)}")
    assert set(outcomes) <= {200, 503}, outcomes  # no reset, no 502, no 500
    for _, status, headers, body in results:
        if status == 503:
            assert_clear_503(headers, body)
    # The killed worker held at most its threads + queue (2 + 2); everything else was answered.
    assert outcomes[503] <= 4, outcomes
    assert outcomes[200] > 0 and any(r[0] > killed_at and r[1] == 200 for r in results)
    deadline = time.monotonic() + 120
    while len(gunicorn_workers(fault_server)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(gunicorn_workers(fault_server)) == 2, "gunicorn did not replace the killed worker"


def test_overload_is_shed_at_once_with_503(tight_server):
    big = fundus_jpeg(size=1600, seed=8)  # decoding it keeps the one admitted request busy a while
    outcomes: list = [None] * 12

    def one(i: int) -> None:
        body, ctype = multipart(big)
        t0 = time.monotonic()
        status, headers, payload = request(tight_server.url, "POST", "/api/v1/predict", body,
                                           {"Content-Type": ctype, "X-Forwarded-For": f"192.0.2.{i + 1}"})
        outcomes[i] = (status, headers, payload, time.monotonic() - t0)

    run_at_once(one, 12, timeout=60)
    statuses = Counter(o[0] for o in outcomes)
    print(f"12 at once against 1 admitted: {dict(statuses)}")
    assert set(statuses) <= {200, 503} and statuses[200] >= 1 and statuses[503] >= 1, statuses
    for status, headers, payload, took in outcomes:
        if status == 503:
            assert_clear_503(headers, payload)
            assert took < 2.0, f"a shed request waited {took:.1f}s"


def test_rate_limit_per_client(tight_server):
    def post_as(ip: str) -> tuple[int, dict, bytes]:
        body, ctype = multipart(PHOTO)
        return request(tight_server.url, "POST", "/api/v1/predict", body,
                       {"Content-Type": ctype, "X-Forwarded-For": ip})

    statuses = [post_as("198.51.100.7")[0] for _ in range(3)]
    assert statuses == [200, 200, 200], statuses  # one a minute plus a burst of two
    status, headers, body = post_as("198.51.100.7")
    assert status == 429 and headers.get("Retry-After"), (status, headers)
    assert json.loads(body)["error"]["code"] == "rate_limited"
    assert post_as("198.51.100.8")[0] == 200  # another client is not held back
    assert all(request(tight_server.url, path="/")[0] == 200 for _ in range(5))  # pages are not counted


def test_sigterm_under_load_loses_no_request(model_dir, artifacts_dir):
    """Readiness turns 503 at once; the load balancer (here: the clients) stops sending within a second;
    every request sent is answered 200; the server exits 0."""
    s = start_server(model_dir, artifacts_dir / "e2e-sigterm.log", AISIGHT_DRAIN_SECONDS="3",
                     AISIGHT_RATE_LIMIT="off")
    results: list = []
    stop = threading.Event()
    try:
        threads = load(s.url, 4, stop, results, pause=0.05)
        time.sleep(1.5)
        s.proc.send_signal(signal.SIGTERM)
        termed = time.monotonic()
        while status_of(s.url + "/readyz", timeout=2) != 503:
            assert time.monotonic() - termed < 2, "/readyz did not turn 503 after SIGTERM"
            time.sleep(0.05)
        time.sleep(1.0)  # the load balancer notices the failed probe and stops routing
        stop.set()
        for t in threads:
            t.join(60)
        assert s.proc.wait(60) == 0
    finally:
        stop.set()
        stop_server(s)
    statuses = Counter(r[1] if isinstance(r[1], int) else type(r[1]).__name__ for r in results)
    during = sum(1 for r in results if r[0] > termed and r[1] == 200)
    print(f"SIGTERM under load: {dict(statuses)}, {during} answered 200 after the signal")
    assert set(statuses) == {200}, statuses
    assert during > 0
