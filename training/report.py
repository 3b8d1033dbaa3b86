"""Markdown reports with PNG plots: of a selection (``OUT`` of ``select``) or of one ``train`` run.

A selection report holds the stage tables, validation ROC curves and training curves per stage, the
selected model's confusion matrices, the test-set verification (|val − test| as in the paper §3.2) and
the comparison with the random-init baseline and the paper's own numbers (§2.3, §5.1).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from training.metrics import classification_metrics, roc_curve

# The paper's numbers (method.md): random-init Xception baseline, and the final Xception + Adam + MSE.
PAPER_BASELINE = {"overfitting": 0.0223, "val_accuracy": 0.5841, "val_loss": 0.6948, "sensitivity": 0.4996,
                  "specificity": 0.6699}
PAPER_FINAL = {"overfitting": 0.0846, "val_accuracy": 0.9015, "val_loss": 0.0925, "sensitivity": 0.9413,
               "specificity": 0.8560}
PAPER_TEST = {"accuracy": 0.8748, "sensitivity": 0.8952, "specificity": 0.8561}
PAPER_DIFF = {"accuracy": 0.0267, "sensitivity": 0.0461, "specificity": 0.0001}
SCORE_TEXT = (
    "score = 3·rank(overfitting) + 2·(N+1−rank(val accuracy)) + 1.5·rank(val loss) + 1·(N+1−rank(sensitivity)) "
    "+ 0.25·(N+1−rank(specificity)), rank 1 = highest value; ties inside a metric share the average rank, a "
    "missing value counts as the worst, equal scores go to fewer parameters (training/score.py)."
)
PARTS = ("train", "val", "test")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def fmt(value, digits: int = 4) -> str:
    """A number for a table: fixed digits, '–' when missing."""
    if value is None:
        return "–"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    value = float(value)
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; cells that are not strings go through ``fmt``."""
    def cell(c) -> str:
        return (c if isinstance(c, str) else fmt(c)).replace("|", "\\|")  # a bare | would end the cell

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(map(cell, row)) + " |")
    return "\n".join(lines)


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC curves of (label, y, P(diseased)); the legend gives each AUC."""
    from training.metrics import auc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for label, y, p in curves:
        if len(set(np.asarray(y).tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(np.asarray(y), np.asarray(p))
        ax.plot(fpr, tpr, lw=1.4, label=f"{label} (AUC {auc(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 − specificity (false positive rate)", ylabel="sensitivity (true positive rate)", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(matrices: Sequence[tuple[str, dict]], path: Path) -> Path:
    """Confusion matrices ({tn, fp, fn, tp}) side by side; rows true class, columns predicted."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, (title, cm) in zip(axes[0], matrices, strict=True):
        m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["healthy", "diseased"])
        ax.set_yticks([0, 1], ["healthy", "diseased"])
        ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training curves per model: accuracy (train, val) and loss (train, val) by epoch."""
    plt = _pyplot()
    names = [n for n, h in histories.items() if h]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        h = histories[name]
        ep = [r["epoch"] for r in h]
        ax.plot(ep, [r["accuracy"] for r in h], color="C0", marker="o", ms=3, label="train acc")
        ax.plot(ep, [r["val_accuracy"] for r in h], color="C0", ls="--", marker="o", ms=3, label="val acc")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        loss_ax = ax.twinx()
        loss_ax.plot(ep, [r["loss"] for r in h], color="C3", marker="s", ms=3, label="train loss")
        loss_ax.plot(ep, [r["val_loss"] for r in h], color="C3", ls="--", marker="s", ms=3, label="val loss")
        loss_ax.tick_params(labelsize=7)
        ax.tick_params(labelsize=7)
    if names:
        handles = [*axes.flat[0].get_lines(), *fig.axes[-1].get_lines()]
        fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- selection


def _stage_table(rows: list[dict]) -> str:
    return md_table(
        ["rank", "arch", "optimizer", "loss", "params", "train acc", "val acc", "overfitting", "val loss",
         "sensitivity", "specificity", "AUC", "score"],
        [[r["rank"], r["arch"], r["optimizer"], r["loss"], int(float(r["params"])), float(r["train_accuracy"]),
          float(r["val_accuracy"]), float(r["overfitting"]), float(r["val_loss"]), float(r["sensitivity"]),
          float(r["specificity"]), float(r["auc"]), fmt(float(r["score"]), 3)] for r in rows],
    )


def _comparison(rows: Sequence[tuple[str, dict | None]]) -> str:
    keys = ("overfitting", "val_accuracy", "val_loss", "sensitivity", "specificity")
    return md_table(
        ["model", "overfitting", "val accuracy", "val loss", "sensitivity", "specificity"],
        [[name, *(m.get(k) if m else None for k in keys)] for name, m in rows],
    )


def _verification(val: dict, test: dict) -> str:
    rows = []
    for k in ("accuracy", "sensitivity", "specificity"):
        rows.append([k, val[k], test[k], abs(val[k] - test[k]), PAPER_FINAL["val_accuracy" if k == "accuracy" else k],
                     PAPER_TEST[k], PAPER_DIFF[k]])
    return md_table(["metric", "val", "test", "|val − test|", "paper val", "paper test", "paper |val − test|"], rows)


def write_selection_report(out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write ``OUT/report.md`` and ``OUT/plots/*.png`` from a selection's results."""
    from training.stages import load_results, read_csv

    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    settings = json.loads((out / "select.json").read_text()) if (out / "select.json").is_file() else {}
    split = json.loads((out / "split" / "recipe.json").read_text()) if (out / "split" / "recipe.json").is_file() else {}
    cfg = settings.get("config", {})
    lines = ["# AI-Sight model selection report", ""]
    if settings:
        weights = cfg.get("weights", "?")
        lines += [
            f"- data: `{settings.get('data')}`; protocol **{settings.get('protocol')}**; recipe "
            f"{settings.get('recipe', {}).get('name')}; seed {cfg.get('seed')}"
            + (f"; limited to {settings['limit']} photos" if settings.get("limit") else ""),
            f"- every candidate: {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, head {cfg.get('head')}, "
            f"dropout {cfg.get('dropout')}, trainable {cfg.get('trainable')}, lr {cfg.get('lr')} "
            f"({cfg.get('schedule')}), metrics of the {'last' if cfg.get('select_metric') == 'last' else 'best'} "
            f"epoch, threshold 0.5",
            f"- weights: **{weights}**"
            + (" (random initialisation: no ImageNet weights were available; the paper used ImageNet, so "
               "its numbers below are not a like-for-like comparison)" if str(weights).lower() == "none" else ""),
            "",
        ]
    if split.get("summary"):
        lines += ["## Data split", "", _summary_table(split["summary"]), ""]
        if split.get("protocol") == "paper":
            lines += ["The **paper** protocol augments before splitting, as published: copies of one photo are in "
                      "train and in validation/test, so the validation and test numbers are optimistic.", ""]
    lines += ["## Ranking", "", SCORE_TEXT, ""]
    final = None
    for stage in ("1", "2"):
        csv_path = out / f"stage{stage}.csv"
        if not csv_path.is_file():
            hint = f"`python -m training rank --out {out} --stage {stage}`"
            lines += [f"## Stage {stage}", "", f"Not ranked yet ({hint}).", ""]
            continue
        rows = read_csv(csv_path)
        results = {r["candidate"]: r for r in load_results(out, stage)}
        by_key = {(r["arch"], r["optimizer"], r["loss"]): r for r in results.values()}
        title = "base architecture" if stage == "1" else f"optimizer x loss on {rows[0]['arch']}"
        lines += [f"## Stage {stage}: {title} (N={len(rows)})", "", _stage_table(rows), ""]
        if stage == "1" and settings.get("archs"):
            missing = [a for a in settings["archs"] if a not in {r["arch"] for r in rows}]
            if missing:
                lines += [f"Not finished (not ranked): {', '.join(missing)}.", ""]
        curves, histories = [], {}
        for r in rows:
            res = by_key.get((r["arch"], r["optimizer"], r["loss"]))
            if not res:
                continue
            cdir = out / f"stage{stage}" / res["candidate"]
            pred = cdir / "predictions.npz"
            if pred.is_file():
                with np.load(pred) as z:
                    curves.append((res["candidate"], z["val_y"], z["val_prob"]))
            histories[res["candidate"]] = read_history(cdir / "history.csv")
        if curves:
            plot_roc(curves, plots / f"stage{stage}_roc.png", f"Stage {stage}: validation ROC")
            lines += [f"![Stage {stage} validation ROC curves](plots/stage{stage}_roc.png)", ""]
        if any(histories.values()):
            plot_curves(histories, plots / f"stage{stage}_curves.png")
            lines += [f"![Stage {stage} training curves](plots/stage{stage}_curves.png)", ""]
        winner = by_key.get((rows[0]["arch"], rows[0]["optimizer"], rows[0]["loss"]))
        if winner:
            final = (stage, winner)
    if final:
        stage, res = final
        m = res["metrics"]
        lines += [
            f"## Selected model: {res['arch']} + {res['optimizer']} + {res['loss']} (Stage {stage} winner)", "",
            "Train it and export the serving artifact with:", "",
            f"    python -m training train --data DATA --out model --arch {res['arch']} --optimizer {res['optimizer']} "
            f"--loss {res['loss']} --weights {res['weights']}", "",
        ]
        plot_confusion([(f"validation (n={m['val']['n']})", m["val"]["confusion_matrix"]),
                        (f"test (n={m['test']['n']})", m["test"]["confusion_matrix"])], plots / "confusion.png")
        lines += ["![Confusion matrices of the selected model, threshold 0.5](plots/confusion.png)", ""]
        lines += ["## Test-set verification (paper §3.2)", "",
                  "Validation vs test of the selected model at threshold 0.5; the paper reads small |val − test| "
                  "differences as a sign that the model generalises.", "",
                  _verification(m["val"], m["test"]), ""]
        if res.get("source_controlled"):
            sc = res["source_controlled"]
            lines += ["Source-controlled subset (`source == odir`: healthy and diseased from one collection):", "",
                      md_table(["part", "n", "accuracy", "sensitivity", "specificity", "AUC"],
                               [[k, v["n"], v["accuracy"], v["sensitivity"], v["specificity"], v["auc"]]
                                for k, v in sc.items()]), ""]
        baseline = _baseline(out, settings)
        lines += ["## Baseline comparison (paper §2.3, §5.1)", "",
                  _comparison([
                      ("paper: Xception, random init (baseline)", PAPER_BASELINE),
                      ("paper: Xception + Adam + MSE, ImageNet (final)", PAPER_FINAL),
                      (f"this run: {baseline['candidate']} (baseline, random init)" if baseline
                       else "this run: baseline not run", baseline),
                      (f"this run: {res['candidate']} (selected)", res),
                  ]), "",
                  "Validation loss is each model's own training loss (cross-entropy for Stage 1 and the "
                  "baseline, the Stage 2 loss for the selected model), as in the paper: losses of different "
                  "kinds are not comparable with each other.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"report: {path}")
    return path


def _baseline(out: Path, settings: dict) -> dict | None:
    from training.stages import BASELINE_ARCH, load_results

    found = load_results(out, "baseline")
    if found:
        return found[0]
    arch = settings.get("baseline_arch", BASELINE_ARCH)
    for r in load_results(out, "1"):
        if r["arch"] == arch and str(r["weights"]).lower() == "none":
            return r
    return None


# ------------------------------------------------------------------------------------- one run


def write_run_report(run: str | Path, out: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Write ``report.md`` + plots for one ``train`` run dir (history.csv, predictions.npz, metrics.json,
    config.json, split/)."""
    run = Path(run)
    out = Path(out) if out else run
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rel = Path("plots") if out == run else plots.relative_to(out)
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
    preds = dict(np.load(run / "predictions.npz")) if (run / "predictions.npz").is_file() else {}
    history = read_history(run / "history.csv")
    name = cfg.get("name", run.name)
    lines = [f"# Training report: {name}", "", f"Run folder `{run}`.", ""]
    if cfg:
        keys = ("arch", "optimizer", "loss", "weights", "epochs", "batch_size", "head", "trainable", "lr",
                "schedule", "augment", "class_weight", "precision", "select_metric", "target_sensitivity", "seed")
        lines += ["## Configuration", "", md_table(["option", "value"], [[k, str(cfg.get(k))] for k in keys]), ""]
        if cfg.get("notes"):
            lines += [cfg["notes"], ""]
    recipe_file = run / "split" / "recipe.json"
    split_info = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    protocol = split_info.get("protocol", "leakfree")
    counts = _split_counts(run / "split")
    if split_info.get("summary"):
        lines += [f"## Data split (protocol {protocol}, recipe {split_info['recipe']['name']})", "",
                  _summary_table(split_info["summary"]), ""]
        if protocol == "paper":
            lines += ["The **paper** protocol augments before splitting, as published: copies of one photo are in "
                      "train and in validation/test, so the validation and test numbers are optimistic.", ""]
    elif counts:
        lines += ["## Data split (by patient, every photo once)", "",
                  md_table(["part", "images", "diseased", "patients", "sources"], counts), ""]
    if not metrics:
        lines += ["No metrics.json yet: the run has not finished.", ""]
    else:
        threshold = metrics["val"]["all"]["threshold"]
        lines += [f"## Metrics at the chosen threshold {threshold:.4f}", "",
                  f"Threshold rule: highest threshold with validation sensitivity ≥ {cfg.get('target_sensitivity')}.",
                  "", md_table(["part", "subset", "n", "accuracy", "sensitivity", "specificity", "AUC"],
                               [[p, sub, m["n"], m["accuracy"], m["sensitivity"], m["specificity"], m["auc"]]
                                for p in PARTS for sub, m in metrics[p].items()]), ""]
        if any("odir" in metrics[p] for p in PARTS):
            lines += ["`odir` is the source-controlled subset (healthy and diseased photos from one collection): "
                      "numbers on it cannot come from recognising the camera.", ""]
        plot_confusion([(f"{p} (n={metrics[p]['all']['n']})", metrics[p]["all"]["confusion_matrix"])
                        for p in ("val", "test")], plots / "confusion.png")
        lines += [f"![Confusion matrices at the chosen threshold]({rel}/confusion.png)", ""]
        gap = metrics.get("generalisation_gap", {})
        lines += ["## Test-set verification (paper §3.2)", "",
                  md_table(["metric", "val", "test", "|val − test|", "paper |val − test|"],
                           [[k, metrics["val"]["all"][k], metrics["test"]["all"][k],
                             gap.get(k, abs(metrics["val"]["all"][k] - metrics["test"]["all"][k])), PAPER_DIFF[k]]
                            for k in ("accuracy", "sensitivity", "specificity")]), ""]
    if preds:
        at_half = {p: classification_metrics(preds[f"{p}_y"], preds[f"{p}_prob"], 0.5) for p in PARTS
                   if f"{p}_y" in preds}
        if {"train", "val"} <= set(at_half):
            from training.metrics import loss_value

            loss = cfg.get("loss", "cce")
            ours = {
                "overfitting": at_half["train"]["accuracy"] - at_half["val"]["accuracy"],
                "val_accuracy": at_half["val"]["accuracy"],
                "val_loss": loss_value(loss, preds["val_y"], preds["val_prob"]),
                "sensitivity": at_half["val"]["sensitivity"],
                "specificity": at_half["val"]["specificity"],
            }
            lines += ["## Comparison with the paper (threshold 0.5, as the paper's argmax)", "",
                      _comparison([("paper: Xception, random init (baseline)", PAPER_BASELINE),
                                   ("paper: Xception + Adam + MSE, ImageNet (final)", PAPER_FINAL),
                                   (f"this model: {cfg.get('arch')} + {cfg.get('optimizer')} + {loss}, "
                                    f"weights {cfg.get('weights')}", ours)]), "",
                      "The paper's numbers come from its leaky protocol (augmented copies of one photo in train "
                      "and test) on EyePACS + ORIGA; "
                      + ("these come from the same leaky protocol on this run's data." if protocol == "paper"
                         else "these come from a patient-level split of this run's data."), ""]
        curves = [(p, preds[f"{p}_y"], preds[f"{p}_prob"]) for p in PARTS if f"{p}_y" in preds]
        odir = _source_mask(run / "split", "test", len(preds.get("test_y", [])))
        if odir is not None and odir.any():
            curves.append(("test, odir subset", preds["test_y"][odir], preds["test_prob"][odir]))
        plot_roc(curves, plots / "roc.png", f"{name}: ROC")
        lines += [f"![ROC curves]({rel}/roc.png)", ""]
    if history:
        plot_curves({name: history}, plots / "curves.png")
        lines += ["## Training curves", "", f"![Training curves]({rel}/curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"report: {path}")
    return path


def _summary_table(summary: dict) -> str:
    return md_table(
        ["part", "images", "diseased", "photos", "patients", "augmented copies", "photos also in train",
         "patients also in train"],
        [[name, s["images"], s["diseased"], s["photos"], s["patients"], s["augmented"],
          s.get("photos_also_in_train", "–"), s.get("patients_also_in_train", "–")] for name, s in summary.items()],
    )


def _split_counts(split: Path) -> list[list]:
    rows = []
    for p in PARTS:
        f = split / f"{p}.csv"
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            r = list(csv.DictReader(fh))
        sources = sorted({x.get("source") or "unknown" for x in r})
        rows.append([p, len(r), sum(x["label"] == "diseased" for x in r), len({x["patient_id"] for x in r}),
                     ", ".join(sources)])
    return rows


def _source_mask(split: Path, part: str, n: int) -> np.ndarray | None:
    """``source == odir`` per prediction, when the split list lines up with the predictions."""
    f = split / f"{part}.csv"
    if not f.is_file():
        return None
    with open(f, newline="") as fh:
        sources = [r.get("source", "") for r in csv.DictReader(fh)]
    return np.array([s == "odir" for s in sources]) if len(sources) == n else None
