"""Dataset loaders (EyePACS, ORIGA, manifest, class-per-folder), patient split, cached arrays."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from training.data import (
    DatasetError,
    Sample,
    load_arrays,
    load_dataset,
    load_eyepacs,
    load_folders,
    load_manifest,
    load_origa,
    load_sources,
    read_split,
    split_by_patient,
    to_label,
    write_split,
)


def _img(path, value=100, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def eyepacs(tmp_path):
    rows = [("10_left", 0), ("10_right", 2), ("11_left", 0), ("11_right", 4), ("12_left", 1), ("13_left", 0)]
    for name, _ in rows[:-1]:  # 13_left is listed but missing
        _img(tmp_path / "eyepacs" / "train" / f"{name}.jpeg")
    return _csv(tmp_path / "eyepacs" / "trainLabels.csv", ["image", "level"], rows)


def origa(tmp_path):
    rows = [("001.jpg", 0), ("002.jpg", 1), ("003.jpg", 0)]
    for name, _ in rows:
        _img(tmp_path / "origa" / "images" / name)
    return _csv(tmp_path / "origa" / "OrigaList.csv", ["Filename", "Glaucoma"], rows)


def test_eyepacs_level_zero_is_healthy_and_both_eyes_share_a_patient(tmp_path):
    ds = load_eyepacs(eyepacs(tmp_path))
    by_name = {s.path.rsplit("/", 1)[1]: s for s in ds.samples}
    assert by_name["10_left.jpeg"].label == 0 and by_name["10_right.jpeg"].label == 1
    assert by_name["11_right.jpeg"].original_label == "dr_level_4"
    assert by_name["10_left.jpeg"].patient_id == by_name["10_right.jpeg"].patient_id == "eyepacs-10"
    assert {s.source for s in ds.samples} == {"eyepacs"}
    assert ds.skipped == [("13_left", "missing file")]
    assert ds.counts() == {"healthy": 2, "diseased": 3}


def test_origa_reads_the_glaucoma_flag(tmp_path):
    ds = load_origa(origa(tmp_path))
    assert [s.label for s in ds.samples] == [0, 1, 0]
    assert ds.samples[1].original_label == "glaucoma" and ds.samples[1].source == "origa"


def test_paper_sources_join_with_a_spec(tmp_path):
    ds = load_sources(f"eyepacs={eyepacs(tmp_path)},origa={origa(tmp_path)}")
    assert len(ds.samples) == 8
    assert {s.source for s in ds.samples} == {"eyepacs", "origa"}
    with pytest.raises(DatasetError, match="bad data spec"):
        load_sources("kaggle=/nowhere.csv")


def test_manifest_paths_are_relative_to_its_folder(tmp_path):
    _img(tmp_path / "a" / "x.png")
    _img(tmp_path / "b" / "y.png")
    path = _csv(tmp_path / "manifest.csv", ["path", "label", "patient_id", "source"],
                [("a/x.png", "normal", "p1", "odir"), ("b/y.png", "glaucoma", "p2", "odir"),
                 ("c/z.png", "healthy", "", "")])
    ds = load_manifest(path)
    assert [(s.label, s.patient_id) for s in ds.samples] == [(0, "p1"), (1, "p2")]
    assert ds.skipped[0][1] == "missing file"
    assert load_dataset(tmp_path).samples == ds.samples  # a folder with manifest.csv


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    _img(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="needs columns path,label"):
        load_manifest(_csv(tmp_path / "m1.csv", ["file", "class"], [("x.png", "healthy")]))
    with pytest.raises(DatasetError, match="unknown label 'maybe'"):
        load_manifest(_csv(tmp_path / "m2.csv", ["path", "label"], [("x.png", "maybe")]))
    with pytest.raises(DatasetError, match="no diseased images"):
        load_manifest(_csv(tmp_path / "m3.csv", ["path", "label"], [("x.png", "healthy")]))


def test_folders_map_original_class_names(tmp_path):
    for cls in ("normal", "cataract", "diabetic_retinopathy", "glaucoma"):
        _img(tmp_path / cls / f"1_{'left' if cls != 'glaucoma' else 'right'}.jpg")
    (tmp_path / "notes").mkdir()
    ds = load_folders(tmp_path)
    assert ds.counts() == {"healthy": 1, "diseased": 3}
    assert ds.skipped == [(str(tmp_path / "notes"), "folder is not a known class")]
    assert {s.original_label for s in ds.samples} == {"normal", "cataract", "diabetic_retinopathy", "glaucoma"}
    assert {s.patient_id for s in ds.samples} == {"1"}


def test_folders_with_an_empty_class_fail(tmp_path):
    _img(tmp_path / "healthy" / "a.png")
    (tmp_path / "diseased").mkdir()
    with pytest.raises(DatasetError, match="no diseased images"):
        load_folders(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load_folders(tmp_path / "missing")


def test_label_aliases():
    assert to_label("Normal") == 0 and to_label("diabetic retinopathy") == 1 and to_label("1") == 1


def test_patient_split_has_no_overlap_and_is_reproducible(tmp_path):
    samples = [Sample(f"/d/{p}_{eye}.jpg", p % 3 == 0, f"p{p}", "odir" if p % 2 else "eyepacs")
               for p in range(200) for eye in ("left", "right")]
    a = split_by_patient(samples, seed=7)
    assert split_by_patient(samples, seed=7) == a != split_by_patient(samples, seed=8)
    ids = [{s.patient_id for s in part} for part in a]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [len(p) for p in a] == pytest.approx([240, 80, 80], abs=8)
    write_split(tmp_path, dict(zip(("train", "val", "test"), a, strict=True)))
    assert read_split(tmp_path / "test.csv") == [Sample(s.path, int(s.label), s.patient_id, s.source) for s in a[2]]


def test_arrays_use_the_app_preprocessing_list_unreadable_and_cache(tmp_path):
    from aisight.preprocess import preprocess_path

    good = [_img(tmp_path / f"{i}.png", 50 * i, (300, 200)) for i in range(3)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    samples = [Sample(str(p), i % 2, str(i)) for i, p in enumerate([*good, bad])]
    x, y, kept, unreadable = load_arrays(samples, tmp_path / "cache", progress=True)
    assert x.shape == (3, 128, 128, 3) and x.dtype == np.uint8
    assert np.array_equal(x[1], preprocess_path(good[1]))
    assert [p for p, _ in unreadable] == [str(bad)] and len(kept) == 3
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    again, *_ = load_arrays(samples, tmp_path / "cache")
    assert np.array_equal(again, x)
