"""Measure what each served inference path changes on the test split: accuracy, AUC, answers.

The reference is the model as trained: the Keras model's traced forward pass in float32 (TensorFlow).
Every path the app can serve runs through the app's own predictor on the same decoded photos, at the
model card's threshold: OpenVINO float32 (the default), OpenVINO bf16 (``AISIGHT_PRECISION=bf16``) and
TensorFlow's frozen graph in float32 and bf16 (``AISIGHT_BACKEND=tensorflow``). A reduced-precision path
is acceptable for serving only if accuracy moves by less than 1 point; the script says whether it does.

    PYTHONPATH=. .venv/bin/python bench/precision.py [--model models/2.0.0] [--split SPLIT.csv] [--write-card]
    PYTHONPATH=. .venv/bin/python bench/precision.py --model models/2.0.0 --data ../shared/data/A,B,C --write-card

With ``--data`` the photos are those of the folders whose patients the model never saw (its
``split_patients.json`` or its card), read with the card's preprocessing, instead of a split CSV.
bf16 runs only on a CPU that computes it natively (AMX or AVX512-BF16); elsewhere its paths are skipped
and nothing is recorded.

``--write-card`` records the bf16 result (the worst bf16 path) in the model card as ``precision_check``;
the app's default ``AISIGHT_PRECISION=auto`` serves bf16 only for a model whose card records a change
within the limit.
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

from aisight.artifact import DEFAULT_MODEL_DIR  # noqa: E402  (the bundled model)

DEFAULT_SPLIT = ROOT / "runs" / "bundled" / "split" / "test.csv"
LIMIT_POINTS = 1.0  # the issue's bound on the accuracy change


def load_split(split: Path, preprocessing: str = "resize"):
    """Decode the split's photos with the model's preprocessing; paths are relative to the repo root."""
    from training.data import read_split

    samples = [s if Path(s.path).is_absolute() else replace(s, path=str(ROOT / s.path)) for s in read_split(split)]
    return _arrays(samples, preprocessing)


def load_unseen(model_dir: Path, data: str, card: dict):
    """The photos of ``data`` whose patients the model neither trained nor was tuned on."""
    from training.data import load_sources
    from training.evaluate import trained_patients

    seen = trained_patients(model_dir, card)
    return _arrays([s for s in load_sources(data).samples if s.patient_id not in seen],
                   card.get("preprocessing", "resize"))


def _arrays(samples, preprocessing: str):
    from training.data import load_arrays

    images, labels, kept, bad = load_arrays(samples, preprocessing=preprocessing)
    if bad:
        print(f"{len(bad)} unreadable photos skipped, e.g. {bad[0]}", file=sys.stderr)
    return images, labels, kept


# (name, backend, precision, freeze): the paths compared with the reference (the first one).
PATHS = (
    ("tf float32 traced (reference)", "tensorflow", "float32", "off"),
    ("openvino float32", "openvino", "float32", "off"),
    ("openvino bf16", "openvino", "bf16", "off"),
    ("tf float32 frozen", "tensorflow", "float32", "sync"),
    ("tf bf16 frozen", "tensorflow", "bf16", "sync"),
)


def probabilities(model_dir: Path, backend: str, precision: str, images: np.ndarray, freeze: str = "sync",
                  batch: int = 32) -> tuple[np.ndarray, dict]:
    """P(diseased) for every image through the predictor on one path, and the predictor's card."""
    from aisight.predictor import Predictor

    p = Predictor(model_dir, max_batch=1, precision=precision, freeze=freeze, backend=backend).load()
    if not p.ready:
        raise RuntimeError(f"model did not load: {p.error}")
    if p.precision != precision:
        raise RuntimeError(f"{precision} is not available here (the predictor fell back to {p.precision})")
    if freeze == "sync" and p.graph != "frozen":
        print(f"{backend} {precision}: the frozen graph did not build; measuring the traced one", file=sys.stderr)
    t = time.perf_counter()
    probs = np.concatenate([p.predict(images[i : i + batch]) for i in range(0, len(images), batch)])
    print(f"{backend} {precision}: {len(images)} images in {time.perf_counter() - t:.1f}s", file=sys.stderr,
          flush=True)
    p.close()
    return probs, p.card


def compare(labels: np.ndarray, ref: np.ndarray, other: np.ndarray, threshold: float) -> dict:
    """Metrics of a path at ``threshold`` and how far its answers are from the reference's."""
    from training.metrics import classification_metrics

    m_ref = classification_metrics(labels, ref, threshold)
    m = classification_metrics(labels, other, threshold)
    diff = np.abs(other - ref)
    delta = {k: 100 * (m[k] - m_ref[k]) for k in ("accuracy", "sensitivity", "specificity", "auc")}
    return {
        "metrics": m,
        "delta_points": delta,
        "max_abs_prob_diff": float(diff.max()) if len(diff) else 0.0,
        "mean_abs_prob_diff": float(diff.mean()) if len(diff) else 0.0,
        "label_flips": int(((ref >= threshold) != (other >= threshold)).sum()),
        "within_limit": abs(delta["accuracy"]) < LIMIT_POINTS,
    }


