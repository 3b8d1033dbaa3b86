"""Stored photos, visits and reviews: what the routes may do with records, in one place."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import secrets
from typing import Any

from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from aisight.store.models import Review, StoredPhoto, Visit, utcnow

MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
               "BMP": "image/bmp", "TIFF": "image/tiff", "GIF": "image/gif", "HEIF": "image/heif"}


def new_public_id() -> str:
    """A random id for a URL (128 bits): a record is never reachable by counting."""
    return secrets.token_urlsafe(16)


def new_receipt() -> str:
    """A receipt code a person can copy (12 characters, 72 bits), and its stored hash."""
    return secrets.token_urlsafe(9)


def receipt_hash(code: str) -> str:
    return hashlib.sha256(code.strip().encode()).hexdigest()


def media_type(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return MEDIA_TYPES.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001 - it was decoded before; an unknown type is served as bytes
        return "application/octet-stream"


def store_photo(s: Session, screening: Any, data: bytes, *, kind: str, visit: Visit | None = None, eye: str = "",
                receipt: str | None = None) -> StoredPhoto:
    """Keep ``data`` with the answer ``screening`` gave (``aisight.pipeline.Screening``)."""
    photo = StoredPhoto(
        public_id=new_public_id(), kind=kind, visit_id=visit.id if visit else None, eye=eye, image=data,
        media_type=media_type(data), label=screening.label, probability=float(screening.probability),
        threshold=float(screening.threshold), model_name=str(screening.card.get("name", ""))[:64],
        model_version=str(screening.card.get("version", ""))[:32], gate=json.dumps(screening.measures or {}),
        receipt_hash=receipt_hash(receipt) if receipt else None,
    )
    s.add(photo)
    s.flush()
    return photo


def find_by_receipt(s: Session, code: str) -> StoredPhoto | None:
    if not code or len(code) > 64:
        return None
    return s.scalar(select(StoredPhoto).where(StoredPhoto.receipt_hash == receipt_hash(code),
                                              StoredPhoto.kind == "consent"))


def purge(s: Session, days: float, now: dt.datetime | None = None) -> int:
    """Delete consented uploads older than ``days`` (visit photos are clinical records: kept with their visit)."""
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    result = s.execute(delete(StoredPhoto).where(StoredPhoto.kind == "consent", StoredPhoto.created < cutoff))
    return result.rowcount or 0


def agreement(s: Session) -> list[dict[str, Any]]:
    """Per model version: the model's answers against clinicians' readings (ungradable ones left out)."""
    rows = s.execute(select(StoredPhoto.model_version, StoredPhoto.label, Review.reading)
                     .join(Review, Review.photo_id == StoredPhoto.id)).all()
    out: dict[str, dict[str, int]] = {}
    for version, label, reading in rows:
        c = out.setdefault(version, {"tp": 0, "fn": 0, "tn": 0, "fp": 0, "ungradable": 0})
        if reading == "ungradable":
            c["ungradable"] += 1
        elif reading == "diseased":
            c["tp" if label == "diseased" else "fn"] += 1
        else:
            c["fp" if label == "diseased" else "tn"] += 1
    table = []
    for version, c in sorted(out.items()):
        pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
        table.append({"model_version": version, **c, "readings": pos + neg + c["ungradable"],
                      "sensitivity": c["tp"] / pos if pos else None, "specificity": c["tn"] / neg if neg else None,
                      "agreement": (c["tp"] + c["tn"]) / (pos + neg) if pos + neg else None})
    return table
