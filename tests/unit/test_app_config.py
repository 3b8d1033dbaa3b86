"""Configuration by environment: the app's settings, gunicorn.conf.py, metrics across workers."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app import create_app, load_config

ROOT = Path(__file__).resolve().parents[2]
ENV_KEYS = ("HOST", "PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "GUNICORN_TIMEOUT", "PROMETHEUS_MULTIPROC_DIR",
            "TF_NUM_INTRAOP_THREADS", "TF_CPP_MIN_LOG_LEVEL", "AISIGHT_BIND", "AISIGHT_QUEUE_MAX", "AISIGHT_MODEL_LOAD")


@pytest.fixture
def clean_env(monkeypatch):
    """The environment without the settings under test; restored whole afterwards (hooks write to it)."""
    saved = os.environ.copy()
    for key in ENV_KEYS + ("AISIGHT_MODEL_DIR", "AISIGHT_MAX_UPLOAD_MB", "AISIGHT_GATE"):
        os.environ.pop(key, None)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def gunicorn_settings() -> dict:
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


class FakeServer:
    """What gunicorn passes to the server hooks, as far as gunicorn.conf.py looks."""

    def __init__(self, workers: int) -> None:
        self.cfg = type("Cfg", (), {"workers": workers})()


def test_defaults(clean_env):
    cfg = load_config()
    assert Path(cfg["MODEL_DIR"]) == ROOT / "models" / "2.0.0"
    assert cfg["MAX_UPLOAD_MB"] == 20 and cfg["MAX_CONTENT_LENGTH"] > 20 * 1024 * 1024
    assert cfg["GATE"] is True and cfg["MODEL_LOAD"] == "background"


def test_environment(clean_env, tmp_path):
    clean_env.setenv("AISIGHT_MODEL_DIR", str(tmp_path))
    clean_env.setenv("AISIGHT_MAX_UPLOAD_MB", "5")
    clean_env.setenv("AISIGHT_GATE", "off")
    cfg = load_config()
    assert cfg["MODEL_DIR"] == str(tmp_path) and cfg["MAX_UPLOAD_MB"] == 5 and cfg["GATE"] is False
    assert load_config({"MAX_UPLOAD_MB": 2})["MAX_UPLOAD_MB"] == 2  # overrides beat the environment


def test_bad_load_mode_is_refused():
    with pytest.raises(ValueError):
        load_config({"MODEL_LOAD": "eventually"})


def test_gunicorn_defaults(clean_env):
    s = gunicorn_settings()
    assert s["bind"] == "127.0.0.1:8000"
    assert s["workers"] == 2 and s["threads"] == 4 and s["worker_class"] == "gthread"
    assert s["worker_connections"] == 4 + 4  # threads + AISIGHT_QUEUE_MAX: the bounded admission queue
    assert s["preload_app"] is False  # TensorFlow is not fork-safe: load after fork
    assert s["timeout"] >= 60
    assert s.get("forwarded_allow_ips") is None  # on a TCP port nobody's X-Forwarded-For is trusted


def test_gunicorn_workers_import_numpy_with_one_blas_thread(clean_env):
    """A worker (which imports NumPy after gunicorn.conf.py ran in the master) gets a one-thread BLAS pool;
    an operator's own setting wins."""
    pytest.importorskip("threadpoolctl")
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); import numpy, threadpoolctl; "
            "print(max(p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas'))")
    for preset, expected in ((None, "1"), ("2", "2")):
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        if preset:
            env["OPENBLAS_NUM_THREADS"] = preset
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "gunicorn.conf.py")], env=env,
                             capture_output=True, text=True, check=True, timeout=120).stdout.split()
        assert out[-1] == expected, (preset, out)


def test_gunicorn_behind_the_proxy(clean_env):
    clean_env.setenv("AISIGHT_BIND", "unix:/tmp/x/gunicorn.sock")
    clean_env.setenv("AISIGHT_QUEUE_MAX", "0")
    s = gunicorn_settings()
    assert s["bind"] == "unix:/tmp/x/gunicorn.sock" and s["worker_connections"] == 4
    assert s["forwarded_allow_ips"] == "*"  # only nginx can reach the private socket


def test_model_load_mode_from_the_environment(clean_env):
    clean_env.setenv("AISIGHT_MODEL_LOAD", "sync")
    assert load_config()["MODEL_LOAD"] == "sync"


def test_gunicorn_environment(clean_env):
    for k, v in {"HOST": "0.0.0.0", "PORT": "9123", "WEB_CONCURRENCY": "3", "GUNICORN_THREADS": "8",
                 "GUNICORN_TIMEOUT": "200"}.items():
        clean_env.setenv(k, v)
    s = gunicorn_settings()
    assert s["bind"] == "0.0.0.0:9123" and s["workers"] == 3 and s["threads"] == 8 and s["timeout"] == 200
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # loading the config has no side effects


def test_gunicorn_hooks_prepare_several_workers(clean_env):
    s = gunicorn_settings()
    s["on_starting"](FakeServer(workers=2))
    # Several workers: /metrics adds their counts up through files in one folder, made here.
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert Path(metrics_dir).is_dir() and int(os.environ["TF_NUM_INTRAOP_THREADS"]) >= 1
    s["on_exit"](None)
    assert not Path(metrics_dir).exists()


def test_gunicorn_hooks_leave_one_worker_alone(clean_env):
    s = gunicorn_settings()
    s["on_starting"](FakeServer(workers=1))
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ and "TF_NUM_INTRAOP_THREADS" not in os.environ


def test_metrics_add_up_across_processes(tmp_path):
    """In multiprocess mode (several gunicorn workers) /metrics reports every process' counts."""
    script = textwrap.dedent(
        """
        import sys
        from app import create_app
        app = create_app({"MODEL_LOAD": "none", "MODEL_DIR": sys.argv[1]})
        c = app.test_client()
        for _ in range(int(sys.argv[2])):
            c.get("/healthz")
        print(c.get("/metrics").get_data(as_text=True))
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def run(n: int) -> str:
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "no-model"), str(n)],
            env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    run(2)
    text = run(3)  # a second process sees the first one's requests too
    line = next(x for x in text.splitlines() if x.startswith("aisight_http_requests_total") and "/healthz" in x)
    assert float(line.rsplit(" ", 1)[1]) == 5


def test_create_app_takes_an_injected_predictor(model_dir):
    from aisight.predictor import Predictor

    p = Predictor(model_dir).load()
    app = create_app({"PREDICTOR": p, "MODEL_LOAD": "none"})
    assert app.test_client().get("/readyz").status_code == 200


def test_worker_exit_closes_the_model(clean_env):
    closed = []

    class FakePredictor:
        state, ready, card, error, load_seconds = "ready", True, None, None, 0.1

        def close(self):
            closed.append(True)

    app = create_app({"PREDICTOR": FakePredictor(), "MODEL_LOAD": "none"})
    worker = type("Worker", (), {"wsgi": app})()
    gunicorn_settings()["worker_exit"](None, worker)
    assert closed == [True]
    gunicorn_settings()["worker_exit"](None, type("Worker", (), {})())  # a worker that never loaded the app