def markdown(res: dict, model: str, split: str) -> str:
    """The comparison as a Markdown table, one row per path."""
    rows = [
        f"Model {model}, {res['n']} photos of {split}, threshold {res['threshold']:.4f} (the card's).",
        "",
        "| path | accuracy | sensitivity | specificity | AUC | accuracy change (points) | AUC change (points) "
        "| largest P change | answers changed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["paths"].items():
        m, d = r["metrics"], r["delta_points"]
        rows.append(f"| {name} | {100 * m['accuracy']:.2f}% | {100 * m['sensitivity']:.2f}% "
                    f"| {100 * m['specificity']:.2f}% | {100 * m['auc']:.2f}% | {d['accuracy']:+.2f} "
                    f"| {d['auc']:+.2f} | {r['max_abs_prob_diff']:.2g} | {r['label_flips']} of {res['n']} |")
    outside = [name for name, r in res["paths"].items() if not r["within_limit"]]
    rows += ["", "Every path within the 1-point accuracy limit." if not outside
             else f"OUTSIDE the {LIMIT_POINTS:g}-point limit: {', '.join(outside)}."]
    return "\n".join(rows)


def bf16_record(res: dict, split: Path) -> dict | None:
    """The model card's ``precision_check.bf16``: the worst of the bf16 paths against the reference."""
    import datetime as dt

    paths = {name: r for name, r in res["paths"].items() if "bf16" in name}
    if not paths:
        return None
    worst = max(paths.values(), key=lambda r: abs(r["delta_points"]["accuracy"]))
    try:
        where = str(split.resolve().relative_to(ROOT))
    except ValueError:
        where = str(split)
    return {
        "accuracy_change_points": round(worst["delta_points"]["accuracy"], 3),
        "auc_change_points": round(max((r["delta_points"]["auc"] for r in paths.values()), key=abs), 3),
        "answers_changed": max(r["label_flips"] for r in paths.values()),
        "max_abs_prob_change": round(max(r["max_abs_prob_diff"] for r in paths.values()), 4),
        "n": res["n"],
        "split": where,
        "paths": sorted(paths),
        "reference": res["reference"],
        "measured": dt.date.today().isoformat(),
        "by": "bench/precision.py",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model artifact folder")
    ap.add_argument("--split", default=str(DEFAULT_SPLIT), help="the test part of the model's split (CSV)")
    ap.add_argument("--data", help="instead of --split: data folders; their photos of unseen patients")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--write-card", action="store_true", help="record the bf16 check in the model card")
    args = ap.parse_args(argv)
    from aisight.artifact import read_card

    model_card = read_card(args.model)
    if args.data:
        split = Path(args.data)
        images, labels, _ = load_unseen(Path(args.model), args.data, model_card)
    else:
        split = Path(args.split)
        if not split.is_file():
            print(f"test split not found: {split} (train a model first, or pass --split or --data)", file=sys.stderr)
            return 2
        images, labels, _ = load_split(split, model_card.get("preprocessing", "resize"))
    probs, card = {}, {}
    for name, backend, precision, freeze in PATHS:
        try:
            probs[name], card = probabilities(Path(args.model), backend, precision, images, freeze)
        except RuntimeError as exc:  # e.g. no IR, no native bf16: the other paths are still measured
            print(f"{name}: skipped ({exc})", file=sys.stderr)
    ref_name = PATHS[0][0]
    if ref_name not in probs:
        raise SystemExit("the reference path did not run")
    threshold = float(card["threshold"])
    res = {"n": int(len(labels)), "threshold": threshold, "reference": ref_name,
           "paths": {name: compare(labels, probs[ref_name], p, threshold) for name, p in probs.items()},
           "model": {"dir": args.model, "name": card["name"], "version": card["version"],
                     "architecture": card["architecture"]}}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(markdown(res, f"{card['name']} {card['version']} ({card['architecture']})", str(split)))
    if args.write_card:
        record = bf16_record(res, split)
        if record is None:
            print("no bf16 path ran: the model card is left as it is", file=sys.stderr)
        else:
            from aisight.artifact import write_card

            model_card.setdefault("precision_check", {})["bf16"] = record
            write_card(args.model, model_card)
            print(f"\nRecorded in {Path(args.model) / 'model_card.json'}: {json.dumps(record)}")
    return 0 if all(r["within_limit"] for r in res["paths"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
