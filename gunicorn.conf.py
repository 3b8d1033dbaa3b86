"""Gunicorn settings for ``make run`` and the container images, all from the environment.

HOST, PORT (127.0.0.1:8000), WEB_CONCURRENCY (workers, 2), GUNICORN_THREADS (4), AISIGHT_QUEUE_MAX (4),
GUNICORN_TIMEOUT (120). AISIGHT_BIND (set by aisight.serve: a unix socket behind nginx) wins over HOST/PORT.
No preload: TensorFlow is not fork-safe, so each worker builds the app and loads the model after fork.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from aisight import wire

# One BLAS thread per request thread. NumPy's OpenBLAS would otherwise start a pool per process whose
# threads spin while waiting and take the cores OpenVINO's inference needs: the fundus-v2 blur is two small
# matrix products per photo, and with the default pool the mixed load served 9.6 req/s instead of 14.7
# (docs/performance.md, 7 Dec evening). Set here, in the master, so that every worker imports NumPy with it.
for _blas in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas, "1")

# Each answer's head goes out with its first body bytes: a worker killed mid-answer then leaves nginx nothing
# (a clean 503) rather than a head without its body (a cut-off answer). Installed here, before the fork.
wire.install()


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


bind = os.environ.get("AISIGHT_BIND") or f"{os.environ.get('HOST', '127.0.0.1')}:{_int('PORT', 8000)}"
# 2 workers x 4 threads: a worker that dies costs only the requests it held while the other one keeps
# answering (issue 12; docs/performance.md has the memory this costs).
workers = max(1, _int("WEB_CONCURRENCY", 2))
worker_class = "gthread"
threads = max(1, _int("GUNICORN_THREADS", 4))
# A bounded admission queue per worker: it holds at most threads + AISIGHT_QUEUE_MAX requests and accepts
# no more until one finishes (nginx in front sheds the rest with 503).
worker_connections = threads + max(0, _int("AISIGHT_QUEUE_MAX", 4))
if bind.startswith("unix:"):
    # Only nginx can reach the private socket, so its X-Forwarded-* headers are the client's.
    forwarded_allow_ips = "*"
    # The socket has no peer address: log the client nginx saw.
    access_log_format = '%({x-real-ip}i)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms'
# Above the worst model load + warm-up on a small CPU (loading happens inside the worker).
timeout = _int("GUNICORN_TIMEOUT", 120)
graceful_timeout = 30
keepalive = 5
preload_app = False
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# The heartbeat file on tmpfs: a container's overlay disk can stall it (and get workers killed).
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# Set by on_starting when it makes the metrics folder itself (and so removes it on exit).
_owned_metrics_dir: str | None = None


def on_starting(server) -> None:
    """Prepare the workers' environment (they inherit it at fork and import TensorFlow after)."""
    global _owned_metrics_dir
    n = server.cfg.workers
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if n > 1:
        # Each worker would otherwise run TensorFlow on every core and they would fight over them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, cores // n)))
        # Several workers: /metrics must add up every worker's counts, which prometheus_client does
        # through files in one folder. Metrics only: uploads never touch the disk.
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            _owned_metrics_dir = tempfile.mkdtemp(prefix="aisight-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = _owned_metrics_dir
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and os.path.isdir(path):
        for name in os.listdir(path):  # a new server counts from zero: stale files would add old counts
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))


def child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges from /metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics folder on_starting made."""
    if _owned_metrics_dir:
        shutil.rmtree(_owned_metrics_dir, ignore_errors=True)


def worker_exit(server, worker) -> None:
    """Stop the worker's model cleanly (its micro-batcher answers what is queued, then stops)."""
    app = getattr(worker, "wsgi", None)
    predictor = getattr(app, "extensions", {}).get("aisight", {}).get("predictor")
    if predictor is not None and hasattr(predictor, "close"):
        predictor.close()
