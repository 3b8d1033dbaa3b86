"""Measure what bf16 inference changes on the test split: accuracy, AUC, sensitivity, specificity, answers.

Both precisions run through the app's own predictor (``AISIGHT_PRECISION=float32`` and ``bf16``, each
on its frozen graph, as served) on the same decoded photos, at the model card's threshold; the float32
frozen graph is also checked against the traced function it is made from. The bf16 path is acceptable for serving only
if accuracy moves by less than 1 point; the script says whether it does.

    PYTHONPATH=. .venv/bin/python bench/precision.py [--model model] [--split runs/bundled/split/test.csv]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "model"
DEFAULT_SPLIT = ROOT / "runs" / "bundled" / "split" / "test.csv"
LIMIT_POINTS = 1.0  # the issue's bound on the accuracy change


def load_split(split: Path):
    """Decode the split's photos with the app's preprocessing; paths are relative to the repo root."""
    from training.data import load_arrays, read_split

    samples = [s if Path(s.path).is_absolute() else replace(s, path=str(ROOT / s.path)) for s in read_split(split)]
    images, labels, kept, bad = load_arrays(samples)
    if bad:
        print(f"{len(bad)} unreadable photos skipped, e.g. {bad[0]}", file=sys.stderr)
    return images, labels, kept


def probabilities(model_dir: Path, precision: str, images: np.ndarray, batch: int = 32,
                  freeze: str = "sync") -> tuple[np.ndarray, dict]:
    """P(diseased) for every image through the predictor in ``precision``, and the predictor's card."""
    from aisight.predictor import Predictor

    # freeze="sync": the frozen graph, which is what answers once a server has finished starting.
    p = Predictor(model_dir, max_batch=1, precision=precision, freeze=freeze).load()
    if not p.ready:
        raise SystemExit(f"model did not load: {p.error}")
    if p.precision != precision:
        raise SystemExit(f"{precision} is not available here (the predictor fell back to {p.precision})")
    if freeze == "sync" and p.graph != "frozen":
        print(f"{precision}: the frozen graph did not build; measuring the traced function", file=sys.stderr)
    t = time.perf_counter()
    probs = np.concatenate([p.predict(images[i : i + batch]) for i in range(0, len(images), batch)])
    print(f"{precision}: {len(images)} images in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return probs, p.card


def compare(labels: np.ndarray, p32: np.ndarray, p16: np.ndarray, threshold: float) -> dict:
    """Metrics of both precisions at ``threshold`` and how far the bf16 answers are from float32's."""
    from training.metrics import classification_metrics

    m32 = classification_metrics(labels, p32, threshold)
    m16 = classification_metrics(labels, p16, threshold)
    diff = np.abs(p16 - p32)
    flips = int(((p32 >= threshold) != (p16 >= threshold)).sum())
    delta = {k: 100 * (m16[k] - m32[k]) for k in ("accuracy", "sensitivity", "specificity", "auc")}
    return {
        "n": int(len(labels)),
        "threshold": threshold,
        "float32": m32,
        "bf16": m16,
        "delta_points": delta,
        "max_abs_prob_diff": float(diff.max()) if len(diff) else 0.0,
        "mean_abs_prob_diff": float(diff.mean()) if len(diff) else 0.0,
        "label_flips": flips,
        "within_limit": abs(delta["accuracy"]) < LIMIT_POINTS,
    }


def markdown(res: dict, model: str, split: str) -> str:
    """The comparison as a Markdown table."""
    rows = [
        f"Model {model}, {res['n']} photos of {split}, threshold {res['threshold']:.4f} (the card's).",
        "",
        "| metric | float32 | bf16 | change (points) |",
        "|---|---:|---:|---:|",
    ]
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        rows.append(f"| {k} | {100 * res['float32'][k]:.2f}% | {100 * res['bf16'][k]:.2f}% "
                    f"| {res['delta_points'][k]:+.2f} |")
    rows += [
        "",
        f"P(diseased) differs by at most {res['max_abs_prob_diff']:.4f} (mean {res['mean_abs_prob_diff']:.5f}); "
        f"{res['label_flips']} of {res['n']} answers change side of the threshold. "
        f"Accuracy change {'within' if res['within_limit'] else 'OUTSIDE'} the {LIMIT_POINTS:g}-point limit.",
    ]
    if "frozen_vs_traced_float32" in res:
        fz = res["frozen_vs_traced_float32"]
        rows.append(f"Float32 frozen graph against the traced function: P(diseased) differs by at most "
                    f"{fz['max_abs_prob_diff']:.2g}, {fz['label_flips']} answers change side.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model artifact folder")
    ap.add_argument("--split", default=str(DEFAULT_SPLIT), help="the test part of the model's split (CSV)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    split = Path(args.split)
    if not split.is_file():
        print(f"test split not found: {split} (train a model first, or pass --split)", file=sys.stderr)
        return 2
    images, labels, _ = load_split(split)
    p32, card = probabilities(Path(args.model), "float32", images)
    p16, _ = probabilities(Path(args.model), "bf16", images)
    traced, _ = probabilities(Path(args.model), "float32", images, freeze="off")
    res = compare(labels, p32, p16, float(card["threshold"]))
    # The frozen graph (batch-norm folded into the weights) against the traced function, both float32.
    res["frozen_vs_traced_float32"] = {
        "max_abs_prob_diff": float(np.abs(p32 - traced).max()),
        "label_flips": int(((p32 >= res["threshold"]) != (traced >= res["threshold"])).sum()),
    }
    res["model"] = {"dir": args.model, "name": card["name"], "version": card["version"],
                    "architecture": card["architecture"]}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(markdown(res, f"{card['name']} {card['version']} ({card['architecture']})", str(split)))
    return 0 if res["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
