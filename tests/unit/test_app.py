"""The app through Flask's test client: pages, API, readiness, metrics, headers, nothing on disk."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aisight.predictor import Predictor
from aisight.preprocess import preprocess_path
from app import create_app
from tests.conftest import fundus_jpeg

# ------------------------------------------------------------------------------------------ helpers


def post_image(client, data: bytes, *, url: str = "/api/v1/predict", filename: str = "photo.jpg", field="image"):
    """POST ``data`` as the multipart file field of the upload form."""
    return client.post(url, data={field: (io.BytesIO(data), filename)}, content_type="multipart/form-data")


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def prediction_of(html: str) -> str:
    """The value of the one ``data-prediction`` attribute on a result page."""
    found = re.findall(r'data-prediction="([a-z]+)"', html)
    assert len(found) == 1, found
    return found[0]


def ready_app(model_dir: Path, **config):
    return create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "sync", **config})


class BlockingPredictor(Predictor):
    """A real predictor whose load waits for ``release``: readiness can be watched before and after."""

    def __init__(self, model_dir) -> None:
        super().__init__(model_dir)
        self.release = threading.Event()

    def load(self):
        self.release.wait(60)
        return super().load()


# Every open-for-writing while ``_WATCH`` is set, seen through an audit hook (it sees every file opened
# by Python and its C extensions that go through the io module or os.open).
_WATCH = threading.Event()
_WRITES: list[str] = []


def _audit(event: str, args) -> None:
    if not _WATCH.is_set():
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing:
            _WRITES.append(f"open {path!r} {mode!r}")
    elif event in ("tempfile.mkstemp", "tempfile.mkdtemp", "os.mkdir", "os.rename", "shutil.copyfile"):
        _WRITES.append(f"{event} {args!r}")


sys.addaudithook(_audit)


# ------------------------------------------------------------------------------------------ fixtures




# ---------------------------------------------------------------------------------------- the pages


def test_index_has_the_upload_form(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    form = re.search(r"<form[^>]*>", html).group(0)
    assert 'method="post"' in form and 'enctype="multipart/form-data"' in form
    inp = re.search(r'<input[^>]*type="file"[^>]*>', html).group(0)
    assert 'name="image"' in inp and 'accept="image/*"' in inp
    assert 'name="viewport"' in html


def test_index_shows_the_model_warning(client, app):
    card = app.extensions["aisight"]["predictor"].card
    assert card.get("warning"), "the test model's card carries a warning"
    assert card["warning"] in client.get("/").get_data(as_text=True)


@pytest.mark.parametrize("diseased", [False, True])
def test_form_post_shows_the_result(client, app, diseased):
    data = fundus_jpeg(diseased=diseased, size=500, seed=11)
    r = post_image(client, data, url="/")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    label = prediction_of(html)
    api = post_image(client, data).get_json()
    assert label == api["label"]  # the page and the API agree on the same bytes
    card = app.extensions["aisight"]["predictor"].card
    for text in (card["name"], card["version"], card["architecture"], card["warning"], "not a diagnosis"):
        assert text in html
    assert f"{api['probability'] * 100:.1f}%" in html
    assert f"{card['threshold'] * 100:.1f}%" in html
    img = re.search(r'<img src="(data:image/jpeg;base64,[^"]+)"', html)
    assert img, "the uploaded photo is embedded as a data: URL"


def test_result_photo_is_upright_and_downscaled(client):
    # A 2000x1000 photo stored sideways (EXIF orientation 6) shows upright, at most 768 px on a side.
    # A fundus photo in a wide black frame, as many cameras save them, so the gate lets it through.
    upright = Image.new("RGB", (2000, 1000))
    upright.paste(Image.open(io.BytesIO(fundus_jpeg(seed=12, size=1000))), (500, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)
    html = post_image(client, data, url="/").get_data(as_text=True)
    assert 'width="768" height="384"' in html


def test_result_shows_card_metrics_generically(model_dir, tmp_path):
    # The real model's card nests test metrics; the page renders whatever is there.
    import shutil

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    card = json.loads((d / "model_card.json").read_text())
    card["metrics"] = {"test": {"sensitivity": 0.912345, "specificity": 0.8, "n": 300}, "odir_only": {"auc": 0.9}}
    card.pop("warning")
    (d / "model_card.json").write_text(json.dumps(card))
    html = post_image(ready_app(d).test_client(), fundus_jpeg(), url="/").get_data(as_text=True)
    for text in ("test · sensitivity", "0.912", "odir only · auc", "300"):
        assert text in html
    assert "Demonstration model" not in html


def test_result_headlines_controlled_then_left_out_source_figures(model_dir, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    card = json.loads((d / "model_card.json").read_text())
    task = {"auc": 0.7, "auc_ci95": [0.6, 0.8], "sensitivity": 0.9, "specificity": 0.4, "negatives": 5, "positives": 6}
    card["evaluation"] = {"tasks": {
        "raw_dr": {**task, "title": "raw camera DR vs ODIR normal", "controlled": False},
        "odir": {**task, "title": "ODIR normal vs glaucoma/cataract", "controlled": True},
    }}
    card["leave_one_source_out"] = [{"left_out": "IDRiD", "tested_on": "290 IDRiD photos vs 165 ODIR normals",
                                     "auc": 0.902, "auc_ci95": [0.871, 0.929], "model": "proxy network"}]
    (d / "model_card.json").write_text(json.dumps(card))
    html = post_image(ready_app(d).test_client(), fundus_jpeg(), url="/").get_data(as_text=True)
    order = [html.index(t) for t in ("ODIR normal vs", "source left out of training · IDRiD", "raw camera DR vs")]
    assert order == sorted(order), "controlled, then left-out source, then the uncontrolled task"
    assert "AUC 0.90 (95% CI 0.87-0.93)" in html


# ------------------------------------------------------------------------------------------ the API


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("diseased", [False, True])
def test_api_predicts_generated_photos(client, app, diseased, seed):
    r = post_image(client, fundus_jpeg(diseased=diseased, seed=seed))
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.get_json()
    p = app.extensions["aisight"]["predictor"]
    assert body["label"] in ("healthy", "diseased")
    assert 0.0 <= body["probability"] <= 1.0
    assert body["threshold"] == p.threshold
    assert body["label"] == ("diseased" if body["probability"] >= body["threshold"] else "healthy")
    assert body["model"]["name"] == p.card["name"] and body["model"]["version"] == p.card["version"]
    assert body["model"]["trained_on"] and body["warning"] == p.card["warning"]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "HEIF", "TIFF", "GIF", "BMP"])
def test_api_takes_every_supported_format(client, fmt):
    img = Image.open(io.BytesIO(fundus_jpeg(seed=4, size=300)))
    r = post_image(client, encode(img, fmt), filename=f"photo.{fmt.lower()}")
    assert r.status_code == 200, r.get_json()


def test_the_app_feeds_the_model_what_training_uses(client, app, tmp_path, monkeypatch):
    """Serving and training preprocess identically: the array reaching the model equals training's."""
    from training.data import Sample, load_arrays

    p = app.extensions["aisight"]["predictor"]
    seen: list[np.ndarray] = []
    real = p.predict_one
    monkeypatch.setattr(p, "predict_one", lambda arr: seen.append(arr.copy()) or real(arr))

    big = Image.open(io.BytesIO(fundus_jpeg(seed=9, size=700))).resize((3000, 2250))
    photos = {
        "phone.jpg": encode(big, "JPEG", quality=88),  # large enough for draft decoding
        "scan.png": encode(big.resize((600, 450)).convert("RGBA"), "PNG"),
        "small.jpg": fundus_jpeg(seed=10, size=300),
    }
    samples = []
    for name, data in photos.items():
        (tmp_path / name).write_bytes(data)
        samples.append(Sample(path=str(tmp_path / name), label=0, patient_id=name))
        assert post_image(client, data, filename=name).status_code == 200
    trained, _, kept, bad = load_arrays(samples, workers=2)
    assert not bad and len(kept) == 3
    for i, s in enumerate(samples):
        assert np.array_equal(seen[i], trained[i]), s.path
        assert np.array_equal(seen[i], preprocess_path(s.path))


