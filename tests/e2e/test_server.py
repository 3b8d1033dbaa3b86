"""The real gunicorn server (as ``make run`` starts it) over real HTTP."""

from __future__ import annotations

import http.client
import json
import urllib.parse
import uuid

import pytest

from tests.conftest import fundus_jpeg

pytestmark = pytest.mark.e2e


def multipart(data: bytes, field: str = "image", filename: str = "photo.jpg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(url: str, method: str = "GET", path: str = "/", body: bytes | None = None, headers=None):
    """One HTTP exchange; returns (status, headers, body). Tolerates a server that stops reading early."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) before reading the whole body: its answer is still there
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post(url: str, data: bytes, path: str = "/api/v1/predict", **kw):
    body, ctype = multipart(data, **kw)
    return request(url, "POST", path, body, {"Content-Type": ctype})


def test_probes(server):
    assert server.alive_before_ready, "/healthz should answer while the model is still loading"
    assert request(server.url, path="/healthz")[0] == 200
    status, _, body = request(server.url, path="/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    print(f"server ready {server.ready_seconds:.1f}s after start")


def test_predict_over_http(server):
    status, headers, body = post(server.url, fundus_jpeg(diseased=True, seed=5))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["label"] in ("healthy", "diseased") and 0 <= answer["probability"] <= 1
    assert set(answer["model"]) >= {"name", "version"}


def test_form_post_over_http(server):
    status, headers, body = post(server.url, fundus_jpeg(seed=6), path="/")
    assert status == 200 and b"data-prediction=" in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_oversized_body_is_413_and_the_server_keeps_serving(server):
    status, _, body = post(server.url, b"\xff\xd8\xff" + b"\0" * (22 * 1024 * 1024))
    assert status == 413, body[:200]
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert post(server.url, fundus_jpeg())[0] == 200


@pytest.mark.parametrize(
    "data,status",
    [(b"", 400), (b"%PDF-1.4 not an image", 415), (fundus_jpeg()[:3000], 400)],
    ids=["empty", "pdf", "truncated"],
)
def test_bad_input_over_http(server, data, status):
    code, _, body = post(server.url, data)
    assert code == status and "error" in json.loads(body)
    assert request(server.url, path="/healthz")[0] == 200


def test_metrics_over_http(server):
    post(server.url, fundus_jpeg(seed=8))
    status, headers, body = request(server.url, path="/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        'aisight_http_requests_total{method="POST",route="/api/v1/predict",status="200"}',
        'aisight_http_request_duration_seconds_bucket{le="0.5",route="/api/v1/predict"}',
        "aisight_predictions_total{label=",
        "aisight_model_load_seconds ",
    ):
        assert name in text, name


def test_gate_and_explanation_over_http(server):
    import base64
    import io

    from PIL import Image

    from bench.gate_thresholds import generated_negatives

    buf = io.BytesIO()
    generated_negatives()["generated.screenshot_dark"].save(buf, format="PNG")
    status, _, body = post(server.url, buf.getvalue())
    err = json.loads(body)["error"]
    assert status == 422 and err["code"] == "not_fundus" and "fundus camera" in err["hint"]
    status, _, body = post(server.url, fundus_jpeg(seed=9), path="/api/v1/predict?explain=1")
    png = base64.b64decode(json.loads(body)["explanation"]["png_base64"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == (400, 400)


def test_the_result_page_answers_before_the_rest_arrives(server):
    """Through the front proxy too, the verdict reaches the browser in a part of its own: the photo and its
    heatmap, made after it is sent, come later (a proxy that held the page would deliver them together)."""
    import socket
    import time

    body, ctype = multipart(fundus_jpeg(diseased=True, size=2400, seed=58))
    u = urllib.parse.urlsplit(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        received, at_answer = b"", None
        while True:
            piece = sock.recv(1 << 20)
            if not piece:
                break
            received += piece
            if at_answer is None and b"<!--aisight:answer-end-->" in received:
                at_answer = (time.perf_counter(), b"</html>" in received, b'class="heatmap"' in received)
        done = time.perf_counter()
    assert received.startswith(b"HTTP/1.1 200") and b"data-prediction" in received and b'class="heatmap"' in received
    assert at_answer is not None and not at_answer[1] and not at_answer[2], "the answer came with the whole page"
    print(f"the rest of the page came {1000 * (done - at_answer[0]):.0f} ms after the answer")
