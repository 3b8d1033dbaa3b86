"""The OpenVINO fast path on a tiny real model: export, same answers as TensorFlow, stale IRs refused, fallbacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aisight import ov_backend
from aisight.predictor import Predictor
from tests.conftest import ROOT, fundus_jpeg

pytestmark = pytest.mark.skipif(not ov_backend.available(), reason="OpenVINO is not installed")


@pytest.fixture(scope="module")
def ov_dir(model_dir: Path, tmp_path_factory) -> Path:
    """A copy of the tiny model artifact with its OpenVINO IR."""
    out = tmp_path_factory.mktemp("ov") / "model"
    shutil.copytree(model_dir, out)
    info = ov_backend.export_dir(out)
    assert info["max_abs_diff"] <= 1e-4 and info["keras_sha256"] == ov_backend.keras_sha256(out)
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Generated fundus photos, healthy and diseased, as the model's inputs."""
    from aisight.preprocess import preprocess_bytes

    return np.stack([preprocess_bytes(fundus_jpeg(diseased=bool(i % 2), seed=i)) for i in range(12)])


def test_openvino_answers_as_tensorflow_does(ov_dir: Path, images: np.ndarray):
    ov = Predictor(ov_dir, max_batch=4, max_wait_ms=5).load()
    tf = Predictor(ov_dir, max_batch=1, backend="tensorflow", freeze="off").load()
    try:
        assert ov.ready and ov.backend == "openvino" and ov.graph == "openvino", ov.error
        assert tf.ready and tf.backend == "tensorflow" and tf.graph == "traced"
        assert ov.warm_batches() == [1, 2, 3, 4] and ov.model is None  # Keras: only once an explanation asks
        expected = tf.predict(images)
        np.testing.assert_allclose(ov.predict(images), expected, atol=1e-5)
        np.testing.assert_allclose([ov.predict_one(img) for img in images[:3]], expected[:3], atol=1e-5)
        assert np.ptp(expected) > 0.1  # the images get different answers: a real comparison
        model = ov.explain_model()
        assert model is ov.explain_model() and model.output_shape == (None, 2)
    finally:
        ov.close()
        tf.close()


def test_bf16_moves_answers_only_by_rounding(ov_dir: Path, images: np.ndarray):
    from aisight.precision import bf16_native as _bf16_native

    if not _bf16_native("cpu"):
        pytest.skip("this CPU has no native bf16 (AMX/AVX512-BF16)")
    f32 = Predictor(ov_dir, max_batch=1).load()
    b16 = Predictor(ov_dir, max_batch=1, precision="bf16").load()
    assert b16.precision == "bf16" and b16.backend == "openvino"
    diff = np.abs(b16.predict(images) - f32.predict(images))
    assert diff.max() < 0.05 and diff.max() > 0  # bf16 really computes in bf16, and only rounds