def test_api_error_shape_for_unknown_routes(client):
    r = client.get("/api/v1/nothing")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    r = client.get("/api/v1/predict")
    assert r.status_code == 405 and r.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


# ---------------------------------------------------------------------------------------- readiness


def test_healthz_and_readyz_when_ready(client, app):
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 200 and r.get_json()["status"] == "ready"
    assert r.get_json()["model"]["name"] == app.extensions["aisight"]["predictor"].card["name"]


def test_readiness_before_and_after_the_model_loads(model_dir):
    predictor = BlockingPredictor(model_dir)
    app = create_app({"PREDICTOR": predictor})  # background load, held back until released
    c = app.test_client()
    try:
        assert c.get("/healthz").status_code == 200  # alive while the model loads
        r = c.get("/readyz")
        assert r.status_code == 503 and r.get_json()["status"] == "loading"
        r = post_image(c, fundus_jpeg())
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "model_loading"
        assert r.headers["Retry-After"]
        r = post_image(c, fundus_jpeg(), url="/")
        assert r.status_code == 503 and "still loading" in r.get_data(as_text=True)
        assert "starting up" in c.get("/").get_data(as_text=True)
    finally:
        predictor.release.set()
    deadline = time.monotonic() + 60
    while c.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.05)
    assert post_image(c, fundus_jpeg()).status_code == 200
    assert "aisight_model_ready 1.0" in c.get("/metrics").get_data(as_text=True)


