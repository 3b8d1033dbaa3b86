"""The benchmark scripts' own logic: the mixed load, the headline's arithmetic, the GPU script's refusal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.mixed import PHONE_EVERY, headline, mixed_set
from bench.serve import Level
from tests.conftest import ROOT


def test_the_mixed_load_is_one_phone_photo_in_eight_for_every_client():
    bodies = mixed_set([b"r1", b"r2", b"r3"], [b"p1", b"p2"])
    assert len(bodies) == 32 and sum(b.startswith(b"p") for b in bodies) == 32 // PHONE_EVERY
    # bench/serve.py's clients take bodies[(i * 7 + k) % len]: each client keeps the mix.
    for k in range(8):
        sent = [bodies[(i * 7 + k) % len(bodies)] for i in range(64)]
        assert sum(b.startswith(b"p") for b in sent) == 64 // PHONE_EVERY


def test_the_headline_states_each_target_and_whether_it_is_met():
    levels = [
        Level("app ov auto 2x4", "mixed", 8, requests=96, errors=0, rps=20.0, p50_ms=300.0, p99_ms=900.0),
        Level("baseline", "mixed", 8, requests=96, errors=0, rps=8.0, p50_ms=900.0, p99_ms=1500.0),
    ]
    peak = {"precision": "int8", "peak": 40.0, "best_batch": 8}
    text = headline(levels, "app ov auto 2x4", {"precision": "int8", "by": "timing", "why": "fastest"}, peak)
    assert "**2.50x** (target >= 5x: NOT met)" in text
    assert "= **3.00** (target <= 4: met)" in text
    assert "errors: **0** (target 0: met)" in text
    assert "served **50%** of that (target >= 70%: NOT met)" in text
    assert "int8 (chosen by timing" in text


@pytest.mark.skipif(not os.access("/bin/bash", os.X_OK), reason="needs bash")
def test_the_gpu_script_says_when_there_is_no_gpu(tmp_path):
    """Here (no GPU) it stops at once with a clear line and status 3, having measured nothing."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path)})
    if proc.returncode == 0:
        pytest.skip("a GPU is present: the script measured it")
    assert proc.returncode == 3 and "sees no GPU here: nothing measured" in proc.stderr
    assert (tmp_path / "summary.md").read_text().count("nothing measured") == 1


@pytest.mark.slow  # a minute of TensorFlow loads for a bench tool: make test-all runs it
def test_the_precision_check_reads_a_models_unseen_patients(model_dir, tmp_path):
    """bench/precision.py --data: the photos of patients the model never saw, with the card's preprocessing;
    every path the CPU can run is compared with the float32 reference (bf16 only where native)."""
    import json
    import shutil

    from training.data import load_sources
    from training.synthetic import write_dataset

    data = str(write_dataset(tmp_path / "odir", n_per_class=6, seed=5, size=160, source="odir"))
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    samples = load_sources(data).samples
    patients = sorted({s.patient_id for s in samples})
    (model / "split_patients.json").write_text(json.dumps({"train": patients[::2], "val": [], "test": patients[1::2]}))
    out = tmp_path / "precision.json"
    proc = subprocess.run([sys.executable, "bench/precision.py", "--model", str(model), "--data", data,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["n"] == sum(s.patient_id in set(patients[1::2]) for s in samples)  # the unseen half only
    assert res["paths"]["tf float32 traced (reference)"]["label_flips"] == 0
    assert "tf float32 frozen" in res["paths"]
