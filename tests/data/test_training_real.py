"""The training data path on the real photos (../shared/data/fundus-eye4; skipped with a message when absent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.data import load_arrays, load_dataset, split_by_patient
from training.recipe import Recipe, build_parts, summary


@pytest.fixture(scope="module")
def real(fundus_dir):
    return load_dataset(fundus_dir)


def test_manifest_loads_every_photo(real):
    assert len(real.samples) == 2312 and not real.skipped
    assert real.counts() == {"healthy": 811, "diseased": 1501}
    assert Counter(s.original_label for s in real.samples) == {
        "normal": 811, "diabetic_retinopathy": 874, "glaucoma": 314, "cataract": 313,
    }


def test_patient_split_has_no_overlap(real):
    parts = split_by_patient(real.samples, seed=0)
    ids = [{s.patient_id for s in p} for p in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    sizes = [len(p) / len(real.samples) for p in parts]
    assert sizes == pytest.approx([0.6, 0.2, 0.2], abs=0.03)
    for part in parts:  # every part keeps the source-controlled subset with both classes
        assert {s.label for s in part if s.source == "odir"} == {0, 1}


def test_paper_protocol_leaks_and_leakfree_does_not(real):
    quiet = dict(seed=0, limit=400, log=lambda _: None)
    paper = summary(build_parts(real.samples, Recipe(), "paper", **quiet))
    leakfree = summary(build_parts(real.samples, Recipe(), "leakfree", **quiet))
    # As published: augmented copies of one photo in train and in test.
    assert paper["test"]["photos_also_in_train"] > 0.5 * paper["test"]["photos"]
    assert leakfree["test"]["photos_also_in_train"] == 0 and leakfree["test"]["patients_also_in_train"] == 0
    assert leakfree["val"]["patients_also_in_train"] == 0 and leakfree["test"]["augmented"] == 0
    # The recipe's roles on this data: EyePACS DR duplicated, the other sources augmented.
    assert paper["train"]["by_source"].keys() <= {"eyepacs", "odir", "retina_dataset"}


def test_real_photos_decode_to_model_inputs(real, tmp_path):
    picks = [s for src in ("odir", "eyepacs", "retina_dataset") for s in real.samples if s.source == src][:: 200][:12]
    x, y, kept, bad = load_arrays(picks, tmp_path)
    assert not bad and x.shape == (len(picks), 128, 128, 3) and x.dtype == np.uint8
    assert 20 < x.mean() < 200  # photos, not blank arrays


@pytest.mark.slow
def test_tiny_selection_on_real_photos(fundus_dir, tmp_path):
    """select -> rank -> report through the real code on 160 real photos (TinyNet, one epoch)."""
    import json

    from training.__main__ import main

    out = tmp_path / "out"
    rc = main(["select", "--data", str(fundus_dir), "--out", str(out), "--archs", "TinyNet", "--epochs", "1",
               "--limit", "160", "--aug-healthy", "3,1", "--aug-diseased", "2,1", "--optimizers", "adam",
               "--losses", "mse", "--baseline-arch", "TinyNet", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    result = json.loads((out / "stage2" / "TinyNet-adam-mse" / "result.json").read_text())
    assert "val" in result["source_controlled"]  # odir: healthy and diseased from one collection
    assert (out / "report.md").is_file() and (out / "plots" / "stage2_roc.png").is_file()
