"""python -m training resolution: one network and recipe at several input sizes, test AUCs side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.__main__ import main
from training.synthetic import write_dataset


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Path:
    """A small EyePACS-like folder: healthy (grade 0) and diseased (grades 1 and 2) from one collection."""
    return write_dataset(tmp_path_factory.mktemp("res") / "graded", n_per_class=30, seed=4, size=160,
                         source="eyepacs", graded=True)


def test_two_sizes_trained_and_tested_side_by_side(graded, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["resolution", "--data", str(graded), "--out", str(out), "--sizes", "32,64", "--epochs", "2",
            "--epoch-size", "64", "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    result = json.loads((out / "resolution.json").read_text())
    assert [r["side"] for r in result["results"]] == [32, 64]
    for r in result["results"]:
        assert r["kept_epoch"] in (1, 2) and len(r["history"]) == 2
        for task in ("eyepacs_any", "eyepacs_moderate"):
            t = r["test"][task]
            assert 0.0 <= t["auc"] <= 1.0 and t["ci95"][0] <= t["auc"] <= t["ci95"][1]
            assert t["n"][0] > 0 and t["n"][1] > 0
    first, second = result["results"]
    assert len(first["test"]["prob"]) == len(second["test"]["prob"]) and "vs_first" not in first
    for task, d in second["vs_first"].items():  # paired on the same test photos
        assert d["difference"] == pytest.approx(second["test"][task]["auc"] - first["test"][task]["auc"])
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    table = (out / "resolution.md").read_text()
    assert "| 32x32 |" in table and "| 64x64 |" in table
    assert list((tmp_path / "cache").glob("fundus-v2-64-*.npy"))  # a second run decodes nothing again


def test_photos_without_grades_are_refused_clearly(tmp_path, capsys):
    plain = write_dataset(tmp_path / "odir", n_per_class=6, seed=1, size=120, source="odir")
    assert main(["resolution", "--data", str(plain), "--out", str(tmp_path / "o"), "--sizes", "32"]) == 2
    assert "use EyePACS graded photos" in capsys.readouterr().err


def test_the_product_network_can_be_measured_the_same_way():
    """--arch Xception: the paper's network from scratch behind the same input layers; unknown names refused."""
    from training.resolution import build_net

    xception = build_net(128, "Xception")
    assert xception.input_shape == (None, 128, 128, 3) and xception.output_shape == (None, 2)
    assert xception.count_params() > 20_000_000 > build_net(128).count_params()
    momenta = {layer.momentum for layer in xception.layers if hasattr(layer, "moving_variance")}
    assert momenta == {0.9}
    with pytest.raises(ValueError, match="unknown arch"):
        build_net(128, "ResNet50")
