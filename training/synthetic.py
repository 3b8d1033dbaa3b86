"""Generated fundus-like photographs for tests and for bootstrapping a model without real data.

Each image is a round orange-red field of view on a black surround, with an optic disc, vessels and
texture; ``diseased`` ones carry bright yellow lesions (exudate-like) and dark red spots. They are
not medical images: they exercise the real code paths where the real photos are absent.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make_fundus(
    rng: np.random.Generator,
    diseased: bool,
    size: int = 400,
    lesions: list[tuple[float, float]] | None = None,
) -> Image.Image:
    """Draw one synthetic fundus photo; ``lesions`` (fractions of ``size``) places bright lesions."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    c = size / 2
    r = size * rng.uniform(0.44, 0.48)
    base = (int(rng.uniform(170, 210)), int(rng.uniform(70, 100)), int(rng.uniform(25, 45)))
    draw.ellipse((c - r, c - r, c + r, c + r), fill=base)
    # Optic disc left or right of centre, as in left and right eyes.
    side = rng.choice([-1, 1])
    dx, dy = c + side * r * 0.45, c + rng.uniform(-0.08, 0.08) * r
    dr = r * 0.13
    draw.ellipse((dx - dr, dy - dr, dx + dr, dy + dr), fill=(245, 210, 150))
    # Vessels: arcs leaving the disc.
    for _ in range(int(rng.integers(6, 10))):
        pts = [(dx, dy)]
        angle = rng.uniform(0, 2 * np.pi)
        x, y = dx, dy
        for _ in range(12):
            angle += rng.normal(0, 0.25)
            x += np.cos(angle) * r * 0.09
            y += np.sin(angle) * r * 0.09
            pts.append((x, y))
        draw.line(pts, fill=(120, 25, 20), width=int(max(2, size / 120)))
    if diseased:
        spots = lesions or [(rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)) for _ in range(int(rng.integers(5, 12)))]
        for fx, fy in spots:
            lr = size * rng.uniform(0.015, 0.035)
            x, y = fx * size, fy * size
            draw.ellipse((x - lr, y - lr, x + lr, y + lr), fill=(250, 235, 120))
        for _ in range(int(rng.integers(4, 10))):
            x, y = c + rng.uniform(-0.5, 0.5) * r, c + rng.uniform(-0.5, 0.5) * r
            lr = size * rng.uniform(0.008, 0.015)
            draw.ellipse((x - lr, y - lr, x + lr, y + lr), fill=(90, 10, 10))
    img = img.filter(ImageFilter.GaussianBlur(size / 300))
    arr = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(xx - c, yy - c) / r
    # Darker towards the rim, as real fundus photos are; black outside the field of view.
    shade = np.clip(1.15 - 0.45 * dist**2, 0, None)[..., None]
    arr = np.where((dist <= 1.0)[..., None], arr * shade + rng.normal(0, 4, arr.shape), 0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_dataset(
    out: str | Path,
    n_per_class: int = 20,
    seed: int = 0,
    size: int = 200,
    source: str = "synthetic",
    labels: tuple[str, ...] = ("healthy", "diseased"),
    graded: bool = False,
) -> Path:
    """Write a class-per-folder set (healthy/, diseased/) with a manifest.csv; return the folder.

    ``source`` names the collection in the manifest (and the patient ids); ``labels`` may hold one class
    only, as some real folders do. ``graded`` adds EyePACS grades (``original_label``): healthy photos are
    grade 0, diseased ones alternate mild and moderate, so each patient has one eye of each."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    for label in labels:
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rel = f"{label}/{label}_{i:04d}.jpg"
            make_fundus(rng, label == "diseased", size=size).save(out / rel, quality=92)
            # Two eyes per synthetic patient, so patient-level splitting is exercised.
            rows.append({"path": rel, "label": label, "patient_id": f"{source}-{label}-{i // 2}", "source": source})
            if graded:
                rows[-1]["original_label"] = "no_dr" if label == "healthy" else ("moderate_dr" if i % 2 else "mild_dr")
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id", "source"] + ["original_label"] * graded)
        writer.writeheader()
        writer.writerows(rows)
    return out
