"""Visits, the review queue and its dashboard, on SQLite and PostgreSQL; every private URL refuses anonymous users."""

from __future__ import annotations

import io
import re

import pytest
from sqlalchemy import select

from aisight.store.models import AuditEvent, StoredPhoto
from app import create_app
from tests.conftest import fundus_jpeg
from tests.unit.test_accounts import PASSWORD, cli, csrf, sign_in

# What an anonymous visitor may open: the screening page and API, probes, static files, sign-in, my-data.
PUBLIC = {"/", "/api/v1/predict", "/healthz", "/readyz", "/metrics", "/static/<path:filename>", "/login",
          "/my-data", "/my-data/delete", "/logout"}


@pytest.fixture
def clinic(database_url, model_dir):
    for name, role in (("alice", "clinician"), ("bob", "clinician"), ("root", "admin")):
        made = cli(database_url, "users", "create", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "sync", "STORE": True, "DATABASE_URL": database_url,
                      "SECRET_KEY": "test-secret-key"})
    yield app
    app.extensions["aisight"]["store"].engine.dispose()


def signed_in(app, name: str):
    c = app.test_client()
    assert sign_in(c, name).status_code == 302
    return c


def open_visit(c, ref: str = "PT-001") -> str:
    r = c.post("/visits", data={"patient_ref": ref, "csrf_token": csrf(c, "/visits")})
    assert r.status_code == 302
    return r.headers["Location"]


def add_eye(c, visit_url: str, eye: str, seed: int, diseased: bool = False):
    data = {"image": (io.BytesIO(fundus_jpeg(diseased=diseased, seed=seed)), f"{eye}.jpg"),
            "csrf_token": csrf(c, visit_url)}
    return c.post(f"{visit_url}/eye/{eye}", data=data, content_type="multipart/form-data")


def test_a_visit_with_both_eyes_a_note_and_a_report(clinic):
    c = signed_in(clinic, "alice")
    url = open_visit(c)
    assert add_eye(c, url, "left", 1).status_code == 302
    assert add_eye(c, url, "right", 2, diseased=True).status_code == 302
    html = c.get(url).get_data(as_text=True)
    assert len(re.findall(r'data-prediction="(healthy|diseased)"', html)) == 2
    photos = re.findall(r'src="(/photos/[^"]+)"', html)
    assert len(photos) == 4  # each eye: the photo and its heatmap
    for src in photos:
        r = c.get(src)
        assert r.status_code == 200 and r.mimetype in ("image/jpeg", "image/png")
        assert r.data[:2] in (b"\xff\xd8", b"\x89P")
    assert c.post(f"{url}/note", data={"note": "Refer both eyes.", "csrf_token": csrf(c, url)}).status_code == 302
    report = c.get(f"{url}/report").get_data(as_text=True)
    assert "Refer both eyes." in report and 'data-notice="screening-aid"' in report and "not a diagnosis" in report
    assert re.search(r"model \S+ \S+", report)
    assert "PT-001" in c.get("/visits?ref=PT-0").get_data(as_text=True)
    assert "PT-001" not in c.get("/visits?ref=XYZ").get_data(as_text=True)
    assert "PT-001" not in c.get("/visits?date=2001-01-01").get_data(as_text=True)
    assert c.get("/visits?date=yesterday").status_code == 400
    assert c.post("/visits", data={"patient_ref": "Jane Doe <x>", "csrf_token": csrf(c, "/visits")}).status_code == 400


def test_visits_stay_with_their_clinician(clinic):
    alice = signed_in(clinic, "alice")
    url = open_visit(alice, "PT-777")
    bob = signed_in(clinic, "bob")
    assert bob.get(url).status_code == 404 and bob.get(f"{url}/report").status_code == 404
    assert "PT-777" not in bob.get("/visits").get_data(as_text=True)
    assert add_eye(bob, "/visits", "left", 3).status_code in (400, 403, 404, 405)
    assert signed_in(clinic, "root").get(url).status_code == 200  # an admin sees every visit


