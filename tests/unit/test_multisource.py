"""Several folders at once: loading, patient split across folders, balanced epochs, tasks, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training.data import Sample, load_sources, split_by_patient
from training.evaluate import bootstrap_auc, bootstrap_auc_difference, shortcut_probe, task_metrics
from training.metrics import auc
from training.sampling import epoch_indices
from training.synthetic import write_dataset
from training.tasks import cells, get_task, task_masks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Three small folders as the shared data has them: two sources with both labels, one with one."""
    base = tmp_path_factory.mktemp("multi")
    a = write_dataset(base / "odir-like", n_per_class=8, seed=1, size=160, source="odir")
    b = write_dataset(base / "graded", n_per_class=8, seed=2, size=160, source="eyepacs", graded=True)
    c = write_dataset(base / "raw-dr", n_per_class=6, seed=3, size=160, source="idrid", labels=("diseased",))
    return [a, b, c]


def test_several_folders_load_as_one(folders):
    ds = load_sources(",".join(map(str, folders)))
    assert len(ds.samples) == 16 + 16 + 6
    assert {s.folder for s in ds.samples} == {"odir-like", "graded", "raw-dr"}
    assert load_sources([str(p) for p in folders]).samples == ds.samples  # --data given three times
    with pytest.raises(ValueError, match="no healthy"):  # one class alone is not a data set
        load_sources(str(folders[2]))


def test_a_patient_in_two_folders_stays_in_one_part():
    samples = [Sample(f"/x/{i}.jpg", i % 2, f"eyepacs-{i // 3}", "eyepacs", folder=f"f{i % 2}") for i in range(300)]
    parts = split_by_patient(samples, seed=0)
    owners = {}
    for k, part in enumerate(parts):
        for s in part:
            assert owners.setdefault(s.patient_id, k) == k


def test_balanced_epochs():
    labels = np.array([0] * 900 + [1] * 100)
    cell = np.array([0] * 900 + [1] * 64 + [2] * 36)
    rng = np.random.default_rng(0)
    idx = epoch_indices(labels, cell, "label", 20000, rng)
    assert abs(labels[idx].mean() - 0.5) < 0.02
    idx = epoch_indices(labels, cell, "cell", 20000, rng)
    share = np.bincount(cell[idx], minlength=3) / len(idx)
    # Half per label; within label 1, cells in proportion to the square root of their size (8:6).
    assert share[0] == pytest.approx(0.5, abs=0.02) and share[1] / share[2] == pytest.approx(8 / 6, rel=0.1)
    assert sorted(epoch_indices(labels, None, "none", 0, rng)) == list(range(1000))
    with pytest.raises(ValueError):
        epoch_indices(labels, cell, "sources", 10, rng)



def test_pairs_balance_within_each_look():
    """Looks holding both labels take pair_share of each label, label-balanced within each look (by the
    square root of the look's size); single-label looks share the rest of their label."""
    # look 0: 900 healthy + 100 diseased (one collection); look 1: 100 + 300; look 2: 400 diseased only.
    looks = np.repeat([0, 0, 1, 1, 2], [900, 100, 100, 300, 400])
    labels = np.repeat([0, 1, 0, 1, 1], [900, 100, 100, 300, 400])
    cells = looks * 2 + labels
    rng = np.random.default_rng(0)
    idx = epoch_indices(labels, cells, "pairs", 40000, rng, looks, 0.75)
    share = np.bincount(cells[idx], minlength=6) / len(idx)
    assert labels[idx].mean() == pytest.approx(0.5, abs=0.01)
    # Healthy: all from the paired looks, sqrt(1000):sqrt(400); diseased: 0.75 of it in the same ratio.
    assert share[0] / share[2] == pytest.approx(np.sqrt(1000 / 400), rel=0.05)
    assert share[1] / share[0] == pytest.approx(0.75, rel=0.05) and share[3] / share[2] == pytest.approx(0.75, rel=0.05)
    assert share[5] == pytest.approx(0.125, abs=0.01)
    # Where every look holds one label only there is nothing to pair: the cell balance.
    solo = np.repeat([0, 1], [500, 500])
    both = epoch_indices(solo, solo, "pairs", 4000, np.random.default_rng(1), solo, 0.75)
    assert np.bincount(solo[both]).min() > 1800
    with pytest.raises(ValueError, match="look"):
        epoch_indices(labels, cells, "pairs", 10, rng)
    with pytest.raises(ValueError, match="pair_share"):
        epoch_indices(labels, cells, "pairs", 10, rng, looks, 0.0)

def test_tasks_pick_their_photos(folders):
    ds = load_sources(",".join(map(str, folders)))
    mask, y = get_task("eyepacs_moderate").select(ds.samples)
    picked = [s for s, m in zip(ds.samples, mask, strict=True) if m]
    assert all(s.source == "eyepacs" and s.original_label in ("no_dr", "moderate_dr") for s in picked)
    assert set(y) == {0, 1}
    assert set(task_masks(ds.samples)) >= {"odir", "eyepacs_any", "eyepacs_moderate", "raw_dr", "pooled"}
    assert len(set(cells(ds.samples))) == 5  # odir x2, eyepacs x2, idrid x1


def test_bootstrap_interval_holds_the_auc_and_narrows():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(400), np.ones(400)]
    p = np.r_[rng.normal(0, 1, 400), rng.normal(1, 1, 400)]
    lo, hi = bootstrap_auc(y, p, reps=300)
    small = bootstrap_auc(y[::10], p[::10], reps=300)
    assert lo < 0.76 < hi and (hi - lo) < (small[1] - small[0])


