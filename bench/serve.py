"""Benchmark serving: the app (gunicorn, micro-batching) against the paper's way (bench/baseline_app.py).

In one run on one machine this starts both servers on free loopback ports, measures each one's cold
start (process start to /readyz 200), then drives them in turn with a bounded Python client
(threads + http.client, keep-alive, 127.0.0.1 only) at concurrency 1, 4 and 8, a fixed number of
requests per level and a time cap, for real 400x400 fundus JPEGs and for 12 MP phone photos (4000x3000
JPEGs made from the real photos: upscaled, with sensor-like noise, quality 90). It reports requests/s,
p50 and p99 latency and errors per server and level, and the app's speed-up at each level.

    PYTHONPATH=. .venv/bin/python bench/serve.py                 # the full comparison (``make bench``)
    PYTHONPATH=. .venv/bin/python bench/serve.py --grid 1x4,1x8,2x4,2x4:off --sizes 400   # workers x threads
    PYTHONPATH=. .venv/bin/python bench/serve.py --cold-start 3  # cold starts only

Without ``--model`` both servers serve a cached random-weight Xception with the paper's head (the
speed of the real model); ``--model models/2.0.0`` serves the bundled one. The model step alone is measured
by bench/model_step.py.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mixed import headline, mixed_set, model_peak  # noqa: E402
from bench.model_step import model_dir_arg  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("AISIGHT_DATA", ROOT.parent / "shared" / "data" / "fundus-eye4"))
HOST = "127.0.0.1"
ROUTE = "/api/v1/predict"
BOUNDARY = "aisightbenchboundary7f3a"
PHONE_SIZE = (4000, 3000)


# --- Photos -----------------------------------------------------------------------------------------


def gate_accepts(jpeg: bytes) -> bool:
    """Whether the app's fundus gate lets this photo through to the model (as aisight.web does)."""
    from aisight.gate import check_fundus
    from aisight.preprocess import open_image

    return check_fundus(open_image(jpeg), Image.open(io.BytesIO(jpeg)).size).ok


