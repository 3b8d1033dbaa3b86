"""Where the model looked, in the app: the result page's heatmap layer and toggle, and ``?explain=1`` on the API."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aisight import explain
from aisight.pipeline import CLASS_INDEX
from app import create_app
from tests.conftest import fundus_jpeg
from tests.unit.test_app import encode, metric, post_image, ready_app
from tests.unit.test_explain import HIT_DISTANCE, LESION_RADIUS, LESION_RGB, SIZE, lesion_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app(model_dir):
    app = ready_app(model_dir)
    app.extensions["aisight"]["explain_prepare"].join(60)  # so no test races the background build
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def framed_fundus_png(width: int, height: int, seed: int = 50) -> bytes:
    """A fundus photo centred in a black frame of ``width`` x ``height`` (it passes the gate), as PNG."""
    side = min(width, height)
    img = Image.new("RGB", (width, height))
    img.paste(Image.open(io.BytesIO(fundus_jpeg(seed=seed, size=side))), ((width - side) // 2, (height - side) // 2))
    return encode(img, "PNG")


def data_url_png(html: str, cls: str) -> Image.Image:
    found = re.search(rf'<img class="{cls}" src="data:image/png;base64,([^"]+)"', html)
    assert found, f"no {cls} layer"
    return Image.open(io.BytesIO(base64.b64decode(found.group(1))))


# --------------------------------------------------------------------------- requests without explanation


def test_plain_api_requests_compute_no_explanation(client, monkeypatch):
    calls: list[str] = []
    for name in ("gradcam", "overlay_png", "heatmap_png", "prepare"):

        def refuse(*args, _name=name, **kwargs):
            calls.append(_name)
            pytest.fail(f"explain.{_name} called for a request that did not ask for an explanation")

        monkeypatch.setattr(explain, name, refuse)
    for url in ("/api/v1/predict", "/api/v1/predict?explain=0", "/api/v1/predict?explain="):
        r = post_image(client, fundus_jpeg(seed=51), url=url)
        assert r.status_code == 200 and "explanation" not in r.get_json(), url
    assert calls == []


# --------------------------------------------------------------------------------------- the API


@pytest.mark.parametrize(
    ("name", "expected_size"),
    [("jpeg-400", (400, 400)), ("png-1000x800", (768, 614))],  # the photo, at most 768 px on a side
)
def test_explain_returns_an_overlay_png(client, app, name, expected_size):
    data = fundus_jpeg(seed=52, size=400) if name == "jpeg-400" else framed_fundus_png(1000, 800)
    r = post_image(client, data, url="/api/v1/predict?explain=1")
    assert r.status_code == 200
    body = r.get_json()
    e = body["explanation"]
    assert set(e) == {"png_base64", "media_type", "width", "height", "layer", "class"}
    png = base64.b64decode(e["png_base64"], validate=True)
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG" and img.mode == "RGB" and img.size == expected_size == (e["width"], e["height"])
    assert e["media_type"] == "image/png" and e["class"] == body["label"]
    assert e["layer"] == app.extensions["aisight"]["predictor"].card["gradcam_layer"]
    # Everything else is the plain answer, unchanged.
    plain = post_image(client, data).get_json()
    assert {k: v for k, v in body.items() if k != "explanation"} == plain


def test_explain_accepts_the_usual_spellings_of_yes(client):
    for value in ("true", "yes", "on", "TRUE"):
        r = post_image(client, fundus_jpeg(seed=53), url=f"/api/v1/predict?explain={value}")
        assert r.get_json()["explanation"]["png_base64"], value


def test_the_heatmap_explains_what_the_model_classified(client, app, monkeypatch):
    """Grad-CAM runs on the very array the model classified, at the card's layer, for the answered class."""
    p = app.extensions["aisight"]["predictor"]
    classified, explained = [], []
    real_predict, real_gradcam = p.predict_one, explain.gradcam
    monkeypatch.setattr(p, "predict_one", lambda arr: classified.append(arr.copy()) or real_predict(arr))

    def spy(model, image, layer_name=None, class_index=1):
        explained.append((model, image.copy(), layer_name, class_index))
        return real_gradcam(model, image, layer_name, class_index)

    monkeypatch.setattr(explain, "gradcam", spy)
    labels = []
    for diseased in (False, True):
        data = fundus_jpeg(diseased=diseased, seed=54)
        labels.append(post_image(client, data, url="/api/v1/predict?explain=1").get_json()["label"])
        page = post_image(client, data, url="/")  # streamed: the heatmap is made as the body is read
        assert page.status_code == 200 and b'class="heatmap"' in page.data
    assert len(classified) == len(explained) == 4
    for i, (model, image, layer, class_index) in enumerate(explained):
        assert model is p.model and layer == p.card["gradcam_layer"]
        assert np.array_equal(image, classified[i])
        assert class_index == CLASS_INDEX[labels[i // 2]]


# ------------------------------------------------------------------------------------- the page


def test_result_page_has_the_heatmap_layer_and_its_toggle(client):
    html = post_image(client, fundus_jpeg(diseased=True, seed=55), url="/").get_data(as_text=True)
    toggle = re.search(r'<input type="checkbox" id="show-heatmap"[^>]*>', html)
    assert toggle and "checked" not in toggle.group(0)  # the photo first; the heatmap on request
    # The checkbox precedes the figure, as "#show-heatmap:checked ~ .photo .heatmap" needs.
    assert html.index('id="show-heatmap"') < html.index('<figure class="photo">') < html.index('class="heatmap"')
    assert re.search(r'<label class="heat-label" for="show-heatmap">Show where the model looked</label>', html)
    assert "Warmer colours show the regions that most influenced the result. This is not a map of disease." in html
    layer = data_url_png(html, "heatmap")
    # TinyNet's 16x16 map, upsampled and coloured here; the browser stretches it over the photo.
    assert layer.format == "PNG" and layer.mode == "RGBA" and layer.size == (64, 64)


def test_the_result_page_sends_its_answer_before_it_makes_the_heatmap(client, monkeypatch):
    """The verdict leaves in the first part of the body; Grad-CAM runs only when the rest is read."""
    made = []
    real_gradcam = explain.gradcam
    monkeypatch.setattr(explain, "gradcam", lambda *a, **k: made.append(1) or real_gradcam(*a, **k))
    r = client.post("/", data={"image": (io.BytesIO(fundus_jpeg(diseased=True, seed=57)), "photo.jpg")},
                    content_type="multipart/form-data", buffered=False)
    assert r.status_code == 200 and r.headers["X-Accel-Buffering"] == "no" and not made
    parts = iter(r.response)
    first = next(parts).decode()
    assert not made, "the heatmap was made before the answer was sent"
    assert "data-prediction" in first and "Probability of disease" in first
    assert first.endswith("<!--aisight:answer-end-->") and 'class="heatmap"' not in first
    rest = b"".join(parts).decode()
    r.close()
    assert made == [1] and 'class="heatmap"' in rest and rest.rstrip().endswith("</html>")


def test_the_stylesheet_shows_the_photo_above_the_answer_that_precedes_it():
    css = (ROOT / "static" / "style.css").read_text()
    assert ".result > h1 { order: -2; }" in css and ".result > .looked { order: -1; }" in css


def test_the_stylesheet_shows_the_heatmap_only_when_toggled():
    css = (ROOT / "static" / "style.css").read_text()
    assert re.search(r"\.stack \.heatmap \{[^}]*visibility: hidden", css)
    assert "#show-heatmap:checked ~ .photo .heatmap { visibility: visible; }" in css


# --------------------------------------------------------------------------------------- failures


def test_a_failing_heatmap_never_fails_the_result(model_dir, tmp_path, caplog):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    card = json.loads((d / "model_card.json").read_text())
    card["gradcam_layer"] = "no_such_layer"
    (d / "model_card.json").write_text(json.dumps(card))
    with caplog.at_level("WARNING"):
        app = ready_app(d)
        app.extensions["aisight"]["explain_prepare"].join(60)
        assert "Grad-CAM could not be prepared" in caplog.text
        c = app.test_client()
        r = post_image(c, fundus_jpeg(seed=56), url="/")
        html = r.get_data(as_text=True)
        assert r.status_code == 200 and "data-prediction" in html
        assert "show-heatmap" not in html and 'class="heatmap"' not in html
        r = post_image(c, fundus_jpeg(seed=56), url="/api/v1/predict?explain=1")
        body = r.get_json()
        assert r.status_code == 200 and body["label"] and body["explanation"] is None
        assert "heatmap could not be made" in body["explanation_error"]
        assert "Grad-CAM failed" in caplog.text
    text = c.get("/metrics").get_data(as_text=True)
    assert metric(text, "aisight_explain_failures_total") == 2


def test_the_explanation_is_prepared_in_the_background(app):
    p = app.extensions["aisight"]["predictor"]
    assert not app.extensions["aisight"]["explain_prepare"].is_alive()
    assert p.card["gradcam_layer"] in explain._CACHE[p.model]  # built and traced before any request


def test_no_model_no_preparation(tmp_path):
    app = create_app({"MODEL_DIR": str(tmp_path / "nowhere"), "MODEL_LOAD": "sync"})
    assert "explain_prepare" not in app.extensions["aisight"]


# ------------------------------------------------------------------- the served heatmap finds the lesion


def lesion_photo(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[float, float]]:
    """A generated photo of ``size`` px with one bright lesion, drawn as test_explain draws it at 128 px."""
    from PIL import ImageDraw, ImageFilter

    from training.synthetic import make_fundus

    k = size / SIZE
    img = make_fundus(rng, diseased=False, size=size)
    fx, fy = rng.uniform(0.28, 0.72, 2) * size
    r = LESION_RADIUS * k
    ImageDraw.Draw(img).ellipse((fx - r, fy - r, fx + r, fy + r), fill=LESION_RGB)
    # Softened edges as at 128 px, but no blur of the whole photo (the gate would call it blurred).
    return img.filter(ImageFilter.GaussianBlur(0.6)), (float(fx), float(fy))


@pytest.mark.slow
def test_served_heatmap_peak_lies_on_the_lesion(lesion_model, tmp_path):  # noqa: F811 - the fixture
    """End to end: upload -> gate -> model -> Grad-CAM -> the page's layer peaks on the lesion in the photo."""
    from training.export import export_artifact

    d = export_artifact(lesion_model, tmp_path / "lesion", {"name": "lesion-finder", "architecture": "TinyNet"})
    c = ready_app(d).test_client()
    rng = np.random.default_rng(123)
    size = 3 * SIZE
    dists = []
    for _ in range(10):
        photo, (fx, fy) = lesion_photo(rng, size)
        r = post_image(c, encode(photo, "JPEG", quality=92), url="/")
        assert r.status_code == 200
        html = r.get_data(as_text=True)
        assert 'data-prediction="diseased"' in html
        # The layer's opacity grows with the heat; stretched over the photo as the browser does.
        alpha = data_url_png(html, "heatmap").getchannel("A").resize((size, size), Image.Resampling.BILINEAR)
        y, x = np.unravel_index(int(np.argmax(np.asarray(alpha))), (size, size))
        dists.append(float(np.hypot(x - fx, y - fy)) / (size / SIZE))  # in model-input pixels
    hits = float(np.mean(np.array(dists) <= HIT_DISTANCE))
    assert hits >= 0.8, f"peak on the lesion in {hits:.0%}; distances (128 px scale) {np.round(dists).astype(int)}"
