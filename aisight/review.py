"""The review queue: clinicians read stored photos themselves; the dashboard compares the model with them."""

from __future__ import annotations

from flask import Blueprint, Flask, abort, redirect, render_template, request, url_for
from sqlalchemy import select

from aisight.accounts import audit, current_user, login_required
from aisight.store import db
from aisight.store.models import FINDINGS, READINGS, Review, StoredPhoto
from aisight.store.records import agreement

bp = Blueprint("review", __name__)


@bp.get("/review")
@login_required("clinician")
def queue():
    """Stored photos this clinician has not read yet, oldest first."""
    mine = select(Review.photo_id).where(Review.reviewer_id == current_user().id)
    photos = db().scalars(select(StoredPhoto).where(StoredPhoto.id.not_in(mine))
                          .order_by(StoredPhoto.created).limit(50)).all()
    return render_template("review_queue.html", photos=photos)


@bp.route("/review/<public_id>", methods=["GET", "POST"])
@login_required("clinician")
def item(public_id: str):
    """One photo with the model's answer; the form records this clinician's own reading."""
    photo = db().scalar(select(StoredPhoto).where(StoredPhoto.public_id == public_id))
    if photo is None:
        abort(404)
    if request.method == "POST":
        reading = request.form.get("reading", "")
        finding = request.form.get("finding", "") if reading == "diseased" else ""
        if reading not in READINGS or (finding and finding not in FINDINGS):
            abort(400, f"reading must be one of {', '.join(READINGS)}; finding one of {', '.join(FINDINGS)}")
        db().add(Review(photo_id=photo.id, reviewer_id=current_user().id, reading=reading, finding=finding))
        audit("review_recorded", f"photo:{photo.public_id}", detail=f"{reading} {finding}".strip())
        return redirect(url_for("review.queue"))
    audit("review_opened", f"photo:{photo.public_id}")
    return render_template("review_item.html", photo=photo, readings=READINGS, findings=FINDINGS)


@bp.get("/review/dashboard")
@login_required("clinician")
def dashboard():
    """The model against the clinicians' readings, per model version, with counts."""
    return render_template("dashboard.html", rows=agreement(db()))


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
