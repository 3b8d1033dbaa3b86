"""Refuse instead of guessing: is an upload a gradable colour fundus photograph?

``check_fundus`` measures a downscaled copy of the upload (pure numpy and Pillow, a few milliseconds)
and returns a ``GateVerdict``. A colour fundus photograph is a round, bright, orange-red field of view
on a black surround; it is gradable when it is large enough, neither too dark nor washed out, and
sharp enough to show vessels. Every threshold below was set from the distributions that
``bench/gate_thresholds.py`` measures on the 2312 real photos of fundus-eye4, on non-fundus images and
on ungradable copies of real photos; docs/gate.md records those numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from aisight.preprocess import to_rgb

# --- Working resolutions -------------------------------------------------------------------------
SHAPE_SIDE = 128  # field-of-view shape, colour and exposure: coarse structure only
FOCUS_SIDE = 256  # sharpness needs finer detail; never upsampled (a 160 px upload is measured at 160)

# --- Thresholds ----------------------------------------------------------------------------------
# Numbers in brackets: measured by bench/gate_thresholds.py on the 2312 real photos of fundus-eye4
# ("real", percentiles p0 = min) and on ungradable copies of every 8th of them; docs/gate.md has more.
MIN_SIDE = 128  # px, the upload's shorter side: the model's input is 128x128 [real min 264]
MIN_FIELD_DIAMETER = 96  # px across the field in the upload (3/4 of the model input) [real min 250]
DARK_LEVEL = 8.0  # max-channel level that separates the black surround from the field [real corners p99 3]
DARK_P99 = 45.0  # too dark: the brightest 1% of the image stays below [real min 38, p0.5 73; x0.15 copies max 38]
FIT_IOU_MIN = 0.85  # field vs the fitted circle/ellipse, intersection over union [real p0.5 0.86, p1 0.94]
RADIUS_RANGE = (0.35, 0.85)  # fitted radius / shorter image side [real 0.40 to 0.83]
CENTRE_OFFSET_MAX = 0.2  # fitted centre's distance from the image centre / shorter side [real p99 0.07]
SURROUND_MAX = 0.45  # mean level outside the fit / mean level inside [real p99 0.26; photos 0.6 to 1.3]
ASPECT_MIN = 0.6  # shorter / longer axis for an ellipse fit (photos stretched to a square) [real min 0.60]
RED_BLUE_MIN = 1.05  # mean red / mean blue in the field [real p0.5 1.11; grey images 1.00]
CLIPPED_MAX = 0.15  # too bright: share of the field with 2+ channels >= 250 [real p99 0.04; over-exposed min 0.21]
FOCUS_MIN = 0.22  # blurred: fine / coarse detail energy in the field [real p0.5 0.28; blurred copies max 0.19]

# Quantisation of 8-bit channels leaves this much (luminance std) in the finest band of any image,
# however blurred; subtracting it keeps nearly flat images from looking sharp.
_QUANT_NOISE = 0.2
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

MESSAGES: dict[str, tuple[str, str]] = {
    "not_fundus": (
        "This does not look like a colour fundus photograph (a photo of the retina at the back of the eye).",
        "Take the photo through the fundus camera and upload the full retina image: the round, orange-red "
        "view of the retina on a black background, not a cropped part, a screenshot or a photo of a screen.",
    ),
    "too_dark": (
        "The photo is too dark to grade.",
        "Retake it with the flash on and the pupil well dilated, then upload the full retina image.",
    ),
    "too_bright": (
        "The photo is over-exposed: much of the retina is washed out, too bright to show any detail.",
        "Retake it with less flash, and upload the original image rather than an edited copy.",
    ),
    "blurred": (
        "The photo is too blurred to grade: the vessels and the edge of the optic disc are not sharp.",
        "Refocus the fundus camera and retake the photo, and upload the original file, not a resized copy. "
        "If every photo of this eye stays blurred (a cataract can cause this), refer the patient for an "
        "in-person examination.",
    ),
    "too_small": (
        "The image is too small to grade: it needs at least {min_side} pixels on each side, with the round "
        "retina image filling most of it.",
        "Upload the original photo from the fundus camera, not a thumbnail or a preview.",
    ),
    "ok": ("The photo looks like a gradable colour fundus photograph.", ""),
}


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer: whether to classify, and if not, why, in words a person can act on."""

    ok: bool
    code: str  # "ok" | "not_fundus" | "too_dark" | "too_bright" | "blurred" | "too_small"
    message: str
    hint: str
    measures: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Return a JSON-ready dict (measures hold finite floats only)."""
        return asdict(self)


def gate_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the gate is on: ``AISIGHT_GATE=off`` (or 0/false/no) switches it off; on by default."""
    value = (os.environ if environ is None else environ).get("AISIGHT_GATE", "on")
    return value.strip().lower() not in ("off", "0", "false", "no")


