"""The screening pipeline every route calls: decode -> gate -> model -> explanation.

The anonymous page, the API and (later) visits all screen a photo with ``screen`` and explain it with
``heatmap``; nothing here knows about HTTP forms or templates beyond raising ``ApiError`` for a refusal.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask import current_app, request
from PIL import Image

from aisight import explain
from aisight.fundus import crop_relative
from aisight.gate import check_fundus
from aisight.predictor import Predictor
from aisight.preprocess import SUPPORTED_FORMATS, model_input_and_crop, open_image

log = logging.getLogger(__name__)

# The result page shows the upload as a data: URL (nothing is written to disk) no larger than this.
DISPLAY_MAX_SIDE = 768
# The result page's heatmap layer: upsampled here to this many pixels a side before colouring (the
# browser stretches it the rest of the way), and more opaque than the API's overlay (0.45), since the
# page shows the plain photo too, one tap away.
HEATMAP_LAYER_SIDE = 64
HEATMAP_LAYER_ALPHA = 0.6
# Within this distance of the threshold the page says the result is uncertain.
NEAR_THRESHOLD = 0.1
# The class each label's heatmap explains (the model's outputs are [healthy, diseased]).
CLASS_INDEX = {"healthy": 0, "diseased": 1}
EXPLAIN_FAILED = "The heatmap could not be made for this photo. The result itself is not affected."


class ApiError(Exception):
    """A request the app refuses: an HTTP status, a stable machine code and a message for people.

    A gate refusal (422) also carries a ``hint`` (what to do instead) and the gate's ``measures``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 400,
        headers: dict[str, str] | None = None,
        *,
        hint: str | None = None,
        measures: dict[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.headers = code, message, status, headers or {}
        self.hint, self.measures = hint, measures


@dataclass(frozen=True)
class Screening:
    """One answered prediction, with what an explanation needs (kept in memory for this request only)."""

    label: str
    probability: float
    threshold: float
    card: dict[str, Any]
    decode_seconds: float
    predict_seconds: float
    photo: Image.Image = field(repr=False)  # what the model looked at: the upload (upright RGB), or its field crop
    model_input: np.ndarray = field(repr=False)  # the 128x128x3 array the model classified
    # The square the model input came from, as fractions of the upload's width and height (fundus-v2
    # input); the displayed photo is cropped the same way so that the heatmap lies on what it explains.
    crop: tuple[float, float, float, float] | None = None
    measures: dict[str, float] | None = None  # the gate's measures (None with the gate off)

    @property
    def uncertain(self) -> bool:
        return abs(self.probability - self.threshold) < NEAR_THRESHOLD


def predictor() -> Predictor:
    """The current app's predictor."""
    return current_app.extensions["aisight"]["predictor"]


def require_ready() -> Predictor:
    """Return the predictor if it answers predictions; otherwise refuse with 503 (never a made-up answer)."""
    p = predictor()
    if p.ready:
        return p
    if p.state == "loading":
        raise ApiError(
            "model_loading", "The model is still loading. Try again in a few seconds.", 503, {"Retry-After": "5"}
        )
    raise ApiError("model_unavailable", "The screening model is not available, so no photo can be screened now.", 503)


def upload_size(data: bytes) -> tuple[int, int] | None:
    """The upload's own (width, height) from its header: ``open_image`` may have decoded it smaller."""
    try:
        with Image.open(io.BytesIO(data), formats=sorted(SUPPORTED_FORMATS)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - open_image already read it; without a size the gate uses the decoded one
        return None


def screen(data: bytes) -> Screening:
    """Turn uploaded bytes into a screening result with the served model, or refuse them (gate, 422)."""
    p = require_ready()
    metrics = current_app.extensions["aisight"]["metrics"]
    t0 = time.perf_counter()
    img = open_image(data)  # decoded once: the gate, the model input and any explanation share it
    t1 = time.perf_counter()
    measures = None
    if current_app.config["GATE"]:
        v = check_fundus(img, upload_size(data))
        metrics.stage.labels("gate").observe(time.perf_counter() - t1)
        if not v.ok:
            metrics.gate_refusals.labels(v.code).inc()
            raise ApiError(v.code, v.message, 422, hint=v.hint, measures=v.measures)
        measures = v.measures
    t2 = time.perf_counter()
    img, arr, crop = _model_input(img, p)
    t3 = time.perf_counter()
    probability = p.predict_one(arr)  # ModelNotReady here (the model went away) is answered 503 below
    t4 = time.perf_counter()
    threshold = p.threshold
    label = "diseased" if probability >= threshold else "healthy"
    decode = (t1 - t0) + (t3 - t2)
    metrics.stage.labels("decode").observe(decode)
    metrics.stage.labels("predict").observe(t4 - t3)
    metrics.predictions.labels(label).inc()
    return Screening(label, probability, threshold, p.card or {}, decode, t4 - t3, img, arr, crop, measures)


def _model_input(img: Image.Image, p: Predictor) -> tuple[Image.Image, np.ndarray, tuple | None]:
    """(what the model looks at, its input array, the crop) for a decoded photo: the served preprocessing."""
    # = preprocess_bytes(data, preprocessing=...), what training's preprocess_path gives, without a second decode
    arr, crop = model_input_and_crop(img, p.preprocessing)
    return (crop_relative(img, crop) if crop is not None else img), arr, crop


def stored_screening(data: bytes, label: str, probability: float, threshold: float) -> Screening:
    """A kept photo with its kept answer, ready for ``heatmap``: decoded and prepared as ``screen`` does, but
    neither gated nor predicted again (it explains the answer that was given, and counts no new prediction)."""
    p = require_ready()
    img, arr, crop = _model_input(open_image(data), p)
    return Screening(label, probability, threshold, p.card or {}, 0.0, 0.0, img, arr, crop)


def heatmap(s: Screening) -> np.ndarray | None:
    """Grad-CAM of the answered class for ``s``, or None when it fails (logged: never fails the request)."""
    p = predictor()
    metrics = current_app.extensions["aisight"]["metrics"]
    t0 = time.perf_counter()
    try:
        model = p.explain_model()  # waits only in the first seconds after start (OpenVINO serving)
        heat = explain.gradcam(model, s.model_input, s.card.get("gradcam_layer"), class_index=CLASS_INDEX[s.label])
    except Exception:  # noqa: BLE001 - the result stands without its heatmap
        log.warning("Grad-CAM failed on %s; answering without a heatmap", request.path, exc_info=True)
        metrics.explain_failures.inc()
        return None
    metrics.stage.labels("explain").observe(time.perf_counter() - t0)
    return heat


def api_explanation(s: Screening) -> dict[str, Any] | None:
    """The ``explanation`` member of the API answer: the heatmap blended over the photo, as a base64 PNG."""
    heat = heatmap(s)
    if heat is None:
        return None
    try:
        png = explain.overlay_png(s.photo, heat)
        layer = explain.target_layer(predictor().explain_model(), s.card.get("gradcam_layer"))
    except Exception:  # noqa: BLE001 - as in heatmap(): the result stands
        log.warning("Grad-CAM overlay failed on %s; answering without it", request.path, exc_info=True)
        current_app.extensions["aisight"]["metrics"].explain_failures.inc()
        return None
    with Image.open(io.BytesIO(png)) as im:  # the header only: the size the overlay came out at
        width, height = im.size
    return {
        "png_base64": base64.b64encode(png).decode("ascii"),
        "media_type": "image/png",
        "width": width,
        "height": height,
        "layer": layer,
        "class": s.label,
    }


def display_jpeg(
    data: bytes, max_side: int = DISPLAY_MAX_SIDE, crop: tuple[float, float, float, float] | None = None
) -> tuple[bytes, int, int]:
    """Return the upload, upright and downscaled (and cropped as the model's input was), as JPEG bytes
    plus its width and height."""
    # Draft to at least half the display size: a 12 MP JPEG then decodes at 1/4 scale (1000x750), not 1/2.
    img = open_image(data, draft_size=(max_side // 2, max_side // 2))
    if crop is not None:
        img = crop_relative(img, crop)
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), img.width, img.height


def display_image(
    data: bytes, max_side: int = DISPLAY_MAX_SIDE, crop: tuple[float, float, float, float] | None = None
) -> tuple[str, int, int]:
    """``display_jpeg`` as a data: URL (the result page embeds it: nothing is written to disk)."""
    jpeg, width, height = display_jpeg(data, max_side, crop)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"), width, height


def page_heatmap(s: Screening) -> dict[str, Any] | None:
    """The result page's heatmap layer: a small RGBA PNG (data: URL) the browser stretches over the photo."""
    heat = heatmap(s)
    if heat is None:
        return None
    side = max(HEATMAP_LAYER_SIDE, *heat.shape)
    try:
        png = explain.heatmap_png(heat, (side, side), alpha=HEATMAP_LAYER_ALPHA)
    except Exception:  # noqa: BLE001 - as in heatmap(): the result stands
        log.warning("heatmap PNG failed; showing the result without it", exc_info=True)
        current_app.extensions["aisight"]["metrics"].explain_failures.inc()
        return None
    return {
        "url": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        # An all-zero map: no region raised the answered class's score more than another.
        "flat": not bool(np.any(heat > 0)),
    }
