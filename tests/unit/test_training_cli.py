"""python -m training end to end on generated photos: select (Stage 1 + 2), resume, rank, report, train.

A tiny configuration through the real code: TinyNet and MobileNet (random init), one epoch, 48 photos,
Stage 2 cut to two optimizer x loss pairs.
"""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from training.__main__ import config_from_args, main
from training.stages import CSV_COLUMNS, stage1_candidates, stage2_candidates, stage_defaults
from training.synthetic import write_dataset

PNG = b"\x89PNG\r\n\x1a\n"


def _csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    data = write_dataset(root / "data", n_per_class=24, seed=0, size=160)
    out = root / "out"
    common = [
        "--data", str(data), "--out", str(out), "--archs", "TinyNet,MobileNet", "--epochs", "1",
        "--aug-healthy", "1,0", "--aug-diseased", "2,0", "--optimizers", "adam", "--losses", "mse,cce",
        "--baseline-arch", "TinyNet", "--cache", str(root / "cache"),
    ]
    rc = main(["select", *common])
    return SimpleNamespace(root=root, data=data, out=out, common=common, rc=rc)


def test_select_writes_both_stage_tables(grid):
    assert grid.rc == 0
    header, rows = _csv(grid.out / "stage1.csv")
    assert tuple(header) == CSV_COLUMNS
    assert sorted(r["arch"] for r in rows) == ["MobileNet", "TinyNet"]
    assert sorted(int(r["rank"]) for r in rows) == [1, 2]
    assert [int(r["rank"]) for r in rows] == [1, 2]  # sorted best first
    assert all(r["optimizer"] == "rmsprop" and r["loss"] == "cce" for r in rows)  # the paper's Stage 1
    winner = rows[0]["arch"]
    header, rows2 = _csv(grid.out / "stage2.csv")
    assert tuple(header) == CSV_COLUMNS
    assert {(r["arch"], r["optimizer"], r["loss"]) for r in rows2} == {(winner, "adam", "mse"), (winner, "adam", "cce")}
    assert sorted(int(r["rank"]) for r in rows2) == [1, 2]
    scores = [float(r["score"]) for r in rows2]
    assert scores == sorted(scores, reverse=True)
    for r in rows + rows2:
        assert float(r["overfitting"]) == pytest.approx(float(r["train_accuracy"]) - float(r["val_accuracy"]))


def test_each_candidate_keeps_its_result_history_and_predictions(grid):
    cdir = grid.out / "stage1" / "MobileNet"
    result = json.loads((cdir / "result.json").read_text())
    for key in CSV_COLUMNS[:11]:
        assert key in result
    assert result["weights"] == "none"
    assert (result["config"]["trainable"], result["config"]["head"]) == ("bn", "flatten")
    assert result["epochs_run"] == 1 and result["protocol"] == "leakfree"
    assert {"accuracy", "sensitivity", "specificity"} <= set(result["metrics"]["test"])
    with np.load(cdir / "predictions.npz") as z:
        assert {"train_prob", "val_prob", "test_prob", "val_y"} <= set(z.files)
    _, history = _csv(cdir / "history.csv")
    assert len(history) == 1
    # One split for every candidate, saved as file lists; leak-free: no photo in train and test.
    _, train = _csv(grid.out / "split" / "train.csv")
    _, test = _csv(grid.out / "split" / "test.csv")
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in test}
    assert any(r["orientation"] != "0" for r in train) and all(r["orientation"] == "0" for r in test)


def test_report_has_tables_plots_verification_and_baseline(grid):
    assert main(["report", "--out", str(grid.out)]) == 0
    text = (grid.out / "report.md").read_text()
    for needle in ("## Stage 1", "## Stage 2", "Test-set verification", "Baseline comparison", "0.5841",
                   "weights: **none**", "score = 3·rank(overfitting)"):
        assert needle in text
    for name in ("stage1_roc", "stage2_roc", "stage1_curves", "stage2_curves", "confusion"):
        png = grid.out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
        assert f"plots/{name}.png" in text


