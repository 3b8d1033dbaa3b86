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
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache

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
# A near-grey photo passes the colour check when it still has some colour: 8 of 2312 real photos are
# desaturated (red/blue 0.97-1.04, chroma 4.4-69), while greyscale drawings and scans have chroma 0 and a
# colour wheel 156.
NEAR_GREY = (0.95, 2.0, 100.0)  # lowest red/blue, chroma range
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
    ("red_blue", "not_fundus", lambda m: m["red_blue"] < RED_BLUE_MIN and not _near_grey_photo(m)),
    ("focus", "blurred", lambda m: m["focus"] < FOCUS_MIN),
)


def _near_grey_photo(m: dict[str, float]) -> bool:
    low, chroma_min, chroma_max = NEAR_GREY
    return m["red_blue"] >= low and chroma_min <= m.get("chroma", 0.0) <= chroma_max


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
    # The measures work on 8-bit pixels where they can: integer sums and counts are exact, so they equal
    # the float32 means and percentiles the thresholds were calibrated on, at a fraction of the cost.
    g8 = np.asarray(small)
    a8 = np.asarray(_shrink(small, SHAPE_SIDE))
    # Some photos are padded with white or grey bars (scans, exports): drop uniform bright edges.
    v8 = _channel_max(a8)
    box = _trim_box(v8)
    if box is None:
        m["p99"] = _p99(v8)
        return m
    h0, w0 = v8.shape
    if box != (0, 0, w0, h0):
        sx, sy = small.width / w0, small.height / h0
        small = small.crop((round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)))
        g8 = np.asarray(small)
        a8 = np.asarray(_shrink(small, SHAPE_SIDE))
        v8 = _channel_max(a8)
        m["trimmed"] = 1.0
    h, w = v8.shape
    m["p99"] = _p99(v8)
    raw = v8 > math.floor(DARK_LEVEL)  # integer levels: v > 8.0 exactly when v > 8
    # Opening drops thin bright marks outside the field (date stamps, notches) before filling rows.
    filled = _fill(_open(raw, 2))
    m["fov_fraction"] = np.count_nonzero(filled) / filled.size
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
    n_outside = np.count_nonzero(outside)
    m["outside_fraction"] = n_outside / outside.size
    n_field = np.count_nonzero(field_px)
    if n_field < 20:
        return m
    levels = v8.ravel().astype(np.float32)
    field_level = _mean_level(levels, field_px, n_field)
    m["surround"] = float(_mean_level(levels, outside, n_outside) / max(1.0, float(field_level))) if n_outside else 0.0
    rgb = _pixels_at(a8, field_px).astype(np.float32)  # (n_field, 3), the same array as ever
    # Sums of 8-bit values below 2**24 are exact in float32 whatever the order, so a dot product gives
    # numpy's float32 sums; then the same division as numpy's mean.
    sums = np.ones(n_field, np.float32) @ rgb
    mr, mg, mb = np.true_divide(sums, np.intp(n_field), out=sums, casting="unsafe")
    m["red_blue"] = float(mr / max(mb, 1.0))
    m["red_green"] = float(mr / max(mg, 1.0))
    # Colourfulness: mean spread between a pixel's channels. A near-grey fundus photo (desaturated by
    # its camera or export) still has some; a greyscale drawing or scan has none.
    m["chroma"] = float((rgb.max(axis=1) - rgb.min(axis=1)).mean())
    # A weighted sum of non-integers: the same float32 product and mean as ever, so the same value.
    m["brightness"] = float((rgb @ _LUMA).mean())
    hi = rgb >= 250
    n_clipped = 0
    if np.count_nonzero(hi) >= 2:  # usually no channel of any pixel is near saturation
        votes = hi.view(np.uint8)
        n_clipped = np.count_nonzero(votes[:, 0] + votes[:, 1] + votes[:, 2] >= 2)
    m["clipped"] = n_clipped / n_field
    k = small.width / w
    focus = _focus(g8, (cx * k, cy * k, rx * k, ry * k))
    # No room inside the rim to measure sharpness (a sliver of a field) counts as not sharp.
    m["focus"] = 0.0 if focus is None else focus
    return m


