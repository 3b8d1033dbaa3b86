"""The app on real fundus photographs (../shared/data/fundus-eye4; skipped when absent)."""

from __future__ import annotations

import csv
import io
import re
from html import unescape
from unittest.mock import ANY

import numpy as np
import pytest
from PIL import Image

from aisight import ov_backend
from aisight.artifact import DEFAULT_MODEL_DIR
from aisight.gate import check_fundus
from aisight.preprocess import open_image, preprocess_path
from app import create_app

# A few of each original class, the PNG ones (retina_dataset) included when the manifest has them.
PER_CLASS = 3


def post(client, data: bytes, url: str = "/api/v1/predict", name: str = "photo.jpg"):
    return client.post(url, data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


@pytest.fixture(scope="module")
def photos(fundus_dir) -> list[dict]:
    with open(fundus_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked: list[dict] = []
    for cls in sorted({r["original_label"] for r in rows}):
        picked += [r for r in rows if r["original_label"] == cls][:PER_CLASS]
    pngs = [r for r in rows if r["path"].lower().endswith(".png")]
    picked += pngs[:1]
    return [{**r, "file": fundus_dir / r["path"]} for r in picked]


@pytest.fixture(scope="module")
def app(model_dir):
    return create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "sync"})


def gate_verdict(data: bytes):
    """What the fundus gate says about these bytes, decoded as the app decodes them."""
    with Image.open(io.BytesIO(data)) as probe:
        size = probe.size
    return check_fundus(open_image(data), size)


def test_real_photos_through_api_and_form(app, photos):
    c = app.test_client()
    refused = []
    for row in photos:
        data = row["file"].read_bytes()
        r = post(c, data, name=row["file"].name)
        # The gate refuses about 1% of real photos (docs/gate.md); the app must follow its verdict.
        v = gate_verdict(data)
        if not v.ok:
            assert r.status_code == 422 and r.get_json()["error"]["code"] == v.code, row["path"]
            refused.append(row["path"])
            continue
        assert r.status_code == 200, (row["path"], r.get_json())
        body = r.get_json()
        assert body["label"] in ("healthy", "diseased") and 0 <= body["probability"] <= 1
        page = post(c, data, url="/", name=row["file"].name).get_data(as_text=True)
        assert re.findall(r'data-prediction="([a-z]+)"', page) == [body["label"]]
    assert len(refused) <= 1, refused


def test_real_photos_reach_the_model_as_training_sees_them(model_dir, photos, monkeypatch):
    # The gate off: every photo, refused or not, must reach the model exactly as training reads it.
    app = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "sync", "GATE": False})
    p = app.extensions["aisight"]["predictor"]
    seen: list[np.ndarray] = []
    real = p.predict_one
    monkeypatch.setattr(p, "predict_one", lambda arr: seen.append(arr.copy()) or real(arr))
    c = app.test_client()
    for row in photos:
        assert post(c, row["file"].read_bytes()).status_code == 200
    for row, arr in zip(photos, seen, strict=True):
        assert np.array_equal(arr, preprocess_path(row["file"])), row["path"]


def test_bundled_model_answers_real_photos(photos):
    """The model in the repository (what `make run` serves) loads and answers."""
    app = create_app({"MODEL_DIR": str(DEFAULT_MODEL_DIR), "MODEL_LOAD": "sync"})
    c = app.test_client()
    assert c.get("/readyz").status_code == 200, c.get("/readyz").get_json()
    # With its OpenVINO IR (which make run and make test convert) the bundled model is served through it.
    fast = ov_backend.available() and ov_backend.has_ir(DEFAULT_MODEL_DIR)
    assert c.get("/readyz").get_json()["backend"] == ("openvino" if fast else "tensorflow")
    card = app.extensions["aisight"]["predictor"].card
    data = next(d for row in photos if gate_verdict(d := row["file"].read_bytes()).ok)
    r = post(c, data, url="/")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert card["name"] in html and card["version"] in html
    if card.get("warning"):
        assert card["warning"] in unescape(html)  # a model with a known limitation says so on the page
    # Grad-CAM works on the served model at its card's layer: the page has the heatmap and its toggle.
    assert 'id="show-heatmap"' in html and 'class="heatmap"' in html
    r = post(c, data, url="/api/v1/predict?explain=1")
    assert r.status_code == 200 and r.get_json()["explanation"]["layer"] == (card.get("gradcam_layer") or ANY)


@pytest.mark.skipif(not ov_backend.available(), reason="OpenVINO is not installed")
@pytest.mark.skipif(not ov_backend.has_ir(DEFAULT_MODEL_DIR), reason="no IR beside the bundled model: make converts it")
def test_bundled_openvino_ir_answers_as_the_keras_model(photos):
    """The IR converted from the bundled model.keras gives its answers on real photos."""
    from aisight.artifact import load_model, read_card

    ir = ov_backend.OpenVINOModel(DEFAULT_MODEL_DIR)  # raises if converted from another model.keras
    how = read_card(DEFAULT_MODEL_DIR).get("preprocessing", "resize")
    x = np.stack([preprocess_path(row["file"], preprocessing=how) for row in photos]).astype(np.float32)
    expected = load_model(DEFAULT_MODEL_DIR)(x, training=False).numpy()
    np.testing.assert_allclose(ir(x), expected, atol=1e-5)
    assert np.ptp(expected[:, 1]) > 0.1  # real photos with different answers
