"""The app's pages and JSON API: upload a fundus photo, get the screening result."""

from __future__ import annotations

import io
import logging
from typing import Any

from flask import Blueprint, Flask, Request, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from aisight.accounts import audit, check_csrf
from aisight.artifact import card_summary
from aisight.pipeline import (
    EXPLAIN_FAILED,
    ApiError,
    Screening,
    api_explanation,
    display_image,
    page_heatmap,
    predictor,
    screen,
)
from aisight.predictor import ModelNotReady
from aisight.preprocess import ImageError
from aisight.store import db
from aisight.store.records import new_receipt, store_photo
from aisight.streaming import stream_page

log = logging.getLogger(__name__)
bp = Blueprint("web", __name__)

FIELD = "image"
NOTICE = (
    "AI-Sight is a screening aid, not a diagnosis. Only an eye-care professional can diagnose eye disease."
)
# Query values that ask the API for an explanation (?explain=1).
TRUE_VALUES = ("1", "true", "yes", "on")
NEXT_STEPS = {
    "diseased": (
        "Book an appointment with an eye doctor (ophthalmologist or optometrist) soon and show them this photo "
        "and result."
    ),
    "healthy": (
        "No signs of disease were found in this photo, but screening can miss disease. Keep your regular eye "
        "examinations, and see an eye doctor if your vision changes."
    ),
}
# Security headers for every answer. No inline script anywhere (JS lives in static/app.js); images may
# be data: URLs (the result photo) and blob: URLs (the script's preview of the chosen file).
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_content",
    429: "too_many_requests",
    503: "service_unavailable",
}


class MemoryRequest(Request):
    """A request whose uploaded files stay in memory (Werkzeug spools files over 500 KB to disk).

    Memory is bounded by MAX_CONTENT_LENGTH, which Werkzeug checks before and while reading the body.
    """

    max_form_parts = 16  # the form has one field; a flood of parts is refused early

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()



def read_upload() -> bytes:
    """Return the bytes of the ``image`` file part, or refuse the request with a clear 4xx."""
    upload = request.files.get(FIELD)  # reading the form may raise 413 (body over MAX_CONTENT_LENGTH)
    if upload is None:
        raise ApiError(
            "no_file", f"No file was sent. Post the photo as multipart/form-data in a field named '{FIELD}'.", 400
        )
    if not upload.filename:  # the filename is only tested for presence, never used for anything
        raise ApiError("empty_filename", "No photo was chosen. Choose a photo, then submit.", 400)
    data = upload.read()
    if not data:
        raise ApiError("empty_file", "The uploaded file is empty (0 bytes).", 400)
    return data



def api_answer(s: Screening) -> dict[str, Any]:
    """The JSON body of a successful ``POST /api/v1/predict``."""
    body: dict[str, Any] = {
        "label": s.label,
        "probability": round(s.probability, 6),
        "threshold": s.threshold,
        "model": card_summary(s.card),
        "notice": NOTICE,
    }
    if s.card.get("warning"):
        body["warning"] = s.card["warning"]
    return body


# Cards written by `python -m training train` hold {part: {subset: {metric: value}}}; a reader wants
# the test patients' headline numbers, not every cell (the full table is in the card file).
HEADLINE_METRICS = ("accuracy", "sensitivity", "specificity", "auc")
SUBSET_NAMES = {"all": "all test patients", "odir": "source-controlled (ODIR only)"}