def check_fundus(img: Image.Image, original_size: tuple[int, int] | None = None) -> GateVerdict:
    """Decide whether ``img`` (upright RGB, as ``open_image`` returns it) is a gradable fundus photo.

    ``original_size`` is the upload's (width, height) before any draft decoding; without it the
    size of ``img`` stands in for it.
    """
    return decide(measure(img, original_size))


def verdict(code: str, measures: dict[str, float] | None = None) -> GateVerdict:
    """Build the verdict for ``code`` with its plain-language message and hint."""
    message, hint = MESSAGES[code]
    return GateVerdict(code == "ok", code, message.format(min_side=MIN_SIDE), hint, dict(measures or {}))


def decide(m: dict[str, float]) -> GateVerdict:
    """Apply the thresholds to measures from ``measure``; the first failing check names the refusal."""
    code = refusal(m) or "ok"
    return verdict(code, m)


# The checks in the order they run: (name, refusal code, fails?). A check runs only when its measure
# exists; "field" fails when no field of view was found, and then no later shape/colour check can run.
CHECKS: tuple[tuple[str, str, Callable[[dict[str, float]], bool]], ...] = (
    ("min_side", "too_small", lambda m: m["min_side"] < MIN_SIDE),
    # Nothing bright anywhere: an under-exposed photo (or a black frame), whatever it shows.
    ("p99", "too_dark", lambda m: m["p99"] < DARK_P99),
    ("field", "not_fundus", lambda m: "red_blue" not in m),
    # Shape: a round (or evenly stretched) field on a dark surround.
    ("fit_iou", "not_fundus", lambda m: m["fit_iou"] < FIT_IOU_MIN),
    ("radius", "not_fundus", lambda m: not RADIUS_RANGE[0] <= m["radius"] <= RADIUS_RANGE[1]),
    ("centre_offset", "not_fundus", lambda m: m["centre_offset"] > CENTRE_OFFSET_MAX),
    ("surround", "not_fundus", lambda m: m["surround"] > SURROUND_MAX),
    ("field_diameter", "too_small", lambda m: m["field_diameter"] < MIN_FIELD_DIAMETER),
    # Washed out before colour: a blown-out field loses its colour, but it is still a fundus photo.
    ("clipped", "too_bright", lambda m: m["clipped"] > CLIPPED_MAX),
    ("red_blue", "not_fundus", lambda m: m["red_blue"] < RED_BLUE_MIN),
    ("focus", "blurred", lambda m: m["focus"] < FOCUS_MIN),
)


def failed_checks(m: dict[str, float]) -> list[str]:
    """Names of every check that measures ``m`` fail (the first one decides the refusal)."""
    return [name for name, _, fails in CHECKS if (name == "field" or name in m) and fails(m)]


def refusal(m: dict[str, float]) -> str | None:
    """Return the refusal code for measures ``m``, or None when every check passes."""
    for name, code, fails in CHECKS:
        if (name == "field" or name in m) and fails(m):
            return code
    return None


