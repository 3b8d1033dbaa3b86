"""Consented collection on real databases: nothing kept without the ticked box; a receipt finds and deletes it."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import pytest
from sqlalchemy import func, select

from aisight.store.models import AuditEvent, StoredPhoto, utcnow
from aisight.store.records import purge
from app import create_app
from tests.conftest import fundus_jpeg

PHOTO = fundus_jpeg(seed=11)


@pytest.fixture
def store_app(database_url, model_dir):
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "sync", "STORE": True, "DATABASE_URL": database_url,
                      "SECRET_KEY": "test-secret-key"})
    yield app
    app.extensions["aisight"]["store"].engine.dispose()


def token(client, path: str = "/") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def upload(client, **fields):
    data = {"image": (io.BytesIO(PHOTO), "eye.jpg"), **fields}
    return client.post("/", data=data, content_type="multipart/form-data")


def count(app, model=StoredPhoto) -> int:
    with app.extensions["aisight"]["store"].session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_the_box_is_unticked_by_default(store_app):
    html = store_app.test_client().get("/").get_data(as_text=True)
    box = re.search(r'<input type="checkbox" name="consent"[^>]*>', html).group(0)
    assert "checked" not in box


def test_without_consent_nothing_is_written(store_app, database_url, tmp_path):
    c = store_app.test_client()
    db_file = tmp_path / "aisight.db"
    before = db_file.read_bytes() if database_url.startswith("sqlite") else None
    r = upload(c, csrf_token=token(c))
    assert r.status_code == 200 and "data-receipt" not in r.get_data(as_text=True)
    assert count(store_app) == 0 and count(store_app, AuditEvent) == 0
    if before is not None:
        assert db_file.read_bytes() == before, "the database file changed without consent"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["aisight.db"] if before is not None else [])


def test_consent_needs_the_csrf_token(store_app):
    r = upload(store_app.test_client(), consent="yes")
    assert r.status_code == 403 and count(store_app) == 0


def test_consented_upload_is_kept_and_deleted_by_receipt(store_app):
    c = store_app.test_client()
    r = upload(c, consent="yes", csrf_token=token(c))
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    receipt = re.search(r'data-receipt="([^"]+)"', html).group(1)
    label = re.search(r'data-prediction="([a-z]+)"', html).group(1)
    with store_app.extensions["aisight"]["store"].session() as s:
        (row,) = s.scalars(select(StoredPhoto)).all()
        assert row.image == PHOTO and row.kind == "consent" and row.label == label
        assert row.media_type == "image/jpeg" and row.model_version and json.loads(row.gate)
        assert row.receipt_hash and receipt not in row.receipt_hash  # only its hash is stored

    other = store_app.test_client()  # another browser, with only the code
    assert other.post("/my-data", data={"receipt": "not-a-receipt", "csrf_token": token(other, "/my-data")}
                      ).status_code == 404
    page = other.post("/my-data", data={"receipt": receipt, "csrf_token": token(other, "/my-data")})
    assert page.status_code == 200 and f'data-prediction="{label}"' in page.get_data(as_text=True)
    gone = other.post("/my-data/delete", data={"receipt": receipt, "csrf_token": token(other, "/my-data")})
    assert gone.status_code == 200 and 'data-deleted="yes"' in gone.get_data(as_text=True)
    assert count(store_app) == 0
    assert other.post("/my-data/delete", data={"receipt": receipt, "csrf_token": token(other, "/my-data")}
                      ).status_code == 404


def test_purge_keeps_recent_and_visit_photos(store_app):
    c = store_app.test_client()
    for _ in range(2):
        upload(c, consent="yes", csrf_token=token(c))
    with store_app.extensions["aisight"]["store"].session() as s:
        old, new = s.scalars(select(StoredPhoto).order_by(StoredPhoto.id)).all()
        old.created = utcnow() - dt.timedelta(days=400)
        s.add(StoredPhoto(public_id="v1", kind="visit", image=b"x", label="healthy", probability=0.1, threshold=0.5,
                          model_name="m", model_version="1", created=utcnow() - dt.timedelta(days=900)))
    with store_app.extensions["aisight"]["store"].session() as s:
        assert purge(s, 365) == 1
    with store_app.extensions["aisight"]["store"].session() as s:
        assert sorted(p.kind for p in s.scalars(select(StoredPhoto))) == ["consent", "visit"]


def test_with_the_store_off_consent_is_ignored(model_dir):
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "sync", "STORE": False})
    c = app.test_client()
    assert 'name="consent"' not in c.get("/").get_data(as_text=True)
    r = upload(c, consent="yes")
    assert r.status_code == 200 and "data-receipt" not in r.get_data(as_text=True)
    assert "store" not in app.extensions["aisight"]