def test_missing_model(tmp_path, caplog):
    with caplog.at_level("ERROR"):
        app = create_app({"MODEL_DIR": str(tmp_path / "nowhere"), "MODEL_LOAD": "sync"})
    assert "model card not found" in caplog.text  # the log says why
    c = app.test_client()
    assert c.get("/healthz").status_code == 200
    r = c.get("/readyz")
    assert r.status_code == 503 and r.get_json()["status"] == "failed"
    r = post_image(c, fundus_jpeg())
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "model_unavailable"
    assert "label" not in r.get_json()  # never a made-up answer
    r = post_image(c, fundus_jpeg(), url="/")
    assert r.status_code == 503 and "data-prediction" not in r.get_data(as_text=True)
    assert "not available" in c.get("/").get_data(as_text=True)


def test_corrupt_model_file(model_dir, tmp_path, caplog):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model_card.json").write_text((model_dir / "model_card.json").read_text())
    (d / "model.keras").write_bytes(b"PK\x03\x04 this is not a keras file")
    with caplog.at_level("ERROR"):
        app = create_app({"MODEL_DIR": str(d), "MODEL_LOAD": "sync"})
    assert "model file unreadable" in caplog.text
    c = app.test_client()
    assert c.get("/readyz").status_code == 503
    assert post_image(c, fundus_jpeg()).status_code == 503


def test_unexpected_failure_is_a_json_500_and_serving_goes_on(app, client, monkeypatch):
    p = app.extensions["aisight"]["predictor"]
    monkeypatch.setattr(p, "predict_one", lambda arr: 1 / 0)
    r = post_image(client, fundus_jpeg())
    assert r.status_code == 500 and r.get_json()["error"]["code"] == "internal_error"
    assert "ZeroDivision" not in r.get_data(as_text=True)  # no internals leak
    r = post_image(client, fundus_jpeg(), url="/")
    assert r.status_code == 500 and r.mimetype == "text/html"
    monkeypatch.undo()
    assert post_image(client, fundus_jpeg()).status_code == 200


# ------------------------------------------------------------------------------------------ metrics


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics(model_dir):
    app = ready_app(model_dir)
    c = app.test_client()
    for seed in range(3):
        post_image(c, fundus_jpeg(seed=seed))
    post_image(c, b"not an image")
    c.get("/no/such/page/12345")
    r = c.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    assert metric(text, "aisight_http_requests_total", route="/api/v1/predict", method="POST", status="200") == 3
    assert metric(text, "aisight_http_requests_total", route="/api/v1/predict", method="POST", status="415") == 1
    assert metric(text, "aisight_http_requests_total", route="<unmatched>", status="404") == 1
    assert "/no/such/page" not in text  # routes, not raw paths: bounded label values
    assert metric(text, "aisight_http_request_duration_seconds_count", route="/api/v1/predict") == 4
    preds = metric(text, "aisight_predictions_total", label="healthy") + metric(
        text, "aisight_predictions_total", label="diseased"
    )
    assert preds == 3
    assert metric(text, "aisight_model_load_seconds") > 0
    assert metric(text, "aisight_stage_duration_seconds_count", stage="predict") == 3
    # A second app has a registry of its own: no duplicate registration, no shared counts.
    other = create_app({"MODEL_DIR": str(model_dir), "MODEL_LOAD": "none"}).test_client()
    assert metric(other.get("/metrics").get_data(as_text=True), "aisight_predictions_total", label="healthy") == 0


