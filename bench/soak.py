"""Soak and overload of the app as ``make run`` starts it (nginx + gunicorn), on loopback only.

    PYTHONPATH=. .venv/bin/python bench/soak.py --model models/2.0.0                 # 10 min at saturation
    PYTHONPATH=. .venv/bin/python bench/soak.py --model models/2.0.0 --overload      # p99 at 2x saturation

Soak: every ``--every`` seconds (30) it prints the window's requests/s, errors, p50/p99, the resident
memory of every server process (supervisor, nginx, gunicorn, workers) and their open file descriptors.
Overload: first at saturation (the concurrency the server admits), then at twice that; the accepted
requests' p99 at 2x must stay within 4x the p50 at saturation, the rest shed at once with 503 (a shed
client retries after BACKOFF seconds, as a client that honours Retry-After would, only sooner).
Load: real 400 px fundus JPEGs from the shared data (generated ones if absent), one in eight a 12 MP
phone photo. Bounded in count and time; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aisight.artifact import DEFAULT_MODEL_DIR  # noqa: E402  (the bundled model)
from bench.model_step import model_dir_arg  # noqa: E402
from bench.serve import DEFAULT_DATA, app_server, drive, gate_accepts, multipart, phone_photo, real_photos  # noqa: E402

BACKOFF = 0.25


def mixed_bodies(data: Path) -> tuple[list[bytes], str]:
    """Real 400 px photos with one 12 MP phone photo in every eight bodies."""
    real, source = real_photos(data, 28)
    phones = [p for p in (phone_photo(real[i], seed=i) for i in range(4)) if gate_accepts(p)]
    bodies = []
    for i, jpeg in enumerate(real):
        bodies.append(multipart(jpeg))
        if i % 7 == 6 and phones:
            bodies.append(multipart(phones[i % len(phones)]))
    return bodies, f"{source}; {len(bodies) - len(real)} of {len(bodies)} are 12 MP phone photos"


def processes(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def open_fds(pgid: int) -> int:
    total = 0
    for pid in processes(pgid):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def soak(server, bodies: list[bytes], concurrency: int, minutes: float, every: float) -> list[dict]:
    rows = []
    end = time.perf_counter() + minutes * 60
    print(f"{'t (s)':>6} {'req/s':>7} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7} {'fds':>5}  statuses",
          flush=True)
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        window = min(every, end - time.perf_counter())
        secs, lat, statuses, _ = drive(server.port, bodies, concurrency, 10**9, window)
        errors = sum(n for k, n in statuses.items() if k != "200")
        row = {"t": round(time.perf_counter() - t0), "rps": sum(statuses.values()) / secs, "errors": errors,
               "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "rss_mb": server.rss_mb(),
               "fds": open_fds(server.proc.pid), "statuses": statuses}
        rows.append(row)
        print(f"{row['t']:>6} {row['rps']:>7.1f} {errors:>6} {row['p50_ms']:>7.0f} {row['p99_ms']:>7.0f} "
              f"{row['rss_mb']:>7.0f} {row['fds']:>5}  {statuses}", flush=True)
    return rows


def overload(server, bodies: list[bytes], admit: int, seconds: float) -> dict:
    out = {}
    for name, conc in (("saturation", admit), ("2x saturation", 2 * admit)):
        drive(server.port, bodies, conc, 2 * conc, 30)  # warm at this level
        secs, lat, statuses, _ = drive(server.port, bodies, conc, 10**9, seconds, backoff=BACKOFF)
        out[name] = {"concurrency": conc, "rps_ok": len(lat) / secs, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                     "statuses": statuses}
        print(f"{name:>14}: {conc} clients, {out[name]['rps_ok']:.1f} answered/s, p50 {out[name]['p50_ms']:.0f} ms, "
              f"p99 {out[name]['p99_ms']:.0f} ms, {statuses}", flush=True)
    ratio = out["2x saturation"]["p99_ms"] / out["saturation"]["p50_ms"]
    out["p99_at_2x_over_p50_at_saturation"] = ratio
    print(f"p99 at 2x saturation / p50 at saturation = {ratio:.2f} (target <= 4)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model artifact folder (default: the bundled one)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="fundus-eye4 folder (manifest.csv)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=30.0, help="seconds per printed window")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--queue", type=int, default=4, help="AISIGHT_QUEUE_MAX")
    ap.add_argument("--overload", action="store_true", help="saturation vs 2x saturation instead of the soak")
    ap.add_argument("--seconds", type=float, default=60.0, help="with --overload: seconds per level")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)

    model_dir = model_dir_arg(args.model)
    bodies, source = mixed_bodies(Path(args.data))
    workdir = Path(tempfile.mkdtemp(prefix="aisight-soak-"))
    server = app_server(model_dir, workdir, args.workers, args.threads,
                        precision=os.environ.get("AISIGHT_PRECISION", "auto"),
                        extra={"AISIGHT_QUEUE_MAX": str(args.queue)})
    print(f"{source}\nserver: {server.name}, logs in {workdir}", flush=True)
    server.start()
    try:
        ready = server.readyz()
        print(f"ready in {server.cold_start_s:.1f}s; {ready.get('model')} on {ready.get('device')}, "
              f"backend {ready.get('backend')}", flush=True)
        if args.overload:
            result = overload(server, bodies, args.workers * (args.threads + args.queue), args.seconds)
        else:
            result = {"windows": soak(server, bodies, args.concurrency, args.minutes, args.every)}
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