def real_photos(data: Path, n: int) -> tuple[list[bytes], str]:
    """``n`` real JPEGs from the data set (both labels, spread over it), or generated ones if it is absent.

    Only photos the app's gate accepts: one it refuses (422, about 1% of real photos) would measure the
    gate's false refusals, not serving.
    """
    manifest = data / "manifest.csv"
    if manifest.is_file():
        rows = list(csv.DictReader(manifest.open()))
        step = max(1, len(rows) // (2 * n))
        picked, refused = [], 0
        for r in rows[::step]:
            jpeg = (data / r["path"]).read_bytes()
            if gate_accepts(jpeg):
                picked.append(jpeg)
            else:
                refused += 1
            if len(picked) == n:
                break
        return picked, f"{len(picked)} real photos from {data} (gate-accepted; {refused} refused ones skipped)"
    print(f"real photos not found at {data}: using generated fundus images (training.synthetic)", file=sys.stderr)
    from training.synthetic import make_fundus

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        make_fundus(rng, diseased=bool(i % 2), size=400).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out, f"{n} generated 400x400 fundus images (real photos not found at {data})"


def phone_photo(jpeg: bytes, seed: int, size: tuple[int, int] = PHONE_SIZE) -> bytes:
    """A 12 MP phone-style JPEG from a fundus photo: centred on a dark 4:3 frame, upscaled, noisy, q90."""
    src = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = size
    side = min(w, h)
    frame = Image.new("RGB", size, (8, 8, 8))
    frame.paste(src.resize((side, side), Image.Resampling.BICUBIC), ((w - side) // 2, (h - side) // 2))
    rng = np.random.default_rng(seed)
    arr = np.asarray(frame, dtype=np.float32)
    # Sensor noise, so the JPEG is as large as a real phone photo's (2-3.5 MB), not a smooth upscale. Shot
    # noise grows with the signal, so the dark surround stays dark (as the app's gate expects of a fundus).
    noise = rng.standard_normal(arr.shape, dtype=np.float32) * (20 * np.sqrt(arr / 255))
    arr = np.clip(arr + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def multipart(jpeg: bytes) -> bytes:
    """A multipart/form-data body with the photo in the ``image`` field."""
    head = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()


# --- Servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process the bench started; ``cold_start_s`` is process start to the first /readyz 200."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    cwd: Path = ROOT
    # Wait after ready until every worker logged that its background start-up work is done (the Keras
    # model for Grad-CAM, the frozen graph), so the numbers are those of a server in its steady state.
    settle: int = 0  # how many workers to wait for; 0: do not wait
    proc: subprocess.Popen | None = None
    cold_start_s: float | None = None
    settled_s: float | None = None

    def start(self, timeout: float = 600.0) -> Server:
        log = self.log_path.open("wb")
        t0 = time.perf_counter()
        # A new session: stop() signals the server's whole process group (gunicorn and its workers).
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if _status(self.port, "/readyz") == 200:
                self.cold_start_s = time.perf_counter() - t0
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s; see {self.log_path}")
        if self.settle:
            texts = ["Grad-CAM "]  # "Grad-CAM ready on layer ..." or "Grad-CAM could not be prepared"
            freezes = self.env.get("AISIGHT_FREEZE", "background") == "background"
            if freezes and self.readyz().get("backend") == "tensorflow":
                texts.append("frozen graph ")  # "frozen graph in use ..." or "frozen graph not used ..."
            while time.perf_counter() < deadline:
                log = self.log_path.read_text(errors="replace")
                if all(log.count(text) >= self.settle for text in texts):
                    self.settled_s = time.perf_counter() - t0
                    break
                time.sleep(0.1)
        return self

    def readyz(self) -> dict:
        """The server's /readyz answer (JSON), or {} when it has none."""
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            conn.request("GET", "/readyz")
            body = json.loads(conn.getresponse().read() or b"{}")
            conn.close()
            return body if isinstance(body, dict) else {}
        except (OSError, ValueError):
            return {}

    def rss_mb(self) -> float:
        """Resident memory of the server's processes (its process group: gunicorn and its workers), MB."""
        if self.proc is None:
            return float("nan")
        total = 0
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.proc.pid:  # pgrp (the session leader's group: start_new_session)
                    total += int((status.parent / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        return total / 1e6

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _status(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def app_server(model_dir: Path, workdir: Path, workers: int, threads: int, precision: str = "float32",
               extra: dict[str, str] | None = None, root: Path = ROOT, backend: str = "auto") -> Server:
    """The app as ``make run`` starts it (nginx + gunicorn, aisight.serve) on a free port (from ``root``).

    The per-client rate limit is off: every bench request comes from 127.0.0.1. An older checkout without
    aisight/serve.py (``--before``) runs gunicorn alone, as it did then.
    """
    port = free_port()
    env = _env({
        "PYTHONPATH": str(root),
        "HOST": HOST, "PORT": str(port), "WEB_CONCURRENCY": str(workers), "GUNICORN_THREADS": str(threads),
        "AISIGHT_MODEL_DIR": str(model_dir), "AISIGHT_PRECISION": precision, "GUNICORN_LOG_LEVEL": "warning",
        "AISIGHT_BACKEND": backend, "AISIGHT_RATE_LIMIT": "off",
        **(extra or {}),
    })
    if (root / "aisight" / "serve.py").is_file():
        cmd = [sys.executable, "-m", "aisight.serve"]
    else:
        cmd = [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"]
    freeze = env.get("AISIGHT_FREEZE", "background")
    short = {"openvino": "ov ", "tensorflow": "tf "}.get(env["AISIGHT_BACKEND"], "")
    name = f"app {short}{precision} {workers}x{threads}" + ("" if freeze == "background" else f" freeze={freeze}")
    # (An older checkout from --before has no background work to wait for.)
    settle = workers if root == ROOT else 0
    return Server(name, cmd, env, port, workdir / f"{name.replace(' ', '-')}-{port}.log", cwd=root, settle=settle)


def baseline_server(model_dir: Path, workdir: Path) -> Server:
    """bench/baseline_app.py: Flask's threaded server, PIL resize, model.predict per request."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bench" / "baseline_app.py"), "--model", str(model_dir), "--port", str(port)]
    return Server("baseline", cmd, _env({}), port, workdir / f"baseline-{port}.log")


# --- Load -------------------------------------------------------------------------------------------


@dataclass
class Level:
    """One server at one concurrency with one kind of photo."""

    server: str
    photos: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    statuses: dict[str, int] = field(default_factory=dict)
    capped: bool = False
    steal_pct: float = float("nan")  # CPU time the hypervisor gave to other guests during the level


def drive(port: int, bodies: list[bytes], concurrency: int, n_requests: int, time_cap: float,
          backoff: float = 0.0) -> tuple:
    """Send ``n_requests`` (fewer if ``time_cap`` passes) from ``concurrency`` keep-alive clients.

    ``backoff``: seconds a client waits after an answer that is not 200 (a client that was shed and
    retries), so the shed requests themselves do not become the load.
    """
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    t_end = time.perf_counter() + time_cap
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=max(60.0, time_cap))
        while True:
            with lock:
                if issued[0] >= n_requests or time.perf_counter() > t_end:
                    break
                i = issued[0]
                issued[0] += 1
            body = bodies[(i * 7 + k) % len(bodies)]
            t = time.perf_counter()
            try:
                conn.request("POST", ROUTE, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                key = str(resp.status)
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                key = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=max(60.0, time_cap))
            dt = time.perf_counter() - t
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(dt)
            if key != "200" and backoff:
                time.sleep(backoff)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, statuses, issued[0] < n_requests


def measure(server: Server, photos: str, bodies: list[bytes], concurrency: int, n_requests: int,
            time_cap: float) -> Level:
    """Warm the server at this concurrency, then measure it."""
    drive(server.port, bodies, concurrency, 2 * concurrency, time_cap)
    steal0 = steal_seconds()
    seconds, lat, statuses, capped = drive(server.port, bodies, concurrency, n_requests, time_cap)
    steal1 = steal_seconds()
    done = sum(statuses.values())
    lv = Level(server.name, photos, concurrency, done, done - statuses.get("200", 0), seconds,
               statuses=statuses, capped=capped)
    if steal0 is not None and steal1 is not None and seconds:
        lv.steal_pct = 100 * (steal1 - steal0) / (seconds * (os.cpu_count() or 1))
    lv.rps = done / seconds if seconds else 0.0
    if lat:
        lv.p50_ms = 1000 * float(np.percentile(lat, 50))
        lv.p99_ms = 1000 * float(np.percentile(lat, 99))
    print(f"  {server.name:>12} {photos:>6} c={concurrency}: {lv.rps:6.2f} req/s  p50 {lv.p50_ms:7.0f} ms  "
          f"p99 {lv.p99_ms:7.0f} ms  errors {lv.errors}  steal {lv.steal_pct:4.1f}%{'  (time cap)' if capped else ''}",
          file=sys.stderr, flush=True)
    return lv


def steal_seconds() -> float | None:
    """CPU seconds stolen from this VM by its hypervisor so far (all CPUs; /proc/stat), or None.

    A noisy neighbour on the host slows every server; the bench reports it per level so a slow run
    can be told apart from a slow server.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --- Reports ----------------------------------------------------------------------------------------


def table(levels: list[Level]) -> str:
    """Markdown: one row per photo kind, concurrency and server, with the speed-up over the baseline."""
    base = {(lv.photos, lv.concurrency): lv for lv in levels if lv.server == "baseline"}
    lines = [
        "| photos | concurrency | server | req/s | p50 ms | p99 ms | p99/p50 | errors | req/s vs baseline "
        "| CPU stolen |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(levels, key=lambda lv: (lv.photos != "400px", lv.concurrency, lv.server == "baseline", lv.server))
    for lv in order:
        b = base.get((lv.photos, lv.concurrency))
        speed = "1.0x" if lv.server == "baseline" else f"{lv.rps / b.rps:.1f}x" if b and b.rps else "-"
        ratio = lv.p99_ms / lv.p50_ms if lv.p50_ms else float("nan")
        lines.append(
            f"| {lv.photos} | {lv.concurrency} | {lv.server} | {lv.rps:.2f} | {lv.p50_ms:.0f} | {lv.p99_ms:.0f} "
            f"| {ratio:.1f} | {lv.errors} | {speed} | {lv.steal_pct:.1f}% |"
        )
    return "\n".join(lines)


def machine_load() -> str:
    """What else is running: the 1-minute load average and the CPU count."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return "unknown"
    return f"load average {load1:.1f} on {os.cpu_count()} CPUs"


# --- Main -------------------------------------------------------------------------------------------


def default_precisions() -> list[str]:
    """auto: as ``make run`` starts the app (the fastest precision the card allows, timed at start)."""
    return ["auto"]


def parse_grid(text: str) -> list[tuple[int, int, str | None]]:
    """``WORKERSxTHREADS[:FREEZE]`` items, e.g. ``1x8,2x4:off`` (FREEZE sets AISIGHT_FREEZE for that server)."""
    out = []
    for part in text.split(","):
        spec, _, freeze = part.strip().lower().partition(":")
        w, _, t = spec.partition("x")
        out.append((int(w), int(t), freeze or None))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model artifact folder (default: a cached random-weight Xception)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="fundus-eye4 folder (manifest.csv)")
    ap.add_argument("--levels", default="1,4,8", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=64, help="measured requests per level")
    ap.add_argument("--time-cap", type=float, default=90.0, help="seconds per level at most")
    ap.add_argument("--sizes", default="mixed,400,12mp",
                    help="photo kinds: mixed (400 px, one in eight 12 MP: the headline), 400 and/or 12mp")
    ap.add_argument("--workers", type=int, default=2, help="app: gunicorn workers")
    ap.add_argument("--threads", type=int, default=4, help="app: threads per worker")
    ap.add_argument("--precisions", default=",".join(default_precisions()),
                    help="app servers to run, one per AISIGHT_PRECISION (auto, float32, bf16, int8) and backend")
    ap.add_argument("--backends", default="openvino",
                    help="app servers to run, one per backend (openvino, tensorflow, auto) and precision")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="app environment (repeat)")
    ap.add_argument("--grid", help="only the app, for each WORKERSxTHREADS in this list (e.g. 1x4,1x8,2x4)")
    ap.add_argument("--cold-start", type=int, metavar="N", help="only cold starts: N per server")
    ap.add_argument("--before", metavar="DIR",
                    help="with --cold-start: also start the app from this older checkout (git archive), to compare")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args(argv)

    model_dir = model_dir_arg(args.model)
    extra = dict(kv.split("=", 1) for kv in args.env)
    levels_c = [int(c) for c in args.levels.split(",")]
    sizes = [s.strip().lower() for s in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="aisight-bench-"))
    print(f"model {model_dir}; logs in {workdir}; {machine_load()}", file=sys.stderr, flush=True)

    if args.cold_start:
        return cold_starts(model_dir, workdir, args, extra)

    real, source = real_photos(Path(args.data), 32)
    photo_sets: dict[str, list[bytes]] = {}
    if "400" in sizes:
        photo_sets["400px"] = [multipart(b) for b in real]
    if "12mp" in sizes or "mixed" in sizes:
        t = time.perf_counter()
        phones = [p for p in (phone_photo(real[i], seed=i) for i in range(8)) if gate_accepts(p)][:6]
        if not phones:
            raise SystemExit("the app's gate refuses every generated 12 MP photo")
        print(f"made {len(phones)} 12 MP photos ({np.mean([len(p) for p in phones]) / 1e6:.1f} MB each) in "
              f"{time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        if "12mp" in sizes:
            photo_sets["12mp"] = [multipart(b) for b in phones]
        if "mixed" in sizes:  # the load: real 400 px photos, one request in eight a 12 MP one
            photo_sets["mixed"] = mixed_set([multipart(b) for b in real], [multipart(b) for b in phones])

    configs = parse_grid(args.grid) if args.grid else [(args.workers, args.threads, None)]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    servers = [
        app_server(model_dir, workdir, w, t, prec, {**extra, **({"AISIGHT_FREEZE": fz} if fz else {})}, backend=b)
        for w, t, fz in configs
        for b in backends
        for prec in precisions
    ]
    if not args.grid and not args.no_baseline:
        servers.append(baseline_server(model_dir, workdir))
    results: dict = {"model_dir": str(model_dir), "photos": source, "load_before": machine_load(), "levels": []}
    levels: list[Level] = []
    chosen: dict[str, dict] = {}
    try:
        for s in servers:
            s.start()
            settled = f", start-up work done {s.settled_s:.1f}s" if s.settled_s else ""
            print(f"{s.name}: ready {s.cold_start_s:.1f}s after start{settled}", file=sys.stderr, flush=True)
            if s.name.startswith("app"):
                ready = s.readyz()
                chosen[s.name] = {**ready.get("precision_choice", {}), "backend": ready.get("backend")}
                print(f"{s.name}: serving {ready.get('precision')} on {ready.get('backend')}: "
                      f"{chosen[s.name].get('why', '')}", file=sys.stderr, flush=True)
        # Both servers stay up; each level runs on one server then the other, close in time, so a
        # change in the machine's other load hits both alike.
        for photos, bodies in photo_sets.items():
            for c in levels_c:
                for s in servers:
                    levels.append(measure(s, photos, bodies, c, args.requests, args.time_cap))
        rss = {s.name: s.rss_mb() for s in servers}
    finally:
        for s in servers:
            s.stop()
    first_app = next((s.name for s in servers if s.name.startswith("app")), "")
    choice = chosen.get(first_app, {})
    peak = None
    if "mixed" in photo_sets and choice.get("backend") == "openvino" and choice.get("precision"):
        peak = model_peak(model_dir, choice["precision"])  # the servers are stopped: the model alone
    results["precision_choice"], results["model_peak"] = chosen, peak
    results["cold_start_s"] = {s.name: s.cold_start_s for s in servers}
    results["rss_mb"] = rss
    results["settled_after_s"] = {s.name: s.settled_s for s in servers if s.settled_s}
    results["levels"] = [asdict(lv) for lv in levels]
    results["load_after"] = machine_load()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    print(f"\nPhotos: {source}; 12 MP: {PHONE_SIZE[0]}x{PHONE_SIZE[1]} JPEG q90 made from them. "
          f"{args.requests} requests per level. Machine: {results['load_before']} before, {results['load_after']} "
          "after.\n")
    if args.grid:
        print(grid_table(levels))
    else:
        print(table(levels))
    if "mixed" in photo_sets:
        print("\n" + headline(levels, first_app, choice, peak, concurrency=max(levels_c)))
    print("\nMemory after the run (resident, all processes of a server): "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in results["rss_mb"].items()))
    print("\nCold start (process start to /readyz 200): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in results["cold_start_s"].items() if v is not None)
          + "; background start-up work (Grad-CAM's Keras model, TensorFlow's frozen graph) done after: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in results["settled_after_s"].items()))
    return 0


def grid_table(levels: list[Level]) -> str:
    lines = ["| server | photos | concurrency | req/s | p50 ms | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for lv in sorted(levels, key=lambda lv: (lv.photos != "400px", lv.concurrency, lv.server)):
        lines.append(f"| {lv.server} | {lv.photos} | {lv.concurrency} | {lv.rps:.2f} | {lv.p50_ms:.0f} "
                     f"| {lv.p99_ms:.0f} | {lv.errors} |")
    return "\n".join(lines)


def cold_starts(model_dir: Path, workdir: Path, args, extra: dict[str, str]) -> int:
    """Start and stop each server N times; print the median and every time (one server at a time)."""
    variants = {}
    if args.before:
        variants["app before (float32)"] = lambda: app_server(model_dir, workdir, args.workers, args.threads, "float32",
                                                              extra, root=Path(args.before).resolve())
    for b in (b.strip() for b in args.backends.split(",")):
        for prec in (p.strip() for p in args.precisions.split(",")):
            variants[f"app {b} {prec}"] = lambda prec=prec, b=b: app_server(
                model_dir, workdir, args.workers, args.threads, prec, extra, backend=b)
    if not args.no_baseline:
        variants["baseline"] = lambda: baseline_server(model_dir, workdir)
    out: dict[str, list[float]] = {name: [] for name in variants}
    settled: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.cold_start):  # rounds, so a change in the machine's load hits every variant alike
        for name, make in variants.items():
            s = make()
            try:
                s.start()
                out[name].append(s.cold_start_s)
                if s.settled_s:
                    settled[name].append(s.settled_s)
            finally:
                s.stop()
            print(f"  {name}: {out[name][-1]:.1f}s", file=sys.stderr, flush=True)
    for name, times in out.items():
        line = f"{name}: cold start median {statistics.median(times):.1f}s ({', '.join(f'{t:.1f}' for t in times)})"
        if settled[name]:
            line += f"; background start-up work done after {statistics.median(settled[name]):.1f}s (median)"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"cold_start_s": out, "settled_after_s": settled, "env": extra,
                                               "load": machine_load()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