def measure(img: Image.Image, original_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Measure size, brightness, field-of-view shape, colour, exposure and focus of ``img``.

    Measures that need a field of view are absent when none is found. All values are finite floats.
    """
    return {k: round(float(x), 4) for k, x in _measure(img, original_size).items()}


def _measure(img: Image.Image, original_size: tuple[int, int] | None) -> dict[str, float]:
    ow, oh = original_size or img.size
    m: dict[str, float] = {"min_side": float(min(ow, oh))}
    if img.mode != "RGB":  # open_image already gives RGB; anything else is converted the same way
        img = to_rgb(img)
    # One resize from the upload, then a cheap one from that copy.
    small = _shrink(img, FOCUS_SIDE)
    # Undoes draft decoding and the downscale; by area, so an EXIF rotation (w and h swapped) is harmless.
    to_original = math.sqrt(ow * oh / (small.width * small.height))
    a = np.asarray(_shrink(small, SHAPE_SIDE), dtype=np.float32)
    # Some photos are padded with white or grey bars (scans, exports): drop uniform bright edges.
    v = _channel_max(a)
    box = _trim_box(v)
    if box is None:
        m["p99"] = _p99(v)
        return m
    h0, w0 = a.shape[:2]
    if box != (0, 0, w0, h0):
        sx, sy = small.width / w0, small.height / h0
        small = small.crop((round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)))
        a = np.asarray(_shrink(small, SHAPE_SIDE), dtype=np.float32)
        v = _channel_max(a)
        m["trimmed"] = 1.0
    h, w = v.shape
    m["p99"] = _p99(v)
    raw = v > DARK_LEVEL
    # Opening drops thin bright marks outside the field (date stamps, notches) before filling rows.
    filled = _fill(_open(raw, 2))
    m["fov_fraction"] = float(filled.mean())
    fit = _best_fit(filled)
    if fit is None:
        return m
    (cx, cy, rx, ry), m["fit_iou"], d2 = fit
    r = math.sqrt(rx * ry)
    m["radius"] = r / min(h, w)
    m["aspect"] = min(rx, ry) / max(rx, ry)
    m["centre_offset"] = float(math.hypot(cx - (w - 1) / 2, cy - (h - 1) / 2) / min(h, w))
    m["field_diameter"] = 2 * min(rx, ry) * small.width / w * to_original
    outside = d2 > ((r + 2) / r) ** 2
    field_px = raw & (d2 <= 0.92**2)  # inside the rim, where vignetting and glare stay out
    m["outside_fraction"] = float(outside.mean())
    if np.count_nonzero(field_px) < 20:
        return m
    m["surround"] = float(v[outside].mean() / max(1.0, float(v[field_px].mean()))) if outside.any() else 0.0
    rgb = a[field_px]
    mr, mg, mb = rgb.mean(axis=0)
    m["red_blue"] = float(mr / max(mb, 1.0))
    m["red_green"] = float(mr / max(mg, 1.0))
    m["brightness"] = float((rgb @ _LUMA).mean())
    m["clipped"] = float(np.mean(np.count_nonzero(rgb >= 250, axis=1) >= 2))
    k = small.width / w
    focus = _focus(np.asarray(small, dtype=np.float32), (cx * k, cy * k, rx * k, ry * k))
    # No room inside the rim to measure sharpness (a sliver of a field) counts as not sharp.
    m["focus"] = 0.0 if focus is None else focus
    return m


def _shrink(img: Image.Image, side: int) -> Image.Image:
    """Return ``img`` scaled so its longer side is ``side``; never enlarged (that would fake blur)."""
    w, h = img.size
    s = min(1.0, side / max(w, h))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _p99(v: np.ndarray) -> float:
    """99th percentile (lower value), by partial sort: much cheaper than np.percentile here."""
    flat = v.ravel()
    k = int(0.99 * (flat.size - 1))
    return float(np.partition(flat, k)[k])


def _channel_max(a: np.ndarray) -> np.ndarray:
    """Per-pixel max over R, G, B (much faster than ``a.max(axis=2)`` on a 3-long axis)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _trim_box(v: np.ndarray, std_max: float = 10.0, level_min: float = 60.0) -> tuple[int, int, int, int] | None:
    """Box (left, top, right, bottom) without uniform bright edge rows/columns; None if nothing is left."""

    def run(flags: np.ndarray) -> int:
        return int(np.argmin(flags)) if not flags.all() else len(flags)

    rows = (v.std(axis=1) < std_max) & (v.mean(axis=1) > level_min)
    cols = (v.std(axis=0) < std_max) & (v.mean(axis=0) > level_min)
    top, bottom = run(rows), len(rows) - run(rows[::-1])
    left, right = run(cols), len(cols) - run(cols[::-1])
    if bottom - top < 16 or right - left < 16:
        return None
    return left, top, right, bottom


def _fill(mask: np.ndarray) -> np.ndarray:
    """Fill each row and each column between its first and last set pixel, keeping the intersection.

    For a disk clipped by the frame this fills dark holes (macula, haemorrhages) without scipy.
    """

    def rows(a: np.ndarray) -> np.ndarray:
        first = a.argmax(axis=1)
        last = a.shape[1] - 1 - a[:, ::-1].argmax(axis=1)
        idx = np.arange(a.shape[1])
        return a.any(axis=1)[:, None] & (idx >= first[:, None]) & (idx <= last[:, None])

    return rows(mask) & rows(mask.T).T


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion that treats the frame as inside (a field cut by the frame has no edge there)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _best_fit(filled: np.ndarray) -> tuple[tuple[float, float, float, float], float, np.ndarray] | None:
    """Fit a circle and an axis-aligned ellipse to the field's edge; keep the one that overlaps it best.

    Returns ((cx, cy, rx, ry), IoU with the field, normalised squared distance map: 1 on the fit).
    An ellipse flatter than ASPECT_MIN is not a candidate: when the frame cuts the top and bottom of
    the field, only the side arcs are seen and the ellipse's height is unconstrained.
    """
    x, y = _edge_points(filled)
    if len(x) < 10:
        return None
    h, w = filled.shape
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    best = None
    for fit in (_fit_circle(x, y), _fit_ellipse(x, y)):
        if fit is None or min(fit[2], fit[3]) / max(fit[2], fit[3]) < ASPECT_MIN:
            continue
        cx, cy, rx, ry = fit
        d2 = np.square((xx - cx) / rx) + np.square((yy - cy) / ry)  # broadcast to (h, w)
        inside = d2 <= 1.0
        iou = np.count_nonzero(inside & filled) / max(1, np.count_nonzero(inside | filled))
        if best is None or iou > best[1]:
            best = (fit, iou, d2)
    return best


def _edge_points(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x, y) of the mask's edge pixels away from the frame."""
    ys, xs = np.nonzero(mask & ~_erode(mask))
    return xs.astype(np.float64), ys.astype(np.float64)


def _open(mask: np.ndarray, n: int) -> np.ndarray:
    """Morphological opening: ``n`` erosions then ``n`` dilations (removes marks thinner than 2n px)."""
    out = mask
    for _ in range(n):
        out = _erode(out)
    for _ in range(n):
        out = ~_erode(~out)
    return out


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float] | None:
    """Least-squares circle through the points, as an ellipse (cx, cy, r, r)."""
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(design, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2, -e / 2
    r2 = cx * cx + cy * cy - f
    if not np.isfinite(r2) or r2 <= 1.0:
        return None
    r = math.sqrt(r2)
    return float(cx), float(cy), r, r


def _fit_ellipse(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float] | None:
    """Least-squares axis-aligned ellipse (cx, cy, rx, ry) through the points.

    Axis-aligned because a round field only becomes an ellipse when a photo is resized without
    keeping its aspect ratio (as some collections do).
    """
    # A x^2 + C y^2 + D x + E y = 1, centred first for a well-conditioned solve.
    mx, my = x.mean(), y.mean()
    x, y = x - mx, y - my
    design = np.stack([x * x, y * y, x, y], axis=1)
    (qa, qc, qd, qe), *_ = np.linalg.lstsq(design, np.ones_like(x), rcond=None)
    if not (qa > 0 and qc > 0):
        return None
    k = 1 + qd * qd / (4 * qa) + qe * qe / (4 * qc)
    if not np.isfinite(k) or k <= 0:
        return None
    return float(mx - qd / (2 * qa)), float(my - qe / (2 * qc)), float(math.sqrt(k / qa)), float(math.sqrt(k / qc))


def _gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array, truncated at 2.5 sigma (edges replicated)."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = a.shape
    p = np.concatenate([np.repeat(a[:, :1], r, axis=1), a, np.repeat(a[:, -1:], r, axis=1)], axis=1)
    out = k[0] * p[:, :w]
    for i in range(1, len(k)):
        out += k[i] * p[:, i : i + w]
    p = np.concatenate([np.repeat(out[:1], r, axis=0), out, np.repeat(out[-1:], r, axis=0)], axis=0)
    res = k[0] * p[:h]
    for i in range(1, len(k)):
        res += k[i] * p[i : i + h]
    return res


def _half(a: np.ndarray) -> np.ndarray:
    """2x2 block mean (odd last row/column dropped)."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return (a[0:h:2, 0:w:2] + a[1:h:2, 0:w:2] + a[0:h:2, 1:w:2] + a[1:h:2, 1:w:2]) * 0.25


def _focus(g: np.ndarray, field: tuple[float, float, float, float]) -> float | None:
    """Fine-detail energy over coarse-detail energy inside the field (contrast- and exposure-free).

    Blur removes the finest band first, so the ratio falls with defocus while a dim or low-contrast
    but sharp photo keeps it. ``g`` is the RGB working copy (longer side at most FOCUS_SIDE);
    ``field`` is the fitted ellipse (cx, cy, rx, ry) in its pixels.
    """
    h, w = g.shape[:2]
    lum = g @ _LUMA
    g1 = _gauss(lum, 1.0)
    # The coarse band at half resolution: sigma 2 there is sigma 4 here, at a quarter of the cost.
    h1 = _half(g1)
    coarse_band = h1 - _gauss(h1, 2.0)
    cx, cy, rx, ry = field
    # Keep the coarse blur's reach (~2.5 sigma = 10 px here) plus a margin away from the rim, whose
    # edge would count as detail.
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    margin = 14.0
    if min(rx, ry) <= margin:
        return None
    inner = (np.square((xx - cx) / (rx - margin)) + np.square((yy - cy) / (ry - margin)) <= 1.0) & (lum > DARK_LEVEL)
    inner_half = _half(inner.astype(np.float32)) == 1.0
    if np.count_nonzero(inner) < 50 or np.count_nonzero(inner_half) < 12:
        return None
    fine = float((lum - g1)[inner].std())
    coarse = float(coarse_band[inner_half].std())
    fine = math.sqrt(max(fine * fine - _QUANT_NOISE**2, 0.0))
    return fine / max(coarse, 0.05)
