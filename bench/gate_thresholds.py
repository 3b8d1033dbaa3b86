"""Measure the fundus gate: per-measure distributions, false refusals and false acceptances.

Runs ``aisight.gate`` over every real photo of fundus-eye4 (read exactly as the app reads uploads),
over non-fundus images (scikit-image's sample photos that load offline, plus generated screenshots,
documents, plain colours and gradients) and over ungradable copies of real photos (darkened,
blurred, shrunk, over-exposed). The numbers in docs/gate.md come from this script:

    PYTHONPATH=. .venv/bin/python bench/gate_thresholds.py [--data ../shared/data/fundus-eye4]

The image makers below are also what tests/unit/test_gate.py and tests/data/test_gate_real.py use.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("AISIGHT_DATA", ROOT.parent / "shared" / "data" / "fundus-eye4"))

# scikit-image sample images that ship with the package (no download). ``retina`` is a fundus photo
# and so a positive; the rest are negatives.
SKIMAGE_NEGATIVES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "rocket",
    "shepp_logan_phantom",
    "text",
    "binary_blobs",
)

# What each ungradable copy must be refused as.
DEGRADED_CODES = {"dark": "too_dark", "blurred": "blurred", "tiny": "too_small", "overexposed": "too_bright"}
# The measures behind each of those refusals, whose distributions the report prints.
DEGRADED_KEYS = {
    "dark": ("p99",),
    "blurred": ("focus",),
    "tiny": ("min_side",),
    "overexposed": ("clipped", "brightness"),
}


# --- Images ------------------------------------------------------------------------------------


def to_pil(arr: np.ndarray) -> Image.Image:
    """Turn a scikit-image array (bool, float in [0, 1], grey, RGBA) into an RGB image."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return Image.fromarray(arr).convert("RGB")


def skimage_images(names: tuple[str, ...] = SKIMAGE_NEGATIVES) -> dict[str, Image.Image]:
    """Load the named scikit-image samples that are available offline (others are skipped)."""
    import skimage.data

    out = {}
    for name in names:
        try:
            out[f"skimage.{name}"] = to_pil(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - missing optional data files (pooch, network) just skip
            continue
    return out


def skimage_retina() -> Image.Image:
    """scikit-image's colour fundus photograph (a positive)."""
    import skimage.data

    return to_pil(skimage.data.retina())


def generated_negatives(seed: int = 0) -> dict[str, Image.Image]:
    """Non-fundus images a user might upload by mistake, drawn with Pillow."""
    rng = np.random.default_rng(seed)
    out: dict[str, Image.Image] = {}

    # A light desktop screenshot: title bar, side bar, buttons, lines of text.
    img = Image.new("RGB", (1280, 800), (246, 246, 248))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 1280, 36), fill=(52, 58, 64))
    d.rectangle((0, 36, 240, 800), fill=(230, 232, 236))
    for i in range(14):
        d.text((20, 60 + 40 * i), f"Menu item {i}", fill=(40, 40, 40))
    for i in range(3):
        d.rounded_rectangle((280 + 160 * i, 60, 420 + 160 * i, 100), 8, fill=(13, 110, 253))
        d.text((300 + 160 * i, 72), "Button", fill=(255, 255, 255))
    for i in range(25):
        d.text((280, 130 + 25 * i), "Lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2, fill=(30, 30, 30))
    out["generated.screenshot_light"] = img

    # A dark-mode screenshot (dark surround!) with an orange avatar and text.
    img = Image.new("RGB", (1170, 2532), (18, 18, 18))
    d = ImageDraw.Draw(img)
    d.ellipse((60, 120, 260, 320), fill=(230, 120, 50))
    for i in range(60):
        d.text((60, 380 + 35 * i), "message text in a chat application " * 3, fill=(220, 220, 220))
    d.rounded_rectangle((60, 2350, 1110, 2450), 40, fill=(44, 44, 46))
    out["generated.screenshot_dark"] = img

    # A printed document: black text on white.
    img = Image.new("RGB", (850, 1100), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((80, 60), "REFERRAL LETTER", fill=(0, 0, 0))
    for i in range(45):
        d.text((80, 110 + 20 * i), "The patient was seen in clinic today and examined for " * 2, fill=(0, 0, 0))
    out["generated.document"] = img

    # Plain colours, including the fundus' own orange.
    for name, colour in {"black": (0, 0, 0), "white": (255, 255, 255), "orange": (200, 90, 40)}.items():
        out[f"generated.plain_{name}"] = Image.new("RGB", (600, 400), colour)

    # Gradients: linear and a radial orange glow on black (a round bright field, but no retina).
    x = np.linspace(0, 1, 512)[None, :, None]
    lin = np.broadcast_to(x * np.array([220, 110, 50]), (512, 512, 3))
    out["generated.gradient_linear"] = Image.fromarray(lin.astype(np.uint8))
    yy, xx = np.mgrid[0:512, 0:512]
    rad = np.clip(1 - np.hypot(xx - 256, yy - 256) / 240, 0, 1)[..., None] * np.array([220, 110, 50])
    out["generated.gradient_radial"] = Image.fromarray(rad.astype(np.uint8))

    # A flat orange disk on black: the shape and colour of a fundus, with nothing inside.
    img = Image.new("RGB", (512, 512), (0, 0, 0))
    ImageDraw.Draw(img).ellipse((20, 20, 492, 492), fill=(200, 90, 40))
    out["generated.flat_disk"] = img

    # Colour noise.
    out["generated.noise"] = Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8))
    return out