def test_resume_skips_finished_candidates(grid, capsys):
    results = sorted(grid.out.glob("stage*/*/result.json"))
    assert len(results) == 4
    before = {p: p.stat().st_mtime_ns for p in results}
    capsys.readouterr()
    assert main(["select", *grid.common]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 4
    assert "epoch 1/1" not in out and "data:" not in out  # nothing trained, nothing decoded
    assert {p: p.stat().st_mtime_ns for p in results} == before


def test_one_candidate_by_stage_and_index(grid, capsys):
    assert main(["select", *grid.common, "--stage", "2", "--index", "1"]) == 0
    assert "adam-cce: finished earlier" in capsys.readouterr().out
    assert main(["select", *grid.common, "--stage", "1", "--index", "7"]) == 2
    assert "candidates 0..1, not 7" in capsys.readouterr().err


def test_rank_rewrites_the_stage_table(grid):
    before = (grid.out / "stage1.csv").read_text()
    (grid.out / "stage1.csv").unlink()
    assert main(["rank", "--out", str(grid.out), "--stage", "1"]) == 0
    assert (grid.out / "stage1.csv").read_text() == before


def test_stage2_needs_the_stage1_ranking(tmp_path, capsys):
    rc = main(["select", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--stage", "2", "--index", "0"])
    assert rc == 2
    assert "stage1.csv not found" in capsys.readouterr().err


def test_train_with_the_paper_protocol_then_report_the_run(grid):
    run, model = grid.root / "run", grid.root / "model"
    rc = main(["train", "--data", str(grid.data), "--out", str(model), "--run-dir", str(run), "--arch", "TinyNet",
               "--epochs", "1", "--protocol", "paper", "--aug-healthy", "2,0", "--aug-diseased", "2,0",
               "--cache", str(grid.root / "cache")])
    assert rc == 0
    card = json.loads((model / "model_card.json").read_text())
    assert card["training"]["protocol"] == "paper" and (model / "model.keras").is_file()
    leak = json.loads((run / "split" / "recipe.json").read_text())["summary"]["test"]["photos_also_in_train"]
    assert leak > 0  # the published protocol's leak, reproduced
    assert main(["report", "--run", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "protocol paper" in text and "Test-set verification" in text
    for name in ("roc", "curves", "confusion"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == PNG


def test_grids_follow_the_paper():
    assert [c.arch for c in stage1_candidates()][:3] == ["Xception", "ResNet50", "ResNet50V2"]
    assert len(stage1_candidates()) == 17
    grid2 = stage2_candidates("xception")
    assert len(grid2) == 9 and [c.index for c in grid2] == list(range(9))
    assert (grid2[4].optimizer, grid2[4].loss) == ("adam", "mse")  # the paper's "fifth row"
    assert grid2[4].name == "Xception-adam-mse"


def test_stage_defaults_are_the_papers_and_options_override_them(tmp_path):
    cfg = stage_defaults()
    assert (cfg.optimizer, cfg.loss, cfg.batch_size, cfg.epochs) == ("rmsprop", "cce", 32, 15)
    assert (cfg.head, cfg.dropout, cfg.trainable, cfg.select_metric) == ("flatten", 0.5, "bn", "last")
    from training.__main__ import build_parser

    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"batch_size": 16}))
    args = build_parser().parse_args(["select", "--data", "d", "--out", "o", "--epochs", "2", "--config", str(conf)])
    cfg = config_from_args(args, stage_defaults())
    assert (cfg.epochs, cfg.batch_size, cfg.optimizer) == (2, 16, "rmsprop")


def test_cli_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["select", "--data", "d", "--out", "o", "--index", "1"])
    assert main(["select", "--data", "d", "--out", "o", "--archs", "AlexNet"]) == 2
    assert "unknown architecture 'AlexNet'" in capsys.readouterr().err