def test_serving_with_openvino_never_imports_tensorflow(ov_dir: Path):
    code = (
        "import sys, numpy as np\n"
        "from aisight.predictor import Predictor\n"
        f"p = Predictor({str(ov_dir)!r}, max_batch=2).load()\n"
        "assert p.ready and p.backend == 'openvino', p.error\n"
        "print(p.predict_one(np.zeros((128, 128, 3), np.uint8)))\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
        "p.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    prob, imported = out.stdout.strip().splitlines()
    assert 0.0 <= float(prob) <= 1.0 and imported == "False False"


def test_a_stale_ir_is_refused(ov_dir: Path, tmp_path: Path, caplog):
    stale = tmp_path / "model"
    shutil.copytree(ov_dir, stale)
    with (stale / "model.keras").open("ab") as f:  # the zip still loads; its checksum no longer matches
        f.write(b"\0")
    with pytest.raises(Exception, match="converted from another model.keras"):
        ov_backend.OpenVINOModel(stale)
    insisted = Predictor(stale, max_batch=1, backend="openvino").load()
    assert insisted.state == "failed" and "converted from another model.keras" in insisted.error
    auto = Predictor(stale, max_batch=1, freeze="off").load()
    assert auto.ready and auto.backend == "tensorflow"
    assert "OpenVINO not used" in caplog.text


def test_without_an_ir_auto_serves_with_tensorflow(model_dir: Path):
    assert not ov_backend.has_ir(model_dir)
    p = Predictor(model_dir, max_batch=1, freeze="off").load()
    assert p.ready and p.backend == "tensorflow"
    insisted = Predictor(model_dir, max_batch=1, backend="openvino").load()
    assert insisted.state == "failed" and "no OpenVINO IR" in insisted.error


def test_backend_setting_is_checked(model_dir: Path, monkeypatch):
    monkeypatch.setenv("AISIGHT_BACKEND", "TensorFlow ")
    assert Predictor(model_dir).backend == "tensorflow"
    monkeypatch.setenv("AISIGHT_BACKEND", "onnx")
    with pytest.raises(ValueError, match="AISIGHT_BACKEND"):
        Predictor(model_dir)


def test_infer_threads_setting():
    assert ov_backend.infer_threads({}) is None
    assert ov_backend.infer_threads({"TF_NUM_INTRAOP_THREADS": "2"}) == 2
    assert ov_backend.infer_threads({"AISIGHT_INFER_THREADS": "3", "TF_NUM_INTRAOP_THREADS": "2"}) == 3
    with pytest.raises(ValueError, match="AISIGHT_INFER_THREADS"):
        ov_backend.infer_threads({"AISIGHT_INFER_THREADS": "two"})


def test_training_cli_exports_and_a_new_model_drops_the_old_ir(ov_dir: Path, tmp_path: Path):
    from training.__main__ import main
    from training.export import export_artifact

    art = tmp_path / "model"
    shutil.copytree(ov_dir, art)
    (art / "model.xml").unlink()
    (art / "model.bin").unlink()
    assert main(["export-openvino", "--model", str(art)]) == 0
    assert ov_backend.has_ir(art)
    ov_backend.OpenVINOModel(art)  # loads: converted from this very model.keras

    model = Predictor(art, backend="tensorflow", max_batch=1).load().model
    card = json.loads((art / "model_card.json").read_text())
    export_artifact(model, art, card)  # a retrained model written over the artifact
    assert not ov_backend.has_ir(art)
    assert main(["export-openvino", "--model", str(tmp_path / "missing")]) == 2


def test_a_keras_model_that_fails_to_load_is_not_retried(ov_dir: Path, monkeypatch):
    import aisight.predictor as mod

    p = Predictor(ov_dir, max_batch=1).load()
    assert p.ready and p.backend == "openvino"
    calls = []

    def broken(model_dir):
        calls.append(model_dir)
        raise mod.ArtifactError("model file unreadable")

    monkeypatch.setattr(mod, "load_model", broken)
    for _ in range(3):
        with pytest.raises(mod.ArtifactError, match="unreadable"):
            p.explain_model()
    assert len(calls) == 1  # answered from the remembered failure, not seconds of loading per request
    assert p.ready  # predictions go on without explanations


# --------------------------------------------------------------------------- int8, and the precision choice


@pytest.fixture(scope="module")
def int8_dir(ov_dir: Path, tmp_path_factory) -> Path:
    """The tiny artifact quantised by the real command: NNCF on seen patients, checked on unseen ones."""
    import json
    import subprocess
    import sys

    from training.data import load_sources
    from training.synthetic import write_dataset

    base = tmp_path_factory.mktemp("int8")
    data = ",".join(str(write_dataset(base / name, n_per_class=10, seed=seed, size=160, source=name))
                    for seed, name in ((1, "odir"), (2, "eyepacs")))
    out = base / "model"
    shutil.copytree(ov_dir, out)
    patients = sorted({s.patient_id for s in load_sources(data).samples})
    (out / "split_patients.json").write_text(json.dumps({"train": patients[::2], "val": [], "test": patients[1::2]}))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "training", "export-openvino", "--model", str(out), "--int8",
                           "--data", data, "--cache", str(base / "cache"), "--calibration", "12"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _with_int8_check(src: Path, dst: Path, worst: float) -> Path:
    from aisight.artifact import read_card, write_card

    shutil.copytree(src, dst)
    card = read_card(dst)
    card["precision_check"]["int8"].update(worst_accuracy_change_points=worst, worst_auc_change_points=0.0)
    write_card(dst, card)
    return dst


def test_int8_export_records_its_check_per_source(int8_dir: Path, images: np.ndarray):
    from aisight.artifact import read_card

    assert ov_backend.has_ir(int8_dir, ov_backend.INT8_IR_FILE)
    record = read_card(int8_dir)["precision_check"]["int8"]
    assert set(record["per_source"]) == {"odir", "eyepacs"} and record["calibration_photos"] == 12
    assert record["n"] == sum(r["n"] for r in record["per_source"].values()) == 20  # the unseen half
    assert record["within_limit"] == (record["worst_accuracy_change_points"] < 1.0
                                      and record["worst_auc_change_points"] < 1.0)
    f32 = ov_backend.OpenVINOModel(int8_dir, "float32")(images.astype(np.float32))
    q = ov_backend.OpenVINOModel(int8_dir, "int8")(images.astype(np.float32))
    assert q.shape == f32.shape and np.all(np.isfinite(q))
    assert 0 < np.abs(q - f32).max() < 0.2  # really quantised, and still the same model


def test_accuracy_control_keeps_validation_answers_within_half_the_bound(ov_dir: Path, tmp_path: Path):
    """--accuracy-control: NNCF reverts layers to float32 until the worst per-source change on the model's
    validation patients is under half the bound; the record says which layers and on how many photos."""
    from aisight.artifact import read_card
    from training.data import load_arrays, load_sources
    from training.quantize import ACCURACY_CONTROL_DROP, _probs, int8_record
    from training.synthetic import write_dataset

    data = ",".join(str(write_dataset(tmp_path / name, n_per_class=9, seed=seed, size=160, source=name))
                    for seed, name in ((3, "odir"), (4, "eyepacs")))
    out = tmp_path / "model"
    shutil.copytree(ov_dir, out)
    samples = load_sources(data).samples
    patients = sorted({s.patient_id for s in samples})
    parts = {"train": patients[0::3], "val": patients[1::3], "test": patients[2::3]}
    (out / "split_patients.json").write_text(json.dumps(parts))
    proc = subprocess.run([sys.executable, "-m", "training", "export-openvino", "--model", str(out), "--int8",
                           "--accuracy-control", "--data", data, "--cache", str(tmp_path / "cache"),
                           "--calibration", "8"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = read_card(out)
    record = card["precision_check"]["int8"]
    val = [s for s in samples if s.patient_id in set(parts["val"])]
    assert record["accuracy_control_photos"] == len(val) and "--accuracy-control" in record["by"]
    assert isinstance(record["float32_layers"], list)
    x, y, kept, _ = load_arrays(val, tmp_path / "cache", preprocessing=card.get("preprocessing", "resize"))
    ref = _probs(ov_backend.OpenVINOModel(out, "float32"), x)
    new = _probs(ov_backend.OpenVINOModel(out, "int8"), x)
    on_val = int8_record([s.source or s.folder for s in kept], y, ref, new, float(card["threshold"]))
    worst = max(on_val["worst_accuracy_change_points"], on_val["worst_auc_change_points"])
    assert worst <= ACCURACY_CONTROL_DROP, (worst, record["float32_layers"])


def test_a_new_model_keras_drops_the_int8_ir_too(int8_dir: Path, tmp_path: Path):
    d = tmp_path / "m"
    shutil.copytree(int8_dir, d)
    ov_backend.remove_ir(d)
    assert not ov_backend.has_ir(d) and not ov_backend.has_ir(d, ov_backend.INT8_IR_FILE)


def test_auto_times_the_allowed_precisions_and_caches_the_choice(int8_dir, tmp_path, monkeypatch, images):
    from aisight.precision import fastest

    monkeypatch.setenv("AISIGHT_CACHE_DIR", str(tmp_path / "cache"))
    d = _with_int8_check(int8_dir, tmp_path / "allowed", worst=0.0)
    first = Predictor(d, max_batch=4).load()
    c = first.precision_choice
    assert first.ready and c.by == "timing" and set(c.timings_ms) >= {"float32", "int8"}
    assert set(c.timings_ms["int8"]) == {"1", "4"} and first.precision == c.precision
    assert (c.precision, c.why) == fastest(c.timings_ms)  # the measured winner, by the rule
    second = Predictor(d, max_batch=4).load()  # another worker: the measurement is reused, not repeated
    assert second.precision_choice.by == "cache" and second.precision == first.precision
    assert np.abs(second.predict(images) - first.predict(images)).max() == 0
    first.close(), second.close()


def test_int8_outside_its_bound_is_never_chosen_unless_forced(int8_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AISIGHT_CACHE_DIR", str(tmp_path / "cache"))
    d = _with_int8_check(int8_dir, tmp_path / "refused", worst=-1.5)
    auto = Predictor(d, max_batch=2).load()
    assert auto.precision == "float32" and auto.precision_choice.by == "rule"
    assert "-1.50 points" in auto.precision_choice.refused["int8"]
    forced = Predictor(d, max_batch=2, precision="int8").load()
    assert forced.precision == "int8" and forced.precision_choice.by == "setting"
    plain = Predictor(ov_dir_without_int8(int8_dir, tmp_path), max_batch=2, precision="int8").load()
    assert plain.precision == "float32" and "no int8 IR" in plain.precision_choice.why
    for p in (auto, forced, plain):
        p.close()


def ov_dir_without_int8(int8_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "no-int8"
    shutil.copytree(int8_dir, d)
    for name in ("model_int8.xml", "model_int8.bin"):
        (d / name).unlink()
    return d


def test_the_fastest_precision_must_beat_float32_clearly():
    from aisight.precision import fastest

    assert fastest({"float32": {"1": 10.0, "8": 80.0}, "int8": {"1": 6.0, "8": 40.0}})[0] == "int8"
    tie = fastest({"float32": {"1": 10.0, "8": 80.0}, "int8": {"1": 9.8, "8": 78.0}})
    assert tie[0] == "float32" and "not 5% faster" in tie[1]
    assert fastest({"float32": {"1": 10.0}, "int8": {"1": 12.0}})[0] == "float32"


def test_readyz_and_metrics_say_which_precision_serves_and_why(int8_dir, tmp_path, monkeypatch):
    from app import create_app
    from tests.unit.test_app import metric

    monkeypatch.setenv("AISIGHT_CACHE_DIR", str(tmp_path / "cache"))
    d = _with_int8_check(int8_dir, tmp_path / "served", worst=0.0)
    app = create_app({"TESTING": True, "MODEL_DIR": str(d), "MODEL_LOAD": "sync", "STORE": False})
    c = app.test_client()
    body = c.get("/readyz").get_json()
    assert body["precision"] == body["precision_choice"]["precision"] in ("float32", "int8")
    assert body["precision_choice"]["by"] == "timing" and "int8" in body["precision_choice"]["timings_ms"]
    text = c.get("/metrics").get_data(as_text=True)
    assert metric(text, "aisight_model_precision", chosen_by="timing", precision=body["precision"]) == 1
    app.extensions["aisight"]["predictor"].close()