def test_review_queue_and_agreement(clinic):
    alice = signed_in(clinic, "alice")
    url = open_visit(alice)
    add_eye(alice, url, "left", 1)
    add_eye(alice, url, "right", 2, diseased=True)
    with clinic.extensions["aisight"]["store"].session() as s:
        photos = {p.public_id: p.label for p in s.scalars(select(StoredPhoto))}
    bob = signed_in(clinic, "bob")
    queue = bob.get("/review").get_data(as_text=True)
    assert set(re.findall(r'data-review="([^"]+)"', queue)) == set(photos)
    # Bob reads every photo as diseased: sensitivity is the model's share of diseased answers among them.
    for pid in photos:
        page = bob.get(f"/review/{pid}")
        assert page.status_code == 200
        r = bob.post(f"/review/{pid}", data={"reading": "diseased", "finding": "retinopathy",
                                             "csrf_token": csrf(bob, f"/review/{pid}")})
        assert r.status_code == 302
    assert re.findall(r'data-review="', bob.get("/review").get_data(as_text=True)) == []
    bad = bob.post(f"/review/{pid}", data={"reading": "maybe", "csrf_token": csrf(bob, f"/review/{pid}")})
    assert bad.status_code == 400
    dash = bob.get("/review/dashboard").get_data(as_text=True)
    expected = sum(label == "diseased" for label in photos.values()) / len(photos)
    assert re.search(r"data-sensitivity>([0-9.]+)<", dash).group(1) == f"{expected:.2f}"
    with clinic.extensions["aisight"]["store"].session() as s:
        actions = {e.action for e in s.scalars(select(AuditEvent))}
    assert {"visit_created", "photo_added", "visit_viewed", "review_opened", "review_recorded"} <= actions


def test_every_private_url_refuses_anonymous_users(clinic):
    """Walk the URL map: anonymous GETs and POSTs to anything not public get the sign-in page, never data."""
    c = clinic.test_client()
    checked = 0
    for rule in clinic.url_map.iter_rules():
        if rule.rule in PUBLIC:
            continue
        path = re.sub(r"<[^>]+>", "x" * 22, rule.rule)
        for method in sorted(rule.methods & {"GET", "POST"}):
            r = c.open(path, method=method)
            assert r.status_code in (302, 404), (method, rule.rule, r.status_code)
            if r.status_code == 302:
                assert r.headers["Location"].startswith("/login"), (method, rule.rule)
            checked += 1
    assert checked >= 12


def test_record_ids_are_not_guessable(clinic):
    c = signed_in(clinic, "alice")
    url = open_visit(c)
    add_eye(c, url, "left", 1)
    public_id = url.rsplit("/", 1)[1]
    assert len(public_id) >= 20 and not public_id.isdigit()
    with clinic.extensions["aisight"]["store"].session() as s:
        photo = s.scalars(select(StoredPhoto)).one()
    assert c.get(f"/photos/{photo.id}").status_code == 404  # the row number reaches nothing
    assert c.get("/visits/1").status_code == 404


def test_reviewed_photos_become_a_training_folder(clinic, database_url, tmp_path):
    """export-reviewed writes the shared data's format, and the training loader reads it beside other folders."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    from training.data import load_sources

    alice = signed_in(clinic, "alice")
    url = open_visit(alice, "PT-9")
    add_eye(alice, url, "left", 1)
    add_eye(alice, url, "right", 2)
    with clinic.extensions["aisight"]["store"].session() as s:
        left, right = (p.public_id for p in s.scalars(select(StoredPhoto).order_by(StoredPhoto.id)))
    for reader in ("alice", "bob"):
        c = signed_in(clinic, reader)
        c.post(f"/review/{left}", data={"reading": "diseased", "finding": "glaucoma",
                                         "csrf_token": csrf(c, f"/review/{left}")})
        # right: one healthy, one ungradable reading -> healthy
        reading = "healthy" if reader == "alice" else "ungradable"
        c.post(f"/review/{right}", data={"reading": reading, "csrf_token": csrf(c, f"/review/{right}")})
    out = tmp_path / "reviewed"
    r = subprocess.run([sys.executable, "-m", "training", "export-reviewed", "--out", str(out), "--database-url",
                        database_url], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"diseased": 1, "healthy": 1}
    ds = load_sources(str(out))
    by_label = {s.original_label: s for s in ds.samples}
    assert set(by_label) == {"glaucoma", "normal"}
    assert len({s.patient_id for s in ds.samples}) == 1  # both eyes of PT-9: one patient
    assert {s.source for s in ds.samples} == {"aisight-visit"}
    assert (out / by_label["glaucoma"].path).read_bytes()[:2] == b"\xff\xd8"


def test_visit_uploads_keep_every_bad_input_rule_and_admins_read_the_audit_log(clinic):
    c = signed_in(clinic, "alice")
    url = open_visit(c)
    bad = {"image": (io.BytesIO(b"%PDF-1.4 not a photo"), "x.pdf"), "csrf_token": csrf(c, url)}
    r = c.post(f"{url}/eye/left", data=bad, content_type="multipart/form-data")
    assert r.status_code == 415
    r = c.post(f"{url}/eye/left", data={"csrf_token": csrf(c, url)}, content_type="multipart/form-data")
    assert r.status_code == 400
    assert c.post(f"{url}/eye/middle", data={"csrf_token": csrf(c, url)}).status_code == 404
    assert c.get("/audit").status_code == 403  # a clinician does not read the audit log
    log = signed_in(clinic, "root").get("/audit").get_data(as_text=True)
    assert 'data-action="visit_created"' in log and 'data-action="login"' in log
