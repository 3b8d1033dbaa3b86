"""The fundus gate in the app: non-fundus and ungradable uploads get 422 with a reason and a hint, never a guess."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from aisight.gate import MESSAGES
from aisight.pipeline import upload_size
from aisight.preprocess import open_image
from app import create_app
from bench.gate_thresholds import degrade, generated_negatives
from tests.conftest import fundus_jpeg
from tests.unit.test_app import encode, metric, post_image
from training.synthetic import make_fundus

# scikit-image samples a user might upload by mistake: a cat, a cup of coffee, a portrait, documents.
SKIMAGE_NOT_FUNDUS = ("chelsea", "coffee", "astronaut", "page", "text")


def skimage_jpeg(name: str) -> bytes:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (a dev dependency) has the photos")
    return encode(Image.fromarray(getattr(skimage_data, name)()), "JPEG", quality=90)


def not_fundus_upload(name: str) -> bytes:
    if name == "screenshot":
        return encode(generated_negatives()["generated.screenshot_light"], "PNG")
    return skimage_jpeg(name)


def ungradable_upload(kind: str) -> bytes:
    """A generated fundus photo made too dark, too blurred or too small (the gate's own degradations)."""
    photo = make_fundus(np.random.default_rng(41), diseased=True, size=400)
    return encode(degrade(photo, kind), "JPEG", quality=92)




def other_client(app, **env_or_config):
    """A second app on the same loaded model (no second load), with other settings."""
    p = app.extensions["aisight"]["predictor"]
    return create_app({"PREDICTOR": p, "MODEL_LOAD": "none", **env_or_config}).test_client()


def assert_refused_api(r, code: str) -> dict:
    assert r.status_code == 422 and r.mimetype == "application/json", (r.status_code, r.get_data()[:300])
    body = json.loads(r.get_data(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))  # strict JSON
    assert set(body) == {"error"}, "no label, no probability: the photo was not classified"
    err = body["error"]
    message, hint = MESSAGES[code]
    assert err["code"] == code and err["message"] == message.format(min_side=128) and err["hint"] == hint
    assert err["measures"] and all(isinstance(v, float) for v in err["measures"].values())
    return err


def assert_refused_page(r, code: str) -> str:
    assert r.status_code == 422 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert f'data-error="{code}"' in html and 'role="alert"' in html
    assert "We did not screen this photo." in html and "What to do:" in html
    message, hint = MESSAGES[code]
    assert message.format(min_side=128).replace("'", "&#39;") in html and hint in html
    assert "data-prediction" not in html and 'type="file"' in html  # no result; the form to try again
    assert not re.search(r"\sstyle\s*=", html) and not re.search(r"<script\b[^>]*>\s*[^<\s]", html)
    return html


# ------------------------------------------------------------------------------------- accepted


def test_a_fundus_photo_passes_the_gate(client):
    data = fundus_jpeg(diseased=True, size=500, seed=40)
    assert post_image(client, data).status_code == 200
    r = post_image(client, data, url="/")
    assert r.status_code == 200 and "data-prediction" in r.get_data(as_text=True)


# ------------------------------------------------------------------------------------- not fundus


@pytest.mark.parametrize("name", [*SKIMAGE_NOT_FUNDUS, "screenshot"])
def test_not_a_fundus_photo_is_refused_with_a_hint(client, name):
    data = not_fundus_upload(name)
    err = assert_refused_api(post_image(client, data), "not_fundus")
    assert "fundus camera" in err["hint"] and "full retina image" in err["hint"]
    html = assert_refused_page(post_image(client, data, url="/"), "not_fundus")
    assert 'class="example"' in html  # a drawing of what a fundus photo looks like


def test_refusals_are_not_classified_and_are_counted(app, monkeypatch):
    p = app.extensions["aisight"]["predictor"]
    monkeypatch.setattr(p, "predict_one", lambda arr: pytest.fail("a refused upload reached the model"))
    c = other_client(app)  # metrics of its own, counted from zero
    assert post_image(c, not_fundus_upload("chelsea")).status_code == 422
    assert post_image(c, not_fundus_upload("screenshot"), url="/").status_code == 422
    assert post_image(c, ungradable_upload("dark")).status_code == 422
    text = c.get("/metrics").get_data(as_text=True)
    assert metric(text, "aisight_gate_refusals_total", code="not_fundus") == 2
    assert metric(text, "aisight_gate_refusals_total", code="too_dark") == 1
    assert 'aisight_gate_refusals_total{code="blurred"} 0.0' in text  # every reason exported from the start
    assert metric(text, "aisight_predictions_total", label="healthy") == 0
    assert metric(text, "aisight_predictions_total", label="diseased") == 0
    assert metric(text, "aisight_http_requests_total", route="/api/v1/predict", status="422") == 2
    assert metric(text, "aisight_stage_duration_seconds_count", stage="gate") == 3


# ----------------------------------------------------------------------------------- ungradable


@pytest.mark.parametrize(("kind", "code"), [("dark", "too_dark"), ("blurred", "blurred"), ("tiny", "too_small")])
def test_ungradable_photo_is_refused_with_the_reason(client, kind, code):
    data = ungradable_upload(kind)
    assert_refused_api(post_image(client, data), code)
    html = assert_refused_page(post_image(client, data, url="/"), code)
    assert 'class="example"' not in html  # the drawing is for "not a fundus photo" only


def test_the_gate_sees_the_uploads_own_size(client):
    # A 3000x2000 JPEG is decoded at 1/4 scale for the model; the gate is told the upload's own size.
    big = encode(Image.open(io.BytesIO(fundus_jpeg(seed=42, size=600))).resize((3000, 2000)), "JPEG", quality=85)
    assert open_image(big).size == (750, 500) and upload_size(big) == (3000, 2000)
    assert post_image(client, big).status_code == 200
    assert upload_size(b"not an image") is None


# ----------------------------------------------------------------------------------- switched off


def test_gate_off_by_config_classifies_anything(app):
    c = other_client(app, GATE=False)
    cat = not_fundus_upload("chelsea")
    r = post_image(c, cat)
    assert r.status_code == 200 and r.get_json()["label"] in ("healthy", "diseased")
    r = post_image(c, cat, url="/")
    assert r.status_code == 200 and "data-prediction" in r.get_data(as_text=True)
    assert "aisight_stage_duration_seconds_count{stage=\"gate\"}" not in c.get("/metrics").get_data(as_text=True)


def test_gate_off_by_environment(app, monkeypatch):
    monkeypatch.setenv("AISIGHT_GATE", "off")
    assert post_image(other_client(app), ungradable_upload("dark")).status_code == 200
    monkeypatch.setenv("AISIGHT_GATE", "on")
    assert post_image(other_client(app), ungradable_upload("dark")).status_code == 422
