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
    from aisight.predictor import _bf16_native

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
