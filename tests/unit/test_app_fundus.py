"""The app serving a model trained on the fundus-v2 input: the card decides the preprocessing."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from aisight.preprocess import preprocess_bytes
from tests.conftest import fundus_jpeg
from tests.unit.test_app import encode, post_image, ready_app


@pytest.fixture(scope="module")
def fundus_model(tmp_path_factory):
    from training.bootstrap import build_synthetic_model

    return build_synthetic_model(tmp_path_factory.mktemp("fmodel"), arch="TinyNet", n_per_class=16, epochs=2,
                                 preprocessing="fundus-v2")


@pytest.fixture(scope="module")
def fapp(fundus_model):
    return ready_app(fundus_model)


def test_served_input_is_the_cards_preprocessing(fapp, monkeypatch):
    p = fapp.extensions["aisight"]["predictor"]
    assert p.preprocessing == "fundus-v2"
    seen: list[np.ndarray] = []
    real = p.predict_one
    monkeypatch.setattr(p, "predict_one", lambda arr: seen.append(arr.copy()) or real(arr))
    # A photo with black margins (a wide sensor): the plain resize and the field crop differ.
    img = Image.open(io.BytesIO(fundus_jpeg(seed=5, size=400)))
    wide = Image.new("RGB", (560, 400))
    wide.paste(img, (120, 0))
    data = encode(wide, "JPEG", quality=92)
    r = post_image(fapp.test_client(), data)
    assert r.status_code == 200, r.get_json()
    assert np.array_equal(seen[0], preprocess_bytes(data, preprocessing="fundus-v2"))
    assert not np.array_equal(seen[0], preprocess_bytes(data))


def test_explanation_is_drawn_on_the_field_crop(fapp):
    img = Image.open(io.BytesIO(fundus_jpeg(seed=6, size=400)))
    wide = Image.new("RGB", (600, 400))
    wide.paste(img, (100, 0))
    r = post_image(fapp.test_client(), encode(wide, "JPEG", quality=92), url="/api/v1/predict?explain=1")
    body = r.get_json()
    assert r.status_code == 200 and body["explanation"], body
    ex = body["explanation"]
    # The overlay shows the square the model saw (the field), not the 3:2 photo.
    assert abs(ex["width"] - ex["height"]) <= 2
    png = Image.open(io.BytesIO(base64.b64decode(ex["png_base64"])))
    assert png.size == (ex["width"], ex["height"])


def test_result_page_shows_the_crop(fapp):
    img = Image.open(io.BytesIO(fundus_jpeg(seed=7, size=400)))
    wide = Image.new("RGB", (600, 400))
    wide.paste(img, (100, 0))
    r = post_image(fapp.test_client(), encode(wide, "JPEG", quality=92), url="/")
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    start = html.index("data:image/jpeg;base64,") + len("data:image/jpeg;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(html[start : html.index('"', start)])))
    assert abs(shown.width - shown.height) <= 2


def test_unknown_preprocessing_is_refused(fundus_model, tmp_path):
    import shutil

    from aisight.artifact import ArtifactError, read_card

    bad = tmp_path / "bad"
    shutil.copytree(fundus_model, bad)
    card = json.loads((bad / "model_card.json").read_text())
    card["preprocessing"] = "fundus-v9"
    (bad / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="unknown preprocessing"):
        read_card(bad)


def test_result_page_headlines_the_per_task_figures(fundus_model, tmp_path):
    """A card with per-task figures: the page shows them, the source-controlled tasks first, with the
    sources the model was validated on (not the pooled headline)."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(fundus_model, d)
    card = json.loads((d / "model_card.json").read_text())
    task = {"negatives": 50, "positives": 40, "auc": 0.81, "auc_ci95": [0.72, 0.88], "sensitivity": 0.9,
            "specificity": 0.55}
    card["evaluation"] = {"tasks": {
        "pooled": {**task, "title": "all photos (not controlled)", "controlled": False, "auc": 0.99},
        "eyepacs_moderate": {**task, "title": "EyePACS graded: grade 0 vs 2-4", "controlled": True},
    }}
    card["training"] = {**card["training"], "sources": ["eyepacs", "idrid", "odir"]}
    card.pop("warning", None)
    (d / "model_card.json").write_text(json.dumps(card))
    html = post_image(ready_app(d).test_client(), fundus_jpeg(seed=2), url="/").get_data(as_text=True)
    assert "AUC 0.81 (95% CI 0.72-0.88)" in html and "eyepacs, idrid, odir" in html
    assert html.index("EyePACS graded") < html.index("all photos (not controlled)")
