"""Visits: a clinician screens both eyes of a pseudonymous patient, adds a note, prints a report.

A visit belongs to the clinician who opened it (admins see every visit). Its photos go through the same
pipeline as the anonymous page (``aisight.pipeline.screen``) and are kept with their answers.
"""

from __future__ import annotations

import datetime as dt
import re

from flask import Blueprint, Flask, Response, abort, redirect, render_template, request, url_for
from sqlalchemy import select

from aisight import explain
from aisight.accounts import audit, current_user, login_required
from aisight.pipeline import display_jpeg, heatmap, screen, stored_screening
from aisight.store import db
from aisight.store.models import StoredPhoto, User, Visit
from aisight.store.records import new_public_id, store_photo
from aisight.web import NOTICE, read_upload

bp = Blueprint("visits", __name__)
EYES = ("left", "right")
REF = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def visit_for_user(public_id: str) -> Visit:
    """The visit, if this user may see it; 404 otherwise (whether it exists or not)."""
    visit = db().scalar(select(Visit).where(Visit.public_id == public_id))
    user = current_user()
    if visit is None or (visit.clinician_id != user.id and user.role != "admin"):
        abort(404)
    return visit


def photos_of(visit: Visit) -> dict[str, StoredPhoto]:
    rows = db().scalars(select(StoredPhoto).where(StoredPhoto.visit_id == visit.id).order_by(StoredPhoto.id))
    return {p.eye: p for p in rows}  # the latest photo of each eye


@bp.get("/visits")
@login_required("clinician")
def index():
    """My visits (all, for an admin), newest first; search by patient reference and date."""
    user = current_user()
    q = select(Visit).order_by(Visit.created.desc()).limit(200)
    if user.role != "admin":
        q = q.where(Visit.clinician_id == user.id)
    ref = request.args.get("ref", "").strip()[:64]
    if ref:
        q = q.where(Visit.patient_ref.contains(ref, autoescape=True))
    day = request.args.get("date", "").strip()
    if day:
        try:
            start = dt.datetime.strptime(day, "%Y-%m-%d")
        except ValueError:
            abort(400, "date must look like 2026-12-31")
        q = q.where(Visit.created >= start, Visit.created < start + dt.timedelta(days=1))
    return render_template("visits.html", visits=db().scalars(q).all(), ref=ref, day=day)


@bp.post("/visits")
@login_required("clinician")
def create():
    ref = request.form.get("patient_ref", "").strip()
    if not REF.match(ref):
        abort(400, "A patient reference is 1-64 letters, digits, '.', '-' or '_' (a pseudonym, not a name).")
    visit = Visit(public_id=new_public_id(), patient_ref=ref, clinician_id=current_user().id)
    db().add(visit)
    db().flush()
    audit("visit_created", f"visit:{visit.public_id}")
    return redirect(url_for("visits.show", public_id=visit.public_id))


@bp.get("/visits/<public_id>")
@login_required("clinician")
def show(public_id: str):
    visit = visit_for_user(public_id)
    audit("visit_viewed", f"visit:{visit.public_id}")
    return render_template("visit.html", visit=visit, photos=photos_of(visit), eyes=EYES)


@bp.post("/visits/<public_id>/eye/<eye>")
@login_required("clinician")
def upload(public_id: str, eye: str):
    """Screen one eye's photo (every check of the anonymous page applies) and keep it with the visit."""
    if eye not in EYES:
        abort(404)
    visit = visit_for_user(public_id)
    data = read_upload()
    s = screen(data)
    photo = store_photo(db(), s, data, kind="visit", visit=visit, eye=eye)
    audit("photo_added", f"visit:{visit.public_id}", detail=f"{eye} eye, photo:{photo.public_id}")
    return redirect(url_for("visits.show", public_id=visit.public_id))


@bp.post("/visits/<public_id>/note")
@login_required("clinician")
def note(public_id: str):
    visit = visit_for_user(public_id)
    visit.note = request.form.get("note", "")[:5000]
    audit("note_changed", f"visit:{visit.public_id}")
    return redirect(url_for("visits.show", public_id=visit.public_id))


@bp.get("/visits/<public_id>/report")
@login_required("clinician")
def report(public_id: str):
    """The printable visit report (the page's print stylesheet makes it a clean A4 page)."""
    visit = visit_for_user(public_id)
    audit("report_viewed", f"visit:{visit.public_id}")
    clinician = db().get(User, visit.clinician_id)
    return render_template("report.html", visit=visit, photos=photos_of(visit), eyes=EYES, notice=NOTICE,
                           clinician=clinician.username if clinician else "")


@bp.get("/photos/<public_id>")
@login_required("clinician")
def photo(public_id: str) -> Response:
    """A stored photo (downscaled JPEG), for signed-in clinicians: every clinician reviews every stored photo.
    The photo carries no patient reference; a visit's reference and note stay with its clinician."""
    p = db().scalar(select(StoredPhoto).where(StoredPhoto.public_id == public_id))
    if p is None:
        abort(404)
    audit("photo_viewed", f"photo:{p.public_id}")
    return Response(display_jpeg(p.image)[0], mimetype="image/jpeg", headers={"Cache-Control": "no-store"})


@bp.get("/photos/<public_id>/heatmap")
@login_required("clinician")
def photo_heatmap(public_id: str) -> Response:
    """Where the model looked for the kept answer on a stored photo (recomputed, never stored)."""
    p = db().scalar(select(StoredPhoto).where(StoredPhoto.public_id == public_id))
    if p is None:
        abort(404)
    s = stored_screening(p.image, p.label, p.probability, p.threshold)
    heat = heatmap(s)
    if heat is None:
        abort(404)
    return Response(explain.overlay_png(s.photo, heat), mimetype="image/png", headers={"Cache-Control": "no-store"})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
