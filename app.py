"""AI-Sight web app: ``create_app()`` is what gunicorn serves (``make run``, see gunicorn.conf.py).

Configuration comes from the environment (AISIGHT_MODEL_DIR, AISIGHT_MAX_UPLOAD_MB, AISIGHT_GATE=off to switch
the fundus-photo gate off);
``create_app(config)`` takes overrides, which is how the tests point it at other models.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flask import Flask

from aisight import accounts, cli, explain, mydata, review, store, visits, web
from aisight.artifact import DEFAULT_MODEL_DIR
from aisight.gate import gate_enabled
from aisight.limits import body_limit
from aisight.metrics import Metrics
from aisight.predictor import Predictor
from aisight.store import database_url, env_flag, store_enabled

log = logging.getLogger("aisight.app")

LOAD_MODES = ("background", "sync", "none")


def load_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the app's settings: the environment's, then ``overrides``."""
    env = os.environ
    cfg: dict[str, Any] = {
        "MODEL_DIR": env.get("AISIGHT_MODEL_DIR") or str(DEFAULT_MODEL_DIR),
        "MAX_UPLOAD_MB": float(env.get("AISIGHT_MAX_UPLOAD_MB") or 20),
        # The fundus-photo gate (aisight.gate): on unless AISIGHT_GATE=off (0, false, no).
        "GATE": gate_enabled(env),
        # background: load in a thread so /healthz answers at once; sync: load before returning (tests);
        # none: never load (tests that drive readiness themselves, with PREDICTOR).
        # AISIGHT_MODEL_LOAD=sync behind nginx (aisight.serve): a worker accepts no request before its
        # model answers, so a replaced worker never turns requests away while it loads.
        "MODEL_LOAD": env.get("AISIGHT_MODEL_LOAD") or "background",
        "PREDICTOR": None,
    }
    # The clinicians' side (accounts; a database): AISIGHT_STORE=on, which `make run` sets.
    cfg.update({
        "STORE": store_enabled(env),
        "DATABASE_URL": database_url(env),
        # Migrate on start, unless someone did before: aisight.serve migrates once before the workers start,
        # a k8s Job runs `flask --app app db upgrade` before a rollout.
        "DB_UPGRADE": env_flag("AISIGHT_DB_UPGRADE", True, env),
        "SECRET_KEY": env.get("SECRET_KEY") or _read_secret(env.get("AISIGHT_SECRET_KEY_FILE")),
        "SESSION_HOURS": float(env.get("AISIGHT_SESSION_HOURS") or 12),
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SECURE": env_flag("AISIGHT_SECURE_COOKIES", False, env),
    })
    if Path(sys.argv[0]).name == "flask" and "run" not in sys.argv[1:2]:
        cfg["MODEL_LOAD"] = "none"  # an operator command (users, db): no model needed
    cfg.update(overrides or {})
    cfg["PERMANENT_SESSION_LIFETIME"] = dt.timedelta(hours=cfg["SESSION_HOURS"])
    if cfg["STORE"] and not cfg["SECRET_KEY"]:
        raise ValueError("AISIGHT_STORE=on needs SECRET_KEY (or AISIGHT_SECRET_KEY_FILE): `make run` makes one in var/")
    if cfg["MODEL_LOAD"] not in LOAD_MODES:
        raise ValueError(f"MODEL_LOAD must be one of {LOAD_MODES}, got {cfg['MODEL_LOAD']!r}")
    mb = cfg["MAX_UPLOAD_MB"]
    cfg["MAX_UPLOAD_MB"] = int(mb) if float(mb).is_integer() else mb
    cfg["MAX_CONTENT_LENGTH"] = body_limit(cfg["MAX_UPLOAD_MB"])
    return cfg


def _read_secret(path: str | None) -> str | None:
    if path and Path(path).is_file():
        return Path(path).read_text().strip() or None
    return None


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app and start loading its model (in this process: gunicorn calls this after fork)."""
    _configure_logging()
    app = Flask(__name__)
    app.config.update(load_config(config))

    metrics = Metrics()
    metrics.init_app(app)
    predictor = app.config["PREDICTOR"] or Predictor(app.config["MODEL_DIR"])
    app.extensions["aisight"] = {"predictor": predictor, "metrics": metrics}
    web.init_app(app)
    cli.init_app(app)
    if app.config["STORE"]:
        store.init_app(app)
        accounts.init_app(app)
        mydata.init_app(app)
        visits.init_app(app)
        review.init_app(app)

    mode = app.config["MODEL_LOAD"]
    if mode == "sync":
        _load(app, predictor, metrics)
    elif mode == "background":
        # TensorFlow's import and the model load take seconds: /healthz must answer meanwhile.
        threading.Thread(
            target=_load, args=(app, predictor, metrics), name="aisight-model-load", daemon=True
        ).start()
    elif predictor.ready:
        _record_ready(predictor, metrics)
        _start_explain_prepare(app, predictor)
    return app


def _load(app: Flask, predictor: Predictor, metrics: Metrics) -> None:
    log.info("loading model from %s", predictor.model_dir)
    predictor.load()  # never raises: a failure leaves state "failed" and logs why
    if predictor.ready:
        _record_ready(predictor, metrics)
        _start_explain_prepare(app, predictor)
    else:
        log.error("model not loaded, /readyz stays 503: %s", predictor.error)


def _record_ready(predictor: Predictor, metrics: Metrics) -> None:
    if predictor.load_seconds is not None:
        metrics.model_load.set(predictor.load_seconds)
    choice = getattr(predictor, "precision_choice", None)
    if choice is not None:
        metrics.model_precision.labels(choice.precision, choice.by).set(1)
    metrics.model_ready.set(1)


def _start_explain_prepare(app: Flask, predictor: Predictor) -> None:
    """Build and trace Grad-CAM in the background once the model is ready (readiness does not wait).

    Otherwise the first result page would pay for the build (0.4 s for TinyNet, seconds for Xception).
    The thread is kept in ``app.extensions["aisight"]["explain_prepare"]`` so tests can wait for it.
    """
    # Not a daemon (as the predictor's background freezing): a process that exits while TensorFlow is
    # tracing in a daemon thread aborts ("terminate called ... FATAL: exception not rethrown").
    thread = threading.Thread(target=_prepare_explain, args=(predictor,), name="aisight-explain-prepare")
    app.extensions["aisight"]["explain_prepare"] = thread
    thread.start()


def _prepare_explain(predictor: Predictor) -> None:
    t0 = time.perf_counter()
    try:
        # With OpenVINO serving, this is where the Keras model loads (seconds, after ready).
        model = predictor.explain_model()
        layer = explain.prepare(model, (predictor.card or {}).get("gradcam_layer"))
    except Exception as exc:  # the result is still served without a heatmap; each request logs its failure
        log.warning("Grad-CAM could not be prepared: %s", exc)
        return
    log.info("Grad-CAM ready on layer %s in %.2fs", layer, time.perf_counter() - t0)


def _configure_logging() -> None:
    # Under gunicorn only its own loggers have handlers; without this our INFO lines (model loaded,
    # where from, in how long) would be dropped.
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("AISIGHT_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        )
