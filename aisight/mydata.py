"""``/my-data``: a person who consented finds their stored photo by its receipt code, and deletes it."""

from __future__ import annotations

from flask import Blueprint, Flask, abort, render_template, request

from aisight.accounts import audit, check_csrf
from aisight.pipeline import display_image
from aisight.store import db
from aisight.store.records import find_by_receipt

bp = Blueprint("mydata", __name__)


@bp.route("/my-data", methods=["GET", "POST"])
def index():
    """The receipt form; posted, what is kept under that receipt."""
    if request.method == "GET":
        return render_template("my_data.html", photo=None, receipt="")
    check_csrf()
    receipt = request.form.get("receipt", "").strip()
    photo = find_by_receipt(db(), receipt)
    if photo is None:
        return render_template("my_data.html", photo=None, receipt="", error="No photo is kept under this receipt "
                               "code (or it was deleted)."), 404
    audit("receipt_viewed", f"photo:{photo.public_id}")
    shown, _, _ = display_image(photo.image, max_side=384)
    return render_template("my_data.html", photo=photo, receipt=receipt, shown=shown)


@bp.post("/my-data/delete")
def delete():
    check_csrf()
    photo = find_by_receipt(db(), request.form.get("receipt", "").strip())
    if photo is None:
        abort(404)
    audit("receipt_deleted", f"photo:{photo.public_id}")
    db().delete(photo)
    return render_template("my_data.html", photo=None, receipt="", deleted=True)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