def task_rows(card: dict[str, Any]) -> list[tuple[str, str]]:
    """Per-task rows (source-controlled first) from the card's evaluation on held-out patients of every
    source, else from its test split; then the sources it was validated on."""
    evaluation = card.get("evaluation") or {}
    tasks = evaluation.get("tasks") or ((card.get("metrics") or {}).get("tasks") or {}).get("test")
    if not isinstance(tasks, dict) or not tasks:
        return []
    where = "held-out patients" if evaluation.get("tasks") else "test patients"
    rows = []
    ordered = sorted(tasks.values(), key=lambda t: not t.get("controlled"))
    for t in (t for t in ordered if t.get("controlled")):
        rows.append(_task_row(where, t))
    # The estimate of a new clinic: trained without a source, tested on it (after the controlled tasks).
    for lo_run in card.get("leave_one_source_out") or []:
        lo, hi = lo_run.get("auc_ci95") or (float("nan"), float("nan"))
        rows.append((
            f"source left out of training · {lo_run['left_out']}",
            f"AUC {lo_run['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}) on {lo_run['tested_on']} ({lo_run['model']})",
        ))
    for t in (t for t in ordered if not t.get("controlled")):
        rows.append(_task_row(where, t))
    sources = (card.get("training") or {}).get("sources")
    if sources:
        rows.append(("validated on sources", ", ".join(sources)))
    return rows


def _task_row(where: str, t: dict[str, Any]) -> tuple[str, str]:
    lo, hi = t.get("auc_ci95") or (float("nan"), float("nan"))
    return (
        f"{where} · {t['title']}",
        f"AUC {t['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}); sensitivity {t['sensitivity']:.2f}, "
        f"specificity {t['specificity']:.2f} ({t['negatives']} healthy, {t['positives']} diseased)",
    )


def card_metrics(card: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the card's metrics a page can show: per-task figures where the card has them (the fair
    ones first), else the test headline for training cards, else all."""
    rows = task_rows(card)
    if rows:
        return rows
    metrics = card.get("metrics") or {}
    test = metrics.get("test")
    if isinstance(test, dict) and isinstance(test.get("all"), dict):
        return [
            (f"{SUBSET_NAMES.get(subset, subset)} · {name}", f"{values[name]:.3f}")
            for subset, values in test.items()
            if isinstance(values, dict)
            for name in HEADLINE_METRICS
            if isinstance(values.get(name), (int, float))
        ]
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix} · {k}" if prefix else str(k), v)
        elif isinstance(value, bool) or value is None:
            rows.append((_humanize(prefix), str(value)))
        elif isinstance(value, float):
            rows.append((_humanize(prefix), f"{value:.3f}"))
        elif isinstance(value, (int, str)):
            rows.append((_humanize(prefix), str(value)))
        # lists and other shapes (curves, confusion matrices) are left to the card file itself

    walk("", metrics)
    return rows


def _humanize(key: str) -> str:
    return key.replace("_", " ")


# ------------------------------------------------------------------------------------------------- views


def _page_context() -> dict[str, Any]:
    p = predictor()
    return {
        "model_state": p.state,
        "card": p.card,
        "max_upload_mb": current_app.config["MAX_UPLOAD_MB"],
        "max_upload_bytes": current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024,
    }


@bp.get("/")
def index() -> str:
    """The upload page."""
    return render_template("index.html", error=None, **_page_context())



@bp.post("/")
def submit() -> Response:
    """The upload form's target: the result page (works without JavaScript)."""
    data = read_upload()
    # Stored only with the explicit, unticked-by-default consent, and only when the store is on.
    consent = current_app.config["STORE"] and request.form.get("consent") == "yes"
    if consent:
        check_csrf()
    s = screen(data)
    receipt = None
    if consent:
        receipt = new_receipt()
        photo_row = store_photo(db(), s, data, kind="consent", receipt=receipt)
        audit("consented_upload", f"photo:{photo_row.public_id}")

    def late_parts() -> dict[str, Any]:  # called by the template once the answer has been sent
        photo, width, height = display_image(data, crop=s.crop)
        return {"photo": photo, "photo_width": width, "photo_height": height, "heatmap": page_heatmap(s)}

    return stream_page(
        "result.html",
        s=s,
        receipt=receipt,
        late_parts=late_parts,
        summary=card_summary(s.card),
        metrics=card_metrics(s.card),
        notice=NOTICE,
        next_step=NEXT_STEPS[s.label],
        **_page_context(),
    )