def degrade(img: Image.Image, kind: str) -> Image.Image:
    """Make an ungradable copy of a fundus photo: ``dark``, ``blurred``, ``tiny`` or ``overexposed``.

    Blur is Gaussian radius 8 on a 400 px photo (2% of the longer side, scaled to the photo's size).
    """
    if kind == "dark":
        return Image.fromarray((np.asarray(img, np.float32) * 0.15).astype(np.uint8))
    if kind == "blurred":
        return img.filter(ImageFilter.GaussianBlur(8 * max(img.size) / 400))
    if kind == "tiny":
        s = 64 / max(img.size)
        return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)
    if kind == "overexposed":
        # Flash far too strong: the field's mean luminance pushed to 400, so most of it clips.
        a = np.asarray(img, np.float32)
        lum = a @ np.array([0.299, 0.587, 0.114], np.float32)
        gain = 400.0 / max(float(lum[lum > 8].mean()) if (lum > 8).any() else 1.0, 1.0)
        return Image.fromarray(np.clip(a * gain, 0, 255).astype(np.uint8))
    raise ValueError(f"unknown degradation {kind!r}")


def real_photos(data: Path, every: int = 1) -> Iterator[tuple[dict[str, str], Image.Image, tuple[int, int]]]:
    """Yield (manifest row, image as the app decodes it, original size) for the real photos."""
    from aisight.preprocess import open_image

    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[::every]:
        raw = (data / row["path"]).read_bytes()
        with Image.open(io.BytesIO(raw)) as probe:
            size = probe.size
        yield row, open_image(raw), size


# --- Report ------------------------------------------------------------------------------------

PERCENTILES = (0, 0.5, 1, 2, 5, 50, 95, 99, 100)


def distribution(rows: list[dict[str, float]], key: str) -> str:
    """One line of percentiles of measure ``key`` over ``rows``."""
    vals = np.array([r[key] for r in rows if key in r and not isinstance(r[key], str)], float)
    if not len(vals):
        return f"{key:>15}: (none)"
    cells = " ".join(f"p{p:g}={np.percentile(vals, p):.3f}" for p in PERCENTILES)
    return f"{key:>15}: n={len(vals):4d} {cells}"


