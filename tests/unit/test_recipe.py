"""The paper's data recipe: counts, augmentation, the two protocols, saved split lists."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from training.data import Sample
from training.recipe import (
    Item,
    Recipe,
    add_noise,
    build_parts,
    expand,
    fingerprint,
    limit_samples,
    materialize,
    orient,
    prepare,
    read_parts,
    render,
    summary,
    write_parts,
)


def paper_sources(root: str = "/d") -> list[Sample]:
    """Stand-ins for EyePACS (more than the paper samples) and ORIGA-650 (482 healthy, 168 glaucoma)."""
    s = [Sample(f"{root}/eyepacs/{i}_left.jpeg", 0, f"eyepacs-{i}", "eyepacs") for i in range(3500)]
    s += [Sample(f"{root}/eyepacs/{i}_right.jpeg", 1, f"eyepacs-{i}", "eyepacs") for i in range(1100)]
    s += [Sample(f"{root}/origa/h{i}.jpg", 0, f"origa-h{i}", "origa") for i in range(482)]
    s += [Sample(f"{root}/origa/g{i}.jpg", 1, f"origa-g{i}", "origa") for i in range(168)]
    return s


def test_paper_protocol_reproduces_the_published_counts():
    parts = build_parts(paper_sources(), Recipe(), "paper", seed=0, log=lambda _: None)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [6924, 2308, 2309]
    items = [it for p in parts.values() for it in p]
    assert Counter(it.label for it in items) == {0: 5892, 1: 5649}
    by_group = Counter((it.source, it.label) for it in items)
    assert by_group == {
        ("eyepacs", 0): 3000, ("eyepacs", 1): 987 * 3, ("origa", 0): 482 * 3 * 2, ("origa", 1): 168 * 4 * 4,
    }


def test_each_photo_becomes_b_times_c_plus_one_images():
    recipe = Recipe(aug_healthy=(3, 1), aug_diseased=(4, 3), dr_copies=2)
    origa = Sample("/o/a.jpg", 1, "p", "origa")
    variants = expand([origa], recipe)
    assert len(variants) == 4 * (3 + 1) == recipe.factor(origa)
    assert len({(v.orientation, v.noise) for v in variants}) == 16
    assert sum(not v.augmented for v in variants) == 1  # the photo itself, once
    dr = expand([Sample("/e/1_left.jpeg", 1, "e1", "eyepacs")], recipe)
    assert [v.copy for v in dr] == [0, 1, 2]
    assert len(expand([Sample("/e/2_left.jpeg", 0, "e2", "eyepacs")], recipe)) == 1
    assert len(expand([origa], Recipe(name="none"))) == 1


def test_sampling_uses_all_when_fewer_than_asked_and_says_so():
    logs = []
    few = [Sample(f"/e/{i}.jpeg", 1, f"e{i}", "eyepacs") for i in range(10)] + [Sample("/o/x.jpg", 0, "o", "origa")]
    parts = build_parts(few, Recipe(), "paper", log=logs.append)
    assert sum(len(p) for p in parts.values()) == 10 * 3 + 6
    assert any("fewer than 987" in line for line in logs)


def test_leakfree_splits_by_patient_then_augments_only_training():
    parts = build_parts(paper_sources(), Recipe(), "leakfree", seed=1, log=lambda _: None)
    patients = {p: {it.patient_id for it in parts[p]} for p in parts}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert not any(it.augmented for p in ("val", "test") for it in parts[p])
    assert any(it.augmented for it in parts["train"])
    s = summary(parts)
    assert s["test"]["photos_also_in_train"] == 0 and s["val"]["patients_also_in_train"] == 0


def test_paper_protocol_leaks_copies_of_one_photo_into_test():
    parts = build_parts(paper_sources(), Recipe(), "paper", seed=0, log=lambda _: None)
    shared = {it.path for it in parts["train"]} & {it.path for it in parts["test"]}
    assert len(shared) > 100
    assert summary(parts)["test"]["photos_also_in_train"] == len(shared)


def test_split_is_reproducible_from_the_seed():
    a = build_parts(paper_sources(), Recipe(), "leakfree", seed=3, log=lambda _: None)
    b = build_parts(paper_sources(), Recipe(), "leakfree", seed=3, log=lambda _: None)
    c = build_parts(paper_sources(), Recipe(), "leakfree", seed=4, log=lambda _: None)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    # Where the data folder is mounted does not matter.
    assert fingerprint(build_parts(paper_sources("/mnt/x"), Recipe(), "leakfree", seed=3, log=lambda _: None)) == \
        fingerprint(a)


def test_noise_shifts_each_value_by_at_most_two_and_clips():
    rng = np.random.default_rng(0)
    img = np.full((128, 128, 3), 100, np.uint8)
    img[:10], img[-10:] = 0, 255
    out = add_noise(img, rng)
    diff = out.astype(int) - img.astype(int)
    assert diff.min() >= -2 and diff.max() <= 2
    assert set(np.unique(diff[10:-10])) == {-2, -1, 0, 1, 2}  # per channel value, integers
    assert out[:10].min() == 0 and out[:10].max() <= 2  # clipped at 0
    assert out[-10:].max() == 255 and out[-10:].min() >= 253  # clipped at 255


def test_orientation_rotates_and_zooms_with_a_constant_black_fill():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert np.array_equal(orient(img, 0.0, 1.0), img)
    assert np.abs(orient(img, 180.0, 1.0).astype(int) - img[::-1, ::-1].astype(int)).max() <= 1
    white = np.full((128, 128, 3), 255, np.uint8)
    turned = orient(white, 45.0, 1.0)
    assert (turned[0, 0] == 0).all() and (turned[64, 64] == 255).all()
    assert (orient(white, 0.0, 0.8)[2, 64] == 0).all()  # zoomed out: black border
    assert (orient(white, 0.0, 1.1) == 255).all()  # zoomed in: no border


def test_render_is_deterministic_per_file_and_variant():
    img = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    item = Item(Sample("/x/healthy/a.jpg", 0, "a", "origa"), orientation=2, noise=1)
    recipe = Recipe()
    one = render(img, item, recipe, seed=0)
    assert np.array_equal(one, render(img, item, recipe, seed=0))
    assert not np.array_equal(one, render(img, item, recipe, seed=1))
    assert not np.array_equal(one, render(img, Item(item.sample, orientation=1, noise=1), recipe, seed=0))
    copy = Item(item.sample, copy=2)
    assert render(img, copy, recipe) is img  # duplicates are the photo itself


def test_split_lists_round_trip(tmp_path):
    parts = build_parts(paper_sources(), Recipe(), "leakfree", seed=0, log=lambda _: None)
    write_parts(tmp_path, parts, {"fingerprint": fingerprint(parts)})
    back = read_parts(tmp_path)
    assert back == parts
    assert {p.name for p in tmp_path.iterdir()} == {"train.csv", "val.csv", "test.csv", "recipe.json"}


def test_limit_keeps_the_label_mix():
    got = limit_samples(paper_sources(), 100, seed=0)
    assert len(got) == 100
    assert Counter(s.label for s in got) == {0: 76, 1: 24}
    assert limit_samples(paper_sources()[:5], None) == paper_sources()[:5]


def test_recipe_refuses_nonsense():
    with pytest.raises(ValueError, match="b >= 1"):
        Recipe(aug_healthy=(0, 1))
    with pytest.raises(ValueError, match="unknown recipe"):
        Recipe(name="fancy")
    with pytest.raises(ValueError, match="unknown protocol"):
        build_parts(paper_sources()[:10], Recipe(), "random")


def _photos(folder, n_per_class=4):
    samples = []
    for label, name in ((0, "healthy"), (1, "diseased")):
        (folder / name).mkdir(parents=True)
        for i in range(n_per_class):
            path = folder / name / f"{i}_left.png"
            Image.fromarray(np.full((40, 60, 3), 60 + 40 * label + i, np.uint8)).save(path)
            samples.append(Sample(str(path), label, f"{name}-{i}", "origa"))
    return samples


def test_materialize_decodes_each_photo_once_and_lists_unreadable(tmp_path):
    samples = _photos(tmp_path)
    bad = tmp_path / "diseased" / "broken.png"
    bad.write_bytes(b"not an image")
    samples.append(Sample(str(bad), 1, "broken", "origa"))
    recipe = Recipe(aug_healthy=(2, 1), aug_diseased=(1, 1))
    items = expand(samples, recipe)
    x, y, kept, unreadable = materialize(items, recipe, cache_dir=tmp_path / "cache")
    assert x.shape == (4 * 4 + 4 * 2, 128, 128, 3) and x.dtype == np.uint8
    assert len(kept) == len(y) == len(x)
    assert [p for p, _ in unreadable] == [str(bad)]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 8  # one per photo, not per image


def test_prepare_refuses_a_different_split_in_the_same_folder(tmp_path):
    samples = _photos(tmp_path / "data", 6)
    recipe = Recipe(aug_healthy=(1, 0), aug_diseased=(1, 1))
    quiet = dict(log=lambda _: None, progress=False, cache_dir=tmp_path / "cache")
    prep = prepare(samples, recipe, "leakfree", 0, split_dir=tmp_path / "split", **quiet)
    assert set(prep.arrays) == {"train", "val", "test"}
    assert prep.info["fingerprint"] == fingerprint(read_parts(tmp_path / "split"))
    prepare(samples, recipe, "leakfree", 0, split_dir=tmp_path / "split", **quiet)  # same split: fine
    with pytest.raises(ValueError, match="different split"):
        prepare(samples, recipe, "paper", 0, split_dir=tmp_path / "split", **quiet)