@bp.post("/api/v1/predict")
def api_predict() -> Response:
    """JSON API: multipart field ``image`` in, label and P(diseased) out; ``?explain=1`` adds the heatmap."""
    s = screen(read_upload())
    body = api_answer(s)
    # Only when asked: a plain request computes nothing beyond the prediction.
    if request.args.get("explain", "").strip().lower() in TRUE_VALUES:
        body["explanation"] = api_explanation(s)
        if body["explanation"] is None:
            body["explanation_error"] = EXPLAIN_FAILED
    return jsonify(body)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process serves requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: 200 once the model has loaded and answered a warm-up prediction, else 503."""
    p = predictor()
    body: dict[str, Any] = {"status": "ready" if p.ready else p.state}
    if p.card is not None:
        body["model"] = {"name": p.card["name"], "version": p.card["version"]}
    if p.ready:
        body["device"] = p.device
        body["backend"] = getattr(p, "backend", None)
        body["precision"] = p.precision
        choice = getattr(p, "precision_choice", None)
        if choice is not None:  # which precision serves, and why (measured here, forced, or the only one allowed)
            body["precision_choice"] = choice.as_dict()
        body["load_seconds"] = p.load_seconds
    elif p.error:
        body["error"] = p.error
    return jsonify(body), 200 if p.ready else 503


# ----------------------------------------------------------------------------------- errors and headers


def wants_json() -> bool:
    """Whether an error answer should be JSON (API, probes, clients that prefer it) rather than a page."""
    if request.path.startswith("/api/") or request.path in ("/healthz", "/readyz", "/metrics"):
        return True
    if request.path == "/":
        return False
    return request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    hint: str | None = None,
    measures: dict[str, float] | None = None,
) -> Response:
    """Answer an error as ``{"error": {"code", "message"[, "hint", "measures"]}}`` or as a page, with ``status``."""
    if wants_json():
        error: dict[str, Any] = {"code": code, "message": message}
        if hint:
            error["hint"] = hint
        if measures is not None:
            error["measures"] = measures
        resp = jsonify(error=error)
    elif request.path == "/" and request.method == "POST":
        # The form's own page again, with the message next to the form: the user can retry at once.
        # 422 is the gate's refusal: the page explains it and says what to do (the hint).
        shown = {"code": code, "message": message, "hint": hint, "refused": status == 422}
        resp = Response(render_template("index.html", error=shown, **_page_context()))
    else:
        resp = Response(render_template("error.html", status=status, code=code, message=message))
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


def _api_error(exc: ApiError) -> Response:
    log.info("refused %s %s: %s %s", request.method, request.path, exc.status, exc.code)
    return error_response(exc.status, exc.code, exc.message, exc.headers, hint=exc.hint, measures=exc.measures)


def _image_error(exc: ImageError) -> Response:
    log.info("refused %s %s: %s %s", request.method, request.path, exc.status, exc.code)
    return error_response(exc.status, exc.code, exc.message)


def _not_ready(exc: ModelNotReady) -> Response:
    log.warning("prediction refused on %s: model not ready (%s)", request.path, exc)
    return error_response(503, "model_unavailable", "The screening model is not available right now.")


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = HTTP_CODES.get(status, "http_error")
    if status == 413:
        message = f"The upload is larger than {current_app.config['MAX_UPLOAD_MB']} MB. Upload a smaller photo."
    else:
        message = exc.description or exc.name
    headers = {"Allow": ", ".join(exc.valid_methods)} if getattr(exc, "valid_methods", None) else None
    return error_response(status, code, message, headers)


def _unexpected(exc: Exception) -> Response:
    # Last resort only: every input the app expects to refuse has its own 4xx above.
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "internal_error", "Something went wrong on our side. Please try again.")


def _security_headers(resp: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        resp.headers.setdefault(name, value)
    if request.endpoint != "static":
        resp.headers["Cache-Control"] = "no-store"  # results are health data: no cache keeps a copy
    if request.is_secure:
        resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    return resp


def init_app(app: Flask) -> None:
    """Register the views, the error handlers and the security headers on ``app``."""
    app.request_class = MemoryRequest
    app.register_blueprint(bp)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ImageError, _image_error)
    app.register_error_handler(ModelNotReady, _not_ready)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.after_request(_security_headers)