def test_shortcut_probe_sees_a_camera_only_when_features_carry_one():
    rng = np.random.default_rng(0)
    samples = [Sample(f"/{i}", i % 2, f"p{i}", "a" if i % 4 < 2 else "b", folder="f") for i in range(400)]
    src = np.array([s.source == "a" for s in samples], float)
    blind = rng.normal(size=(400, 16))
    seeing = blind + 3 * src[:, None]
    assert shortcut_probe(seeing, samples)["healthy"]["balanced_accuracy"] > 0.95
    blind_probe = shortcut_probe(blind, samples)
    assert abs(blind_probe["healthy"]["balanced_accuracy"] - 0.5) < 0.12 and blind_probe["healthy"]["chance"] == 0.5


def test_task_metrics_report_intervals(folders):
    ds = load_sources(",".join(map(str, folders)))
    prob = np.array([0.9 if s.label else 0.1 for s in ds.samples])
    out = task_metrics(ds.samples, prob, 0.5)
    assert out["odir"]["auc"] == 1.0 and out["odir"]["controlled"] and out["odir"]["auc_ci95"] == [1.0, 1.0]
    assert not out["raw_dr"]["controlled"] and out["eyepacs_moderate"]["sensitivity"] == 1.0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_train_resume_and_evaluate_end_to_end(folders, tmp_path):
    """Tiny but real: fundus-v2 input, pair-balanced epochs, a stop after one epoch, a resume, an evaluation,
    two evaluations set side by side."""
    data = ",".join(map(str, folders))
    common = ["--data", data, "--arch", "TinyNet", "--preprocessing", "fundus-v2", "--balance", "pairs",
              "--epoch-size", "32", "--batch-size", "16", "--augment", "--head", "gap", "--trainable", "all",
              "--select-metric", "val_auc_controlled", "--out", str(tmp_path / "model"),
              "--run-dir", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--target-sensitivity", "0.9"]
    first = _cli("train", *common, "--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    second = _cli("train", *common, "--epochs", "2", "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "epoch 2/2" in second.stdout and "epoch 1/2" not in second.stdout
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["preprocessing"] == "fundus-v2" and card["training"]["epochs_run"] == 2
    assert set(card["metrics"]["tasks"]["test"]) <= {"odir", "eyepacs_any", "eyepacs_moderate", "raw_dr", "pooled"}
    assert card["training"]["sources"] == ["eyepacs", "idrid", "odir"]
    split = json.loads((tmp_path / "model" / "split_patients.json").read_text())
    assert not set(split["train"]) & set(split["test"])

    ev = _cli("evaluate", "--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "eval"),
              "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    # Only the test patients are left: the model trained on the others or chose its epoch and threshold on them.
    patient = {s.path: s.patient_id for s in load_sources(data).samples}
    evaluated = {patient[p] for p in np.load(tmp_path / "eval" / "predictions.npz")["path"]}
    assert evaluated == set(split["test"]) and result["excluded_trained_photos"] > 0
    assert "## Shortcut probe" in (tmp_path / "eval" / "evaluation.md").read_text()
    # Another model's training and validation patients are left out too: two models, the same photos.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_card.json").write_text((tmp_path / "model" / "model_card.json").read_text())
    half = sorted(split["test"])[: len(split["test"]) // 2]
    (other / "split_patients.json").write_text(json.dumps({"train": half[:1], "val": half[1:], "test": []}))
    both = _cli("evaluate", "--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "eval2"),
                "--cache", str(tmp_path / "cache"), "--exclude-seen-by", str(other), cwd=tmp_path)
    assert both.returncode == 0, both.stderr[-3000:]
    kept = {patient[p] for p in np.load(tmp_path / "eval2" / "predictions.npz")["path"]}
    assert kept == set(split["test"]) - set(half) and kept
    # Evaluations pair like compare runs: the same photos give each task's own AUC back, others are refused.
    same = _cli("paired", "--run", str(tmp_path / "eval2"), "--baseline", str(tmp_path / "eval2"), "--out",
                str(tmp_path / "pair"), cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]
    tasks = json.loads((tmp_path / "eval2" / "evaluation.json").read_text())["tasks"]
    for name, r in json.loads((tmp_path / "pair" / "paired.json").read_text()).items():
        assert r["run"] == pytest.approx(tasks[name]["auc"]) and r["difference"] == 0
    refused = _cli("paired", "--run", str(tmp_path / "eval"), "--baseline", str(tmp_path / "eval2"), cwd=tmp_path)
    assert refused.returncode != 0 and "same photos" in refused.stderr

    # A finished run goes on with a warm restart: a new schedule over the added epochs, recorded for resumes.
    third = _cli("train", *common, "--epochs", "4", "--restart-lr", "0.0003", "--resume", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "warm restart after epoch 2: learning rate 0.0003" in third.stdout and "epoch 4/4" in third.stdout
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 4 and state["restart"] == {"after_epoch": 2, "lr": 0.0003, "epochs": 4}
    schedule = json.loads(zipfile.ZipFile(tmp_path / "run" / "checkpoint" / "last.keras").read("config.json"))
    lr = schedule["compile_config"]["optimizer"]["config"]["learning_rate"]["config"]
    assert lr["warmup_target"] == lr["initial_learning_rate"] == 0.0003


def test_paired_auc_difference():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300, int), np.ones(100, int)]
    weak = y * 0.3 + rng.normal(0, 1, len(y))
    strong = y * 1.5 + rng.normal(0, 1, len(y))
    d, lo, hi = bootstrap_auc_difference(y, strong, weak)
    assert d == pytest.approx(auc(y, strong) - auc(y, weak)) and 0 < lo <= d <= hi
    d, lo, hi = bootstrap_auc_difference(y, weak, weak)
    assert d == lo == hi == 0.0  # a model against itself: no difference, however the photos are drawn