# ------------------------------------------------------------------------------- headers, no JS inline


@pytest.mark.parametrize("path", ["/", "/healthz", "/api/v1/nothing", "/static/style.css"])
def test_security_headers(client, path):
    h = client.get(path).headers
    csp = h["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and "img-src 'self' data:" in csp
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Referrer-Policy"] == "no-referrer"


def test_result_is_not_cached(client):
    assert post_image(client, fundus_jpeg(), url="/").headers["Cache-Control"] == "no-store"


def test_pages_have_no_inline_script_or_style(client):
    pages = [client.get("/"), post_image(client, fundus_jpeg(), url="/"), post_image(client, b"x", url="/")]
    pages.append(client.get("/nope", headers={"Accept": "text/html"}))
    for r in pages:
        html = r.get_data(as_text=True)
        for tag in re.findall(r"<script\b[^>]*>", html):
            assert "src=" in tag, tag
        assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html), "inline script"
        assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
        assert not re.search(r"\sstyle\s*=", html), "inline style (blocked by the CSP)"


def test_static_assets_are_served(client):
    for name in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200


# ------------------------------------------------------------------------------------- nothing on disk


def test_uploads_are_never_written_to_disk(client):
    from werkzeug.datastructures import FileStorage
    from werkzeug.test import encode_multipart

    big = Image.open(io.BytesIO(fundus_jpeg(seed=3, size=600))).resize((1600, 1600))
    data = encode(big, "PNG")  # ~MBs: Werkzeug would spool anything over 500 kB to a temporary file
    assert len(data) > 1_000_000

    def post(url: str, filename: str):
        # The body is built in memory beforehand: the test client itself spools large bodies to disk.
        boundary, body = encode_multipart({"image": FileStorage(io.BytesIO(data), filename=filename)})
        return client.post(url, data=body, content_type=f"multipart/form-data; boundary={boundary}")

    post("/api/v1/predict", "a.png")  # warm up: lazy imports may write bytecode caches once
    post("/", "a.png")
    _WRITES.clear()
    _WATCH.set()
    try:
        r1 = post("/api/v1/predict", "../../../../tmp/aisight-evil.png")
        r2 = post("/", "/etc/cron.d/evil")
    finally:
        _WATCH.clear()
    assert r1.status_code == 200 and r2.status_code == 200
    assert _WRITES == []
    assert not Path("/tmp/aisight-evil.png").exists()


def test_upload_streams_stay_in_memory(app):
    with app.test_request_context(
        "/api/v1/predict", method="POST", data={"image": (io.BytesIO(b"x" * 2_000_000), "a.jpg")}
    ):
        from flask import request

        assert isinstance(request.files["image"].stream, io.BytesIO)


def test_result_shows_test_headline_of_a_training_card(model_dir, tmp_path):
    # A card from `python -m training train`: the page shows the test patients' four headline numbers
    # per subset, not every cell of every part.
    import shutil

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    card = json.loads((d / "model_card.json").read_text())
    part = {"accuracy": 0.81, "sensitivity": 0.957, "specificity": 0.479, "auc": 0.917, "n": 465}
    card["metrics"] = {"val": {"all": part}, "test": {"all": part, "odir": {**part, "auc": 0.802}}, "overfitting": 0.1}
    (d / "model_card.json").write_text(json.dumps(card))
    html = post_image(ready_app(d).test_client(), fundus_jpeg(), url="/").get_data(as_text=True)
    for text in ("all test patients · sensitivity", "0.957", "source-controlled (ODIR only) · auc", "0.802"):
        assert text in html
    assert "val · all" not in html and "overfitting" not in html