_workspace = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """This thread's work array ``name`` of ``shape`` and ``dtype``, reused from call to call (contents undefined).

    New arrays of a few hundred kB are fresh pages from the OS whenever the allocator has handed the last
    ones back, at a page fault per 4 kB; keeping them per thread saves that on every request.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = getattr(_workspace, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1), np.uint8)
        setattr(_workspace, name, buf)
    return buf[:nbytes].view(dtype).reshape(shape)


def _shrink(img: Image.Image, side: int) -> Image.Image:
    """Return ``img`` scaled so its longer side is ``side``; never enlarged (that would fake blur)."""
    w, h = img.size
    s = min(1.0, side / max(w, h))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _p99(v: np.ndarray) -> float:
    """99th percentile (lower value) of 8-bit levels, from their histogram: what a partial sort would pick."""
    k = int(0.99 * (v.size - 1))
    return float(np.searchsorted(np.cumsum(np.bincount(v.ravel(), minlength=256)), k, side="right"))


def _mean_level(levels: np.ndarray, mask: np.ndarray, count: int) -> np.float32:
    """``v[mask].mean()`` for float32 8-bit levels ``levels`` (v flattened) and a ``mask`` of ``count`` pixels.

    The masked sum is a dot product with the mask: exact (integers below 2**24), so equal to numpy's sum;
    it is then divided as numpy's mean divides it.
    """
    total = np.float32(levels @ mask.ravel().astype(np.float32))
    return np.float32(total / np.intp(count))


def _pixels_at(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``a[mask]`` for uint8 (h, w, 3) pixels ``a``: gathered as whole 3-byte pixels (numpy is slow per channel)."""
    if a.strides[2] != 1:
        return a[mask]
    return a.view(np.dtype((np.void, 3)))[..., 0][mask].view(np.uint8).reshape(-1, 3)


def _channel_max(a: np.ndarray) -> np.ndarray:
    """Per-pixel max over R, G, B (much faster than ``a.max(axis=2)`` on a 3-long axis)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _trim_box(v: np.ndarray, std_max: float = 10.0, level_min: float = 60.0) -> tuple[int, int, int, int] | None:
    """Box (left, top, right, bottom) without uniform bright edge rows/columns; None if nothing is left.

    ``v`` holds 8-bit levels. Usually no edge row or column is brighter than ``level_min`` on average, so
    none can start a bar and the whole image stays; only otherwise are the deviations computed.
    """
    h, w = v.shape
    edges = (v[0], v[-1], v[:, 0], v[:, -1])
    if h >= 16 and w >= 16 and all(int(e.sum(dtype=np.int64)) <= level_min * e.size for e in edges):
        return 0, 0, w, h
    return _trim_box_float(v.astype(np.float32), std_max, level_min)


def _trim_box_float(v: np.ndarray, std_max: float, level_min: float) -> tuple[int, int, int, int] | None:
    """``_trim_box`` on float levels, computing every row's and column's mean and deviation."""

    def run(flags: np.ndarray) -> int:
        return int(np.argmin(flags)) if not flags.all() else len(flags)

    rows = (v.std(axis=1) < std_max) & (v.mean(axis=1) > level_min)
    cols = (v.std(axis=0) < std_max) & (v.mean(axis=0) > level_min)
    top, bottom = run(rows), len(rows) - run(rows[::-1])
    left, right = run(cols), len(cols) - run(cols[::-1])
    if bottom - top < 16 or right - left < 16:
        return None
    return left, top, right, bottom


@lru_cache(maxsize=16)
def _spans(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables of masks over ``n`` pixels: row f of the first is ``i >= f``, row l of the second ``i < l``."""
    i = np.arange(n)
    return i >= np.arange(n + 1)[:, None], i < np.arange(n + 1)[:, None]


def _fill(mask: np.ndarray) -> np.ndarray:
    """Fill each row and each column between its first and last set pixel, keeping the intersection.

    For a disk clipped by the frame this fills dark holes (macula, haemorrhages) without scipy.
    """
    h, w = mask.shape
    # Per row: the span from the first set pixel to one past the last, looked up rather than compared.
    starts, stops = _spans(w)
    first, stop = mask.argmax(axis=1), w - mask[:, ::-1].argmax(axis=1)
    first[~mask.any(axis=1)] = w  # an empty row fills nothing
    out = starts[first]
    out &= stops[stop]
    starts, stops = _spans(h)
    first, stop = mask.argmax(axis=0), h - mask[::-1].argmax(axis=0)
    first[~mask.any(axis=0)] = h
    cols = starts[first]
    cols &= stops[stop]
    out &= cols.T
    return out


