"""The domain-adversarial head: the reversal, the label-conditioned loss, what it erases, and a real run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression

from training import adversary
from training.metrics import auc
from training.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_ramp_rises_from_zero_to_one():
    values = [adversary.ramp(e, 10) for e in range(11)]
    assert values[0] == 0.0 and all(b > a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > 0.99


def test_cell_labels():
    assert adversary.cell_labels(np.array([0, 1, 2, 1]), np.array([0, 1, 1, 1])).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="both labels"):
        adversary.cell_labels(np.array([0, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="0..n-1"):
        adversary.cell_labels(np.array([0, 2]), np.array([0, 1]))


def test_reversal_is_identity_forward_and_turns_the_gradient():
    layer = adversary.register()["GradientReversal"]()
    x = tf.constant([[1.0, -2.0, 3.0]])
    layer.build(x.shape)
    adversary_scale = 0.7
    layer.scale.assign(adversary_scale)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[-0.7, -1.4, -2.1]], rtol=1e-6)


def test_loss_names_the_camera_only_among_the_photos_of_the_label():
    loss = adversary.register()["ConditionalSourceLoss"]([0, 0, 1, 1])  # cells 0,1 healthy; 2,3 diseased
    y_true = tf.constant([[1.0, 0.0, 1.0]])  # healthy, cell 1
    prob = [0.9, 0.1]
    base = float(loss(y_true, tf.constant([prob + [0.0, 0.0, 0.0, 0.0]])))
    # Logits of the other label's cells change nothing: the head never has to tell labels apart.
    other = float(loss(y_true, tf.constant([prob + [0.0, 0.0, 9.0, -9.0]])))
    assert other == pytest.approx(base, abs=1e-5)
    # Between the two healthy cells, ln 2 at a tie, less when the head names cell 1, more when cell 0.
    assert base == pytest.approx(0.01 + np.log(2), abs=1e-5)
    assert float(loss(y_true, tf.constant([prob + [0.0, 4.0, 0.0, 0.0]]))) < base
    assert float(loss(y_true, tf.constant([prob + [4.0, 0.0, 0.0, 0.0]]))) > base
    # The head's hit rate counts its pick among the label's own cells too.
    hits = adversary.register()["SourceAccuracy"]([0, 0, 1, 1])
    hits.update_state(y_true, tf.constant([prob + [0.0, 1.0, 9.0, 9.0]]))
    hits.update_state(y_true, tf.constant([prob + [1.0, 0.0, 9.0, 9.0]]))
    assert float(hits.result()) == pytest.approx(0.5)


def _camera_left_in_features(weight: float) -> tuple[float, float]:
    """Train a two-layer classifier on vectors that show the label weakly and a camera strongly; return
    how well a linear probe reads the camera from its features within each label, and its AUC."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 800
    y, cam = rng.integers(0, 2, n), rng.integers(0, 2, n)
    x = np.stack([(2 * y - 1) + rng.normal(0, 0.7, n), (2 * cam - 1) + rng.normal(0, 0.1, n),
                  rng.normal(0, 1, n)], 1).astype("float32")
    cells = 2 * y + cam
    inp = keras.Input((3,), name="image")
    feat = keras.layers.Dense(8, activation="relu", name="features")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="prediction")(feat))
    t = adversary.trainer(model, adversary.cell_labels(cells, y), keras.optimizers.Adam(3e-3),
                          "mean_squared_error", hidden=16, feature="features")
    adversary.set_scale(t, weight)
    t.fit(x, adversary.targets(keras.utils.to_categorical(y, 2), cells), epochs=30, batch_size=32, verbose=0)
    f = keras.Model(inp, feat)(x).numpy()
    first = np.arange(n) < n // 2
    hits = []
    for label in (0, 1):
        fit, held = (y == label) & first, (y == label) & ~first
        hits.append(LogisticRegression(max_iter=2000).fit(f[fit], cam[fit]).score(f[held], cam[held]))
    return float(np.mean(hits)), auc(y, model(x).numpy()[:, 1])


