"""Prometheus metrics for the app: one registry per app, request counters and latency by route."""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Seconds; a cached TinyNet answer takes milliseconds, a 12 MP upload over a phone link several seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Methods outside this set are counted as "other": label values stay bounded whatever clients send.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"
# aisight.gate's refusal codes (listed here so importing metrics stays free of numpy and Pillow).
GATE_CODES = ("not_fundus", "too_dark", "too_bright", "blurred", "too_small")

# The *_created series double what is exposed for no use here (Prometheus derives resets itself).
disable_created_metrics()


def multiprocess_dir() -> str | None:
    """The folder of prometheus_client's multiprocess mode (several gunicorn workers), if it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The app's metrics, registered in a registry of their own so several apps never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aisight_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "aisight_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter("aisight_predictions", "Predictions made, by predicted label", ["label"], registry=r)
        self.stage = Histogram(
            "aisight_stage_duration_seconds",
            "Time spent in one stage of a prediction (decode: bytes to model input; gate: the fundus-photo "
            "check; predict: the model; explain: the Grad-CAM heatmap, only when one is asked for)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gate_refusals = Counter(
            "aisight_gate_refusals", "Uploads refused by the fundus-photo gate (HTTP 422), by reason", ["code"],
            registry=r,
        )
        for code in GATE_CODES:  # every reason is exported from the start, at 0: rates need a series to exist
            self.gate_refusals.labels(code)
        self.explain_failures = Counter(
            "aisight_explain_failures", "Heatmaps that could not be made (the result was served without one)",
            registry=r,
        )
        # "max" across workers in multiprocess mode: the slowest worker's load is what a rollout waits for.
        self.model_load = Gauge(
            "aisight_model_load_seconds",
            "Seconds the model took to load and answer its warm-up prediction",
            registry=r,
            multiprocess_mode="max",
        )
        # What the model computes in (aisight.precision) and how that was decided: timing, setting, rule, cache.
        self.model_precision = Gauge(
            "aisight_model_precision", "1 for the precision the model is served in", ["precision", "chosen_by"],
            registry=r, multiprocess_mode="max",
        )
        self.model_ready = Gauge(
            "aisight_model_ready", "1 once the model answers predictions", registry=r, multiprocess_mode="livemin"
        )

    def init_app(self, app: Flask) -> None:
        """Time and count every request of ``app`` and serve ``GET /metrics``."""
        app.before_request(self._start)
        app.after_request(self._record)
        app.add_url_rule("/metrics", "metrics", self.expose, methods=["GET"])

    def _start(self) -> None:
        g.aisight_t0 = time.perf_counter()

    def _record(self, response: Response) -> Response:
        t0 = g.pop("aisight_t0", None)
        # The url rule, not the path: /static/<path:filename> is one series however many files exist.
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        method = request.method if request.method in METHODS else "other"
        self.requests.labels(route, method, str(response.status_code)).inc()
        if t0 is not None:
            self.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    def expose(self) -> Response:
        """Return every metric in Prometheus' text format (all workers' when in multiprocess mode)."""
        path = multiprocess_dir()
        if path:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)
        else:
            registry = self.registry
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