def _erode(mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """4-neighbour erosion that treats the frame as inside (a field cut by the frame has no edge there)."""
    if out is None:
        out = mask.copy()
    else:
        out[...] = mask
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
    n_filled = np.count_nonzero(filled)
    best = None
    for fit in (_fit_circle(x, y), _fit_ellipse(x, y)):
        if fit is None or min(fit[2], fit[3]) / max(fit[2], fit[3]) < ASPECT_MIN:
            continue
        cx, cy, rx, ry = fit
        d2 = np.square((xx - cx) / rx) + np.square((yy - cy) / ry)  # broadcast to (h, w)
        inside = d2 <= 1.0
        n_inside = np.count_nonzero(inside)
        n_both = np.count_nonzero(inside & filled)
        # |A or B| = |A| + |B| - |A and B|: one mask operation fewer
        iou = n_both / max(1, n_inside + n_filled - n_both)
        if best is None or iou > best[1]:
            best = (fit, iou, d2)
    return best


def _edge_points(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x, y) of the mask's edge pixels away from the frame."""
    edge = _erode(mask)
    np.greater(mask, edge, out=edge)  # set in the mask, not in its erosion
    ys, xs = np.nonzero(edge)
    return xs.astype(np.float64), ys.astype(np.float64)


def _open(mask: np.ndarray, n: int) -> np.ndarray:
    """Morphological opening: ``n`` erosions then ``n`` dilations (removes marks thinner than 2n px)."""
    if n < 1:
        return mask.copy()
    # Two buffers, used in turn: no new array per step.
    src, dst = mask, np.empty_like(mask)
    spare = np.empty_like(mask)
    for _ in range(n):
        _erode(src, dst)
        src, dst = dst, (spare if src is mask else src)
    np.logical_not(src, out=src)  # a dilation is the erosion of the complement
    for _ in range(n):
        _erode(src, dst)
        src, dst = dst, src
    np.logical_not(src, out=src)
    return src


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


@lru_cache(maxsize=8)
def _kernel(sigma: float) -> np.ndarray:
    """Normalised float32 Gaussian taps out to 2.5 sigma (read-only: it is shared)."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    k.flags.writeable = False
    return k


def _gauss(a: np.ndarray, sigma: float, name: str = "gauss") -> np.ndarray:
    """Separable Gaussian blur of a 2-D float32 array, truncated at 2.5 sigma (edges replicated).

    Every output is the same float32 sum, tap by tap in the same order, as a plain row-by-row blur; the
    rows are laid end to end with their replicated margins so that each tap is one contiguous numpy loop
    over the whole buffer (sums that straddle two rows fall in the margins, which are cut off). The
    result lives in this thread's work arrays ``name``, valid until the next call with that name.
    """
    k = _kernel(sigma)
    r = len(k) // 2
    h, w = a.shape
    wide = w + 2 * r
    p = _scratch(name + ".p", (h, wide), np.float32)  # a with r replicated columns each side
    p[:, r : r + w] = a
    p[:, :r] = a[:, :1]
    p[:, r + w :] = a[:, -1:]
    q = _scratch(name + ".q", (h + 2 * r, wide), np.float32)  # the horizontal pass, r replicated rows each side
    n = h * wide - 2 * r
    src, out = p.ravel(), q[r : r + h].ravel()
    tmp = _scratch(name + ".tmp", (h * wide,), np.float32)
    np.multiply(src[:n], k[0], out=out[:n])
    for i in range(1, len(k)):
        out[:n] += np.multiply(src[i : i + n], k[i], out=tmp[:n])
    out[n:] = 0.0  # the last row's margin: never used, kept finite
    q[:r] = q[r]
    q[r + h :] = q[r + h - 1]
    src, n = q.ravel(), h * wide
    res = np.multiply(src[:n], k[0], out=p.ravel())  # p is spent: the result goes there
    for i in range(1, len(k)):
        res += np.multiply(src[i * wide : i * wide + n], k[i], out=tmp)
    return res.reshape(h, wide)[:, :w]


def _half(a: np.ndarray) -> np.ndarray:
    """2x2 block mean (odd last row/column dropped)."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    out = np.add(a[0:h:2, 0:w:2], a[1:h:2, 0:w:2])
    out += a[0:h:2, 1:w:2]
    out += a[1:h:2, 1:w:2]
    out *= 0.25
    return out


def _grow(box: tuple[int, int, int, int], by: int, h: int, w: int) -> tuple[int, int, int, int]:
    """``box`` widened by ``by`` pixels on every side, within an (h, w) image."""
    return max(box[0] - by, 0), min(box[1] + by, h), max(box[2] - by, 0), min(box[3] + by, w)


def _luminance(g8: np.ndarray, chunk: int = 64) -> np.ndarray:
    """``g8.astype(float32) @ _LUMA``, a band of rows at a time (the same per-row products, less memory)."""
    h, w = g8.shape[:2]
    lum = _scratch("focus.lum", (h, w), np.float32)
    rgb = _scratch("focus.rgb", (min(chunk, h), w, 3), np.float32)
    for top in range(0, h, chunk):
        band = g8[top : top + chunk]
        np.copyto(rgb[: len(band)], band)
        # numpy multiplies a stack of rows row by row, so a band gives the rows of the whole image bit for bit.
        np.matmul(rgb[: len(band)], _LUMA, out=lum[top : top + len(band)])
    return lum


def _focus(g8: np.ndarray, field: tuple[float, float, float, float]) -> float | None:
    """Fine-detail energy over coarse-detail energy inside the field (contrast- and exposure-free).

    Blur removes the finest band first, so the ratio falls with defocus while a dim or low-contrast
    but sharp photo keeps it. ``g8`` is the uint8 RGB working copy (longer side at most FOCUS_SIDE);
    ``field`` is the fitted ellipse (cx, cy, rx, ry) in its pixels.
    """
    h, w = g8.shape[:2]
    lum = _luminance(g8)
    cx, cy, rx, ry = field
    # Keep the coarse blur's reach (~2.5 sigma = 10 px here) plus a margin away from the rim, whose
    # edge would count as detail.
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    margin = 14.0
    if min(rx, ry) <= margin:
        return None
    # The inner ellipse, computed over its bounding box only, 2 px wider: with coordinates this small the
    # float32 rounding cannot bring a pixel further out inside. Same float32 arithmetic per pixel as ever.
    ax, ay = rx - margin, ry - margin
    t, b, le, ri = 0, h, 0, w
    if max(abs(cx), abs(cy), ax, ay) < 4096:
        t, b = max(math.floor(cy - ay) - 2, 0), min(math.ceil(cy + ay) + 3, h)
        le, ri = max(math.floor(cx - ax) - 2, 0), min(math.ceil(cx + ax) + 3, w)
    inner = np.zeros((h, w), bool)
    if t < b and le < ri:
        box = np.square((xx[:, le:ri] - cx) / ax) + np.square((yy[t:b] - cy) / ay) <= 1.0
        np.logical_and(box, lum[t:b, le:ri] > DARK_LEVEL, out=inner[t:b, le:ri])
    # Half resolution: a pixel whose 2x2 block lies wholly inside.
    h2, w2 = h // 2, w // 2
    inner_half = inner[0 : 2 * h2 : 2, 0 : 2 * w2 : 2] & inner[1 : 2 * h2 : 2, 0 : 2 * w2 : 2]
    inner_half &= inner[0 : 2 * h2 : 2, 1 : 2 * w2 : 2]
    inner_half &= inner[1 : 2 * h2 : 2, 1 : 2 * w2 : 2]
    if np.count_nonzero(inner) < 50 or np.count_nonzero(inner_half) < 12:
        return None
    # Both bands are needed only around the inner field, so the blurs run on crops around it (the inner
    # ellipse's box, and that box at half resolution). A blur of a crop that reaches the kernel's radius
    # past what is used (or the image's own edge, replicated as before) gives those pixels exactly the
    # values of a blur of the whole image.
    ht, hb, hl, hr = t // 2, min((b + 1) // 2, h2), le // 2, min((ri + 1) // 2, w2)
    ct, cb, cl, cr = _grow((ht, hb, hl, hr), len(_kernel(2.0)) // 2, h2, w2)  # coarse band's half-res crop
    need = (min(t, 2 * ct), max(b, 2 * cb), min(le, 2 * cl), max(ri, 2 * cr))  # fine blur needed here
    ft, fb, fl, fr = _grow(need, len(_kernel(1.0)) // 2, h, w)
    g1 = _gauss(lum[ft:fb, fl:fr], 1.0, "fine")
    fine_band = lum[t:b, le:ri] - g1[t - ft : b - ft, le - fl : ri - fl]
    # The coarse band at half resolution: sigma 2 there is sigma 4 here, at a quarter of the cost.
    h1 = _half(g1[2 * ct - ft : 2 * cb - ft, 2 * cl - fl : 2 * cr - fl])
    coarse_band = (h1 - _gauss(h1, 2.0, "coarse"))[ht - ct : hb - ct, hl - cl : hr - cl]
    fine = float(fine_band[inner[t:b, le:ri]].std())
    coarse = float(coarse_band[inner_half[ht:hb, hl:hr]].std())
    fine = math.sqrt(max(fine * fine - _QUANT_NOISE**2, 0.0))
    return fine / max(coarse, 0.05)