def test_the_adversary_erases_the_camera_not_the_label():
    plain, plain_auc = _camera_left_in_features(0.0)
    erased, erased_auc = _camera_left_in_features(1.0)
    assert plain > 0.9  # the features carry the camera when nothing works against it
    assert erased < plain - 0.05
    assert plain_auc > 0.95 and erased_auc > 0.95


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> str:
    """Two sources with both labels and one with retinopathy only, as the shared data has them."""
    base = tmp_path_factory.mktemp("folders")
    return ",".join(map(str, [
        write_dataset(base / "a", n_per_class=8, seed=1, size=160, source="odir"),
        write_dataset(base / "b", n_per_class=8, seed=2, size=160, source="eyepacs", graded=True),
        write_dataset(base / "c", n_per_class=6, seed=3, size=160, source="idrid", labels=("diseased",)),
    ]))


TINY = ["--arch", "TinyNet", "--preprocessing", "fundus-v2", "--balance", "cell", "--epoch-size", "32",
        "--batch-size", "16", "--augment", "--head", "gap", "--trainable", "all", "--adversary", "0.5"]


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_adversarial_run_resumes_and_saves_the_classifier_alone(folders, tmp_path):
    """A real run (fundus-v2, cell-balanced, TinyNet): the checkpoint holds the trainer, a resume goes on
    with it, and the artifact the app would load is the classifier without the head."""
    common = ["train", "--data", folders, *TINY, "--out", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run"),
              "--cache", str(tmp_path / "cache"), "--target-sensitivity", "0.9"]
    first = _cli(tmp_path, *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli(tmp_path, *common, "--epochs", "2", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "epoch 2/2" in second.stdout
    saved = json.loads(zipfile.ZipFile(tmp_path / "run" / "checkpoint" / "last.keras").read("config.json"))
    assert any(layer["name"] == "dann_reverse" for layer in saved["config"]["layers"])
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(0 <= float(r["train_source_accuracy"]) <= 1 for r in rows)
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["training"]["config"]["adversary"] == 0.5
    artifact = json.loads(zipfile.ZipFile(tmp_path / "model" / "model.keras").read("config.json"))
    names = [layer["name"] for layer in artifact["config"]["layers"]]
    assert "prediction" in names and not any(name.startswith("dann") for name in names)


def test_compare_leaves_a_source_out_and_pairs_two_runs(folders, tmp_path):
    """compare trains without the left-out source and scores all of its photos; paired sets two runs on
    the same photos side by side and refuses runs on different photos."""
    run = _cli(tmp_path, "compare", "--data", folders, *TINY, "--epochs", "1", "--leave-out", "idrid",
               "--out", str(tmp_path / "dann"), "--cache", str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "dann" / "result.json").read_text())
    assert result["leave_out"] == "idrid" and result["config"]["adversary"] == 0.5
    pred = dict(np.load(tmp_path / "dann" / "predictions.npz"))
    assert (pred["source"] == "idrid").sum() == 6  # every photo of the left-out source, none trained on
    # A "baseline" that is the run with its answers for the ODIR photos turned around.
    base = tmp_path / "base"
    base.mkdir()
    flipped = np.where(pred["source"] == "odir", 1 - pred["prob"], pred["prob"])
    np.savez(base / "predictions.npz", **{**pred, "prob": flipped})
    out = _cli(tmp_path, "paired", "--run", str(tmp_path / "dann"), "--baseline", str(base), "--out", str(base))
    assert out.returncode == 0, out.stderr[-3000:]
    paired = json.loads((base / "paired.json").read_text())
    odir = paired["odir"]
    assert odir["run"] + odir["baseline"] == pytest.approx(1.0) and odir["difference"] == pytest.approx(
        odir["run"] - odir["baseline"])
    assert odir["ci95"][0] <= odir["difference"] <= odir["ci95"][1]
    assert paired["raw_dr"]["difference"] != 0  # its healthy side is ODIR: changed too
    assert "| ODIR: normal vs glaucoma or cataract |" in out.stdout
    np.savez(base / "predictions.npz", **{**pred, "y": 1 - pred["y"]})
    refused = _cli(tmp_path, "paired", "--run", str(tmp_path / "dann"), "--baseline", str(base))
    assert refused.returncode == 2 and "not evaluated on the same photos" in refused.stderr

