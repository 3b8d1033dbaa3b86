"""How much sooner the result page shows its answer than the whole page (with photo and heatmap) arrives.

Starts the app as ``make run`` does, posts real photos to the upload form one at a time, and for each
records when the answer's part of the page had arrived (the ``aisight:answer-end`` marker) and when the
whole page had. The difference is what the person no longer waits for before seeing the verdict: the
display photo and the Grad-CAM heatmap (aisight.streaming).

    PYTHONPATH=. .venv/bin/python bench/answer_first.py --model models/2.0.0 [--photos 24]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aisight.artifact import DEFAULT_MODEL_DIR  # noqa: E402  (the bundled model)
from bench.serve import BOUNDARY, DEFAULT_DATA, HOST, app_server, multipart, real_photos  # noqa: E402

MARK = b"<!--aisight:answer-end-->"


def one(port: int, body: bytes) -> tuple[float, float]:
    """(seconds to the answer's part, seconds to the whole page) for one upload to the form."""
    head = (f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((HOST, port), timeout=60) as sock:
        t0 = time.perf_counter()
        sock.sendall(head + body)
        got, answer = b"", None
        while piece := sock.recv(1 << 16):
            got += piece
            if answer is None and MARK in got:
                answer = time.perf_counter() - t0
        total = time.perf_counter() - t0
    if not got.startswith(b"HTTP/1.1 200") or answer is None:
        raise RuntimeError(f"unexpected answer: {got[:200]!r}")
    return answer, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--photos", type=int, default=24)
    args = ap.parse_args(argv)
    photos, source = real_photos(DEFAULT_DATA, args.photos)
    server = app_server(Path(args.model), Path(tempfile.mkdtemp(prefix="aisight-answer-first-")), 2, 4, "auto")
    server.start()
    try:
        for body in photos[:3]:  # warm-up: the first pages also wait for Grad-CAM's model to load
            one(server.port, multipart(body))
        times = [one(server.port, multipart(body)) for body in photos]
    finally:
        server.stop()
    answer = [a for a, _ in times]
    total = [t for _, t in times]
    rest = [t - a for a, t in times]
    print(f"{len(times)} uploads of {source}, one at a time, to the result page (the app as make run starts it):")
    print(f"- answer shown after: median {1000 * statistics.median(answer):.0f} ms, "
          f"max {1000 * max(answer):.0f} ms")
    print(f"- whole page (photo + heatmap) after: median {1000 * statistics.median(total):.0f} ms, "
          f"max {1000 * max(total):.0f} ms")
    print(f"- the answer comes {1000 * statistics.median(rest):.0f} ms (median) before the rest")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
