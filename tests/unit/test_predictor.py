"""The predictor on a tiny real model: micro-batched answers equal unbatched ones, settings, errors, shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aisight.precision import bf16_native as _bf16_native
from aisight.precision import checked as precision_checked
from aisight.predictor import ModelNotReady, Predictor
from tests.conftest import run_at_once


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 128, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(model_dir: Path):
    p = Predictor(model_dir, max_batch=4, max_wait_ms=20, freeze="sync").load()
    assert p.ready, p.error
    yield p
    p.close()


def test_loads_ready_with_its_settings(predictor: Predictor):
    assert predictor.state == "ready" and predictor.error is None
    assert predictor.precision == "float32" and predictor.device.startswith(("cpu", "gpu"))
    assert predictor.max_batch == 4 and predictor.max_wait_ms == 20
    assert predictor.warm_batches() == [1, 2, 3, 4]
    assert predictor.freeze == "sync" and predictor.graph == "frozen" and predictor.freeze_seconds > 0
    assert 0.0 <= predictor.threshold <= 1.0 and predictor.load_seconds > 0


def test_concurrent_single_images_get_their_own_unbatched_answer(predictor: Predictor, images: np.ndarray):
    expected = [float(predictor.predict(img[None])[0]) for img in images]
    got: dict[int, float] = {}

    def call(i: int) -> None:
        got[i] = predictor.predict_one(images[i])

    run_at_once(call, len(images))
    assert sorted(got) == list(range(len(images)))
    np.testing.assert_allclose([got[i] for i in range(len(images))], expected, atol=1e-5)
    assert all(isinstance(v, float) for v in got.values())
    assert max(predictor._batcher.batch_sizes) <= 4


def test_predict_batch_matches_single_calls(predictor: Predictor, images: np.ndarray):
    batch = predictor.predict(images[:5])
    singles = [predictor.predict_one(img) for img in images[:5]]
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_the_frozen_graph_answers_like_the_traced_one(model_dir: Path, predictor: Predictor, images: np.ndarray):
    traced = Predictor(model_dir, max_batch=4, freeze="off").load()
    assert traced.graph == "traced"
    np.testing.assert_allclose(traced.predict(images), predictor.predict(images), atol=1e-5)
    traced.close()


def test_the_frozen_graph_is_swapped_in_after_ready(model_dir: Path, images: np.ndarray):
    p = Predictor(model_dir, max_batch=2, freeze="background").load()
    assert p.ready  # ready before freezing, on the traced function
    p._freezer.join(120)
    assert p.graph == "frozen"
    assert isinstance(p.predict_one(images[0]), float)
    p.close()


def test_a_failed_freeze_keeps_the_traced_function(model_dir: Path, images: np.ndarray, monkeypatch):
    from aisight import tf_backend as mod

    def broken(concrete):
        raise RuntimeError("no constants today")

    monkeypatch.setattr(mod, "freeze", broken)
    p = Predictor(model_dir, max_batch=2, freeze="background").load()
    p._freezer.join(60)
    assert p.ready and p.graph == "traced"
    assert isinstance(p.predict_one(images[0]), float)
    p.close()
    p = Predictor(model_dir, max_batch=2, freeze="sync").load()
    assert p.ready and p.graph == "traced"
    np.testing.assert_allclose(p.predict_one(images[0]), p.predict(images[:1])[0], atol=1e-6)
    p.close()


def test_padded_batches_answer_like_single_images(model_dir: Path, images: np.ndarray):
    # Above 8, batches are padded: nine images run as a batch of 12; the padding never leaks into the answers.
    p = Predictor(model_dir, max_batch=12, freeze="off").load()
    np.testing.assert_allclose(p.predict(images[:9]), [p.predict(img[None])[0] for img in images[:9]], atol=1e-5)
    assert p.predict(images[:9]).shape == (9,)
    p.close()


def test_batch_sizes_are_all_small_ones_then_powers_of_two(model_dir: Path):
    assert Predictor(model_dir, max_batch=1).warm_batches() == [1]
    assert Predictor(model_dir, max_batch=8).warm_batches() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert Predictor(model_dir, max_batch=12).warm_batches() == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert Predictor(model_dir, max_batch=32).warm_batches() == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32]


def test_wrong_shapes_are_refused_before_batching(predictor: Predictor):
    with pytest.raises(ValueError, match="one image"):
        predictor.predict_one(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="expected images"):
        predictor.predict(np.zeros((2, 64, 64, 3), np.uint8))


def test_a_model_error_reaches_every_waiting_caller(model_dir: Path, images: np.ndarray):
    p = Predictor(model_dir, max_batch=8, max_wait_ms=50, freeze="off").load()
    assert p.ready

    def broken(batch):
        raise RuntimeError("device lost")

    p._infer = broken
    errors: list[Exception] = []

    def call(i: int) -> None:
        try:
            p.predict_one(images[i])
        except RuntimeError as exc:
            errors.append(exc)

    run_at_once(call, 6)
    p.close()
    assert len(errors) == 6 and all("device lost" in str(e) for e in errors)


def test_close_stops_answering(model_dir: Path, images: np.ndarray):
    p = Predictor(model_dir, max_batch=2, max_wait_ms=1).load()
    assert isinstance(p.predict_one(images[0]), float)
    p.close()
    assert not p.ready and not p._batcher._thread.is_alive()
    with pytest.raises(ModelNotReady):
        p.predict_one(images[0])
    p.close()


def test_batch_of_one_means_no_batcher(model_dir: Path, images: np.ndarray, monkeypatch):
    monkeypatch.setenv("AISIGHT_BATCH_MAX", "1")
    monkeypatch.setenv("AISIGHT_BATCH_WAIT_MS", "0")
    p = Predictor(model_dir).load()
    assert p.ready and p.max_batch == 1 and p._batcher is None
    np.testing.assert_allclose(p.predict_one(images[0]), p.predict(images[:1])[0], atol=1e-6)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AISIGHT_BATCH_MAX", "12")
    monkeypatch.setenv("AISIGHT_BATCH_WAIT_MS", "2.5")
    monkeypatch.setenv("AISIGHT_PRECISION", "BF16")
    monkeypatch.setenv("AISIGHT_FREEZE", "off")
    p = Predictor("nowhere")
    assert (p.max_batch, p.max_wait_ms, p.precision, p.freeze) == (12, 2.5, "bf16", "off")
    for name in ("AISIGHT_BATCH_MAX", "AISIGHT_BATCH_WAIT_MS", "AISIGHT_PRECISION", "AISIGHT_FREEZE"):
        monkeypatch.delenv(name)
    p = Predictor("nowhere")
    assert (p.max_batch, p.max_wait_ms, p.precision, p.freeze) == (8, 3.0, "auto", "background")


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("AISIGHT_BATCH_MAX", "many", "must be a number"),
        ("AISIGHT_BATCH_MAX", "0", "at least 1"),
        ("AISIGHT_BATCH_WAIT_MS", "-1", ">= 0"),
        ("AISIGHT_PRECISION", "int4", "must be one of"),
        ("AISIGHT_FREEZE", "later", "must be one of"),
    ],
)
def test_bad_settings_are_refused(monkeypatch, name: str, value: str, match: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        Predictor("nowhere")


def test_not_ready_before_load_and_failed_without_a_model(tmp_path: Path, images: np.ndarray):
    p = Predictor(tmp_path)
    with pytest.raises(ModelNotReady):
        p.predict_one(images[0])
    p.load()
    assert p.state == "failed" and "model card not found" in p.error and p._batcher is None
    with pytest.raises(ModelNotReady):
        p.predict_one(images[0])


def test_bf16_answers_close_to_float32(model_dir: Path, predictor: Predictor, images: np.ndarray):
    p = Predictor(model_dir, max_batch=4, max_wait_ms=1, precision="bf16").load()
    assert p.ready, p.error
    if not _bf16_native(p.device):
        assert p.precision == "float32"  # falls back where bf16 would be emulated (slow)
        pytest.skip("no native bf16 here")
    assert p.precision == "bf16"
    assert p.model.layers[-1].dtype_policy.name == "float32"  # the softmax stays float32
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in p.model.layers)
    diff = np.abs(p.predict(images) - predictor.predict(images))
    p.close()
    assert diff.max() < 0.05


def test_bf16_falls_back_to_cloning_without_the_one_build_loader(model_dir: Path, monkeypatch):
    from aisight import tf_backend as mod

    def missing(fileobj):
        raise TypeError("no file objects here")

    monkeypatch.setattr(mod, "_load_from_fileobj", missing)
    net = mod.load_bf16(model_dir)
    reference = mod.load_model(model_dir)
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in net.layers)
    assert net.layers[-1].dtype_policy.name == "float32"
    assert all(np.array_equal(a, b) for a, b in zip(net.get_weights(), reference.get_weights(), strict=True))


def test_pyplot_is_blocked_only_inside_the_first_keras_import():
    code = (
        "from aisight.tf_backend import without_pyplot\n"
        "with without_pyplot():\n"
        "    try:\n"
        "        import matplotlib.pyplot\n"
        "        raise SystemExit('pyplot imported inside the block')\n"
        "    except ImportError:\n"
        "        pass\n"
        "import matplotlib.pyplot\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr


def test_pyplot_block_is_a_no_op_once_keras_is_loaded():
    import keras  # noqa: F401

    from aisight.tf_backend import without_pyplot

    before = sys.modules.get("matplotlib.pyplot")
    with without_pyplot():
        assert sys.modules.get("matplotlib.pyplot") is before


def test_checked_reads_the_cards_record():
    assert precision_checked({}, "bf16")[0] is False
    assert precision_checked({"precision_check": {"bf16": {"auc_change_points": 0.1}}}, "bf16")[0] is False
    ok, why = precision_checked({"precision_check": {"bf16": {"accuracy_change_points": -0.4, "n": 465}}}, "bf16")
    assert ok and "-0.40 points" in why and "465" in why
    ok, why = precision_checked({"precision_check": {"bf16": {"accuracy_change_points": 1.5}}}, "bf16")
    assert not ok and "+1.50 points" in why
    # int8 is judged by its worst source, not by the pooled change.
    int8 = {"accuracy_change_points": 0.1, "worst_accuracy_change_points": -1.2, "n": 5512}
    ok, why = precision_checked({"precision_check": {"int8": int8}}, "int8")
    assert not ok and "-1.20 points" in why
    assert precision_checked({"precision_check": {"bf16": int8}}, "int8")[0] is False
    ranked = {"accuracy_change_points": 0.1, "worst_accuracy_change_points": 0.8, "worst_auc_change_points": 3.4}
    ok, why = precision_checked({"precision_check": {"int8": ranked}}, "int8")
    assert not ok and "AUC by 3.40 points" in why


def test_auto_precision_needs_the_cards_bf16_check(model_dir: Path, tmp_path: Path):
    import shutil

    from aisight.artifact import read_card, write_card
    from aisight.preprocess import preprocess_bytes
    from tests.conftest import fundus_jpeg

    images = np.stack([preprocess_bytes(fundus_jpeg(diseased=bool(i % 2), seed=i)) for i in range(6)])
    unchecked = Predictor(model_dir, max_batch=1, freeze="off").load()
    assert unchecked.ready and unchecked.precision == "float32"  # the card records no check
    checked_dir = tmp_path / "model"
    shutil.copytree(model_dir, checked_dir)
    card = read_card(checked_dir)
    card["precision_check"] = {"bf16": {"accuracy_change_points": 0.0, "answers_changed": 0, "n": 16}}
    write_card(checked_dir, card)
    checked = Predictor(checked_dir, max_batch=1, freeze="off").load()
    assert checked.ready
    assert checked.precision == ("bf16" if _bf16_native(checked.device) else "float32")
    forced = Predictor(checked_dir, max_batch=1, freeze="off", precision="float32").load()
    assert forced.precision == "float32"
    diff = np.abs(checked.predict(images) - unchecked.predict(images)).max()
    assert diff < 0.05 and (diff > 0) == (checked.precision == "bf16")
