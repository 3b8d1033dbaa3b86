"""``python -m training export-reviewed --out DIR``: the photos clinicians reviewed, as a training folder.

Writes ``DIR/manifest.csv`` (``path,label,original_label,source,patient_id,eye``, the shared data's format)
and the photos under ``DIR/healthy`` and ``DIR/diseased``; ``train --data`` takes DIR beside the other
folders. A photo's label is the majority of its gradable readings; ties and photos read only as ungradable
are left out. Visit photos of one patient reference share a patient id, so a later split keeps them together.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import select

from aisight.store import Store, database_url
from aisight.store.models import Review, StoredPhoto, Visit

EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/bmp": ".bmp",
              "image/tiff": ".tif", "image/gif": ".gif", "image/heif": ".heic"}


def export_reviewed(out: str | Path, url: str | None = None) -> dict[str, int]:
    """Write the reviewed photos of the database at ``url`` (default DATABASE_URL) into ``out``; counts."""
    out = Path(out)
    store = Store(url or database_url())
    counts: Counter = Counter()
    with store.session() as s:
        readings: dict[int, list[Review]] = defaultdict(list)
        for r in s.scalars(select(Review)):
            readings[r.photo_id].append(r)
        rows = []
        for photo in s.scalars(select(StoredPhoto).where(StoredPhoto.id.in_(readings)).order_by(StoredPhoto.id)):
            votes = Counter(r.reading for r in readings[photo.id] if r.reading != "ungradable")
            top = votes.most_common(2)
            if not top or (len(top) == 2 and top[0][1] == top[1][1]):
                counts["left_out"] += 1
                continue
            label = top[0][0]
            findings = Counter(r.finding for r in readings[photo.id] if r.reading == "diseased" and r.finding)
            original = "normal" if label == "healthy" else (findings.most_common(1)[0][0] if findings else "diseased")
            if photo.visit_id is not None:
                visit = s.get(Visit, photo.visit_id)
                key = f"{visit.clinician_id}:{visit.patient_ref}"
                patient, source = "visit-" + hashlib.sha256(key.encode()).hexdigest()[:16], "aisight-visit"
            else:
                patient, source = f"consent-{photo.public_id}", "aisight-consent"
            rel = Path(label) / f"{photo.public_id}{EXTENSIONS.get(photo.media_type, '.img')}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(photo.image)
            rows.append([rel.as_posix(), label, original, source, patient, photo.eye])
            counts[label] += 1
    store.engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "original_label", "source", "patient_id", "eye"])
        w.writerows(rows)
    return dict(counts)