def run(
    data: Path | None, every: int = 1, out: Callable[[str], None] = print, dump: Path | None = None
) -> dict[str, float]:
    """Run every set, print distributions and rates, and return the headline numbers."""
    from aisight.gate import check_fundus, failed_checks

    keys = ("p99", "fit_iou", "radius", "aspect", "centre_offset", "surround", "field_diameter", "red_blue")
    keys += ("brightness", "clipped")
    keys += ("focus",)
    results: dict[str, float] = {}
    timings: list[float] = []

    def check(img: Image.Image, size: tuple[int, int] | None = None):
        t = time.perf_counter()
        v = check_fundus(img, size)
        timings.append(time.perf_counter() - t)
        return v

    if data is not None and (data / "manifest.csv").is_file():
        verdicts, refused = [], []
        degraded = {k: Counter() for k in DEGRADED_CODES}
        degraded_measures: dict[str, list[dict[str, float]]] = {k: [] for k in DEGRADED_CODES}
        for i, (row, img, size) in enumerate(real_photos(data, every)):
            v = check(img, size)
            verdicts.append({**v.measures, "path": row["path"]})
            if not v.ok:
                refused.append((row, v))
            if i % 8 == 0:  # every 8th photo also yields ungradable copies (speed)
                for kind in DEGRADED_CODES:
                    dv = check(degrade(img, kind), None)
                    degraded[kind][dv.code] += 1
                    degraded_measures[kind].append(dv.measures)
        n = len(verdicts)
        if dump is not None:
            dump.write_text(json.dumps({"real": verdicts, **degraded_measures}, indent=0))
        out(f"== real photos: {n} from {data}")
        for key in keys:
            out(distribution(verdicts, key))
        frr = len(refused) / n
        results["false_refusal_rate"] = frr
        results["false_refusals"] = len(refused)
        results["real_photos"] = n
        by_code = dict(Counter(v.code for _, v in refused))
        out(f"false refusals: {len(refused)}/{n} = {100 * frr:.2f}%  by code {by_code}")
        for col in ("source", "original_label"):
            totals = Counter(r[col] for r in csv.DictReader(open(data / "manifest.csv", newline="")))
            by = Counter(r[col] for r, _ in refused)
            out(f"  by {col}: " + ", ".join(f"{k} {by[k]}/{totals[k]}" for k in sorted(totals)))
        for row, v in refused:
            out(f"  refused {row['path']}: {v.code} (fails: {', '.join(failed_checks(v.measures))})")
        out("== ungradable copies of real photos (every 8th photo)")
        for kind, codes in degraded.items():
            total = sum(codes.values())
            right = codes[DEGRADED_CODES[kind]]
            results[f"{kind}_refused"] = 1 - codes["ok"] / total
            results[f"{kind}_right_code"] = right / total
            out(
                f"  {kind:11s}: refused {total - codes['ok']}/{total}, as {DEGRADED_CODES[kind]} {right}/{total}"
                f"  {dict(codes)}"
            )
            for key in DEGRADED_KEYS[kind]:
                out("    " + distribution(degraded_measures[kind], key))
    else:
        out(f"== real photos: not found at {data} (set --data or AISIGHT_DATA)")

    negs = {**skimage_images(), **generated_negatives()}
    out(f"== non-fundus images: {len(negs)}")
    accepted = []
    for name, img in negs.items():
        v = check(img)
        out(f"  {name:32s} {v.code:10s} fails: {', '.join(failed_checks(v.measures))}")
        if v.ok:
            accepted.append(name)
    results["false_accepts"] = len(accepted)
    results["negatives"] = len(negs)
    out(f"false accepts: {len(accepted)}/{len(negs)} {accepted}")

    v = check(skimage_retina())
    out(f"== skimage.retina (a fundus photo): {v.code}")
    results["retina_ok"] = float(v.ok)
    ms = np.array(timings) * 1000
    out(f"== gate time: median {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms over {len(ms)} checks")
    results["ms_median"] = float(np.median(ms))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="fundus-eye4 folder (with manifest.csv)")
    parser.add_argument("--every", type=int, default=1, help="use every n-th real photo (1 = all)")
    parser.add_argument("--dump", type=Path, help="write every photo's measures to this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    run(args.data, args.every, dump=args.dump)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
