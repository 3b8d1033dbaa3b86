"""The three shared folders together (../shared/data; skipped with a message when a folder is absent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.data import load_sources, split_by_patient
from training.tasks import task_masks

FOLDERS = ("fundus-eye4", "eyepacs-256", "idrid-diaretdb1-dr")


@pytest.fixture(scope="module")
def joined(fundus_dir):
    paths = [fundus_dir.parent / f for f in FOLDERS]
    missing = [str(p) for p in paths if not (p / "manifest.csv").is_file()]
    if missing:
        pytest.skip(f"shared data folders not found: {', '.join(missing)}")
    return load_sources(",".join(map(str, paths)))


def test_each_folder_loads_completely(joined):
    assert not joined.skipped
    counts = Counter(s.folder for s in joined.samples)
    assert counts == {"fundus-eye4": 2312, "eyepacs-256": 5416, "idrid-diaretdb1-dr": 330}
    grades = Counter(s.original_label for s in joined.samples if s.folder == "eyepacs-256")
    assert grades == {"no_dr": 3964, "mild_dr": 369, "moderate_dr": 831, "severe_dr": 144, "proliferative_dr": 108}
    assert {s.label for s in joined.samples if s.folder == "idrid-diaretdb1-dr"} == {1}


def test_no_patient_in_two_parts_across_folders(joined):
    # EyePACS patients of fundus-eye4 are all in eyepacs-256 too: as one patient they stay in one part.
    eyepacs = {}
    for s in joined.samples:
        if s.source == "eyepacs":
            eyepacs.setdefault(s.patient_id, set()).add(s.folder)
    assert sum(len(f) == 2 for f in eyepacs.values()) == 437
    parts = split_by_patient(joined.samples, seed=0)
    ids = [{s.patient_id for s in p} for p in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [len(p) / len(joined.samples) for p in parts] == pytest.approx([0.6, 0.2, 0.2], abs=0.03)
    for part in parts:  # every part can score every task
        assert set(task_masks(part)) == {"odir", "eyepacs_any", "eyepacs_moderate", "raw_dr", "pooled"}


def test_fundus_v2_crops_decode_for_every_folder(joined, tmp_path):
    from training.augment import inputs_from_crops
    from training.data import load_arrays

    rng = np.random.default_rng(0)
    by_folder = {f: [s for s in joined.samples if s.folder == f] for f in FOLDERS}
    pick = [by_folder[f][i] for f in FOLDERS for i in rng.choice(len(by_folder[f]), 8, replace=False)]
    crops, _, kept, bad = load_arrays(pick, tmp_path, preprocessing="fundus-v2", crops=True)
    served, _, _, _ = load_arrays(pick, tmp_path, preprocessing="fundus-v2")
    assert not bad and crops.shape == (24, 128, 128, 4)
    assert np.array_equal(inputs_from_crops(crops), served)  # training's cached stage gives the served input
    assert (crops[..., 3] > 0).mean() > 0.4  # a field was found in every folder's photos
