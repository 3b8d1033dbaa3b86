"""Measure a model artifact per source, per class and per task, on photos it was not trained on.

``python -m training evaluate --model DIR --data ... --out DIR`` writes ``evaluation.md`` and
``evaluation.json``:

- every task of ``training.tasks`` (the source-controlled ones first): AUC with a bootstrap 95% interval,
  sensitivity and specificity at the model's own threshold;
- every source x original class: how many photos, the share called diseased, the mean probability;
- a shortcut probe: how well the model's own pooled features tell the collection (folder x source) of a
  photo, separately within each label (a logistic regression, cross-validated by patient). Chance is
  what a model that cannot see the camera would score; higher means the camera is visible to it.

Photos of patients the model trained or was tuned on (its training and validation patients) are left
out: the artifact lists them (``split_patients.json``), or they are recomputed from the card.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from training.data import Sample
from training.metrics import auc, classification_metrics
from training.tasks import TASKS

SPLIT_FILE = "split_patients.json"
BOOTSTRAP = 1000


def bootstrap_auc(y: np.ndarray, prob: np.ndarray, reps: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC, resampling positives and negatives separately."""
    y = np.asarray(y).astype(bool)
    pos, neg = np.asarray(prob)[y], np.asarray(prob)[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    values = [
        auc(labels, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(reps)
    ]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auc_difference(y: np.ndarray, prob_b: np.ndarray, prob_a: np.ndarray, reps: int = BOOTSTRAP,
                             seed: int = 0) -> tuple[float, float, float]:
    """AUC(b) - AUC(a) of two models on the same photos, with a paired 95% percentile interval (the same
    resampled positives and negatives for both, so what the photos share does not widen it)."""
    y = np.asarray(y).astype(bool)
    a, b = np.asarray(prob_a), np.asarray(prob_b)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    diffs = []
    for _ in range(reps):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        diffs.append(auc(labels, b[idx]) - auc(labels, a[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return auc(y, b) - auc(y, a), float(lo), float(hi)


def task_metrics(samples: Sequence[Sample], prob: np.ndarray, threshold: float) -> dict[str, dict]:
    """Each task with both classes present: counts, AUC [95% CI], sensitivity/specificity at ``threshold``."""
    out = {}
    for t in TASKS:
        mask, y = t.select(samples)
        if not mask.any() or y.sum() in (0, len(y)):
            continue
        m = classification_metrics(y, prob[mask], threshold)
        lo, hi = bootstrap_auc(y, prob[mask])
        out[t.name] = {
            "title": t.title, "controlled": t.controlled, "negatives": int((y == 0).sum()),
            "positives": int(y.sum()), "auc": m["auc"], "auc_ci95": [lo, hi],
            "sensitivity": m["sensitivity"], "specificity": m["specificity"],
        }
    return out


def class_metrics(samples: Sequence[Sample], prob: np.ndarray, threshold: float) -> list[dict]:
    """Per (folder, source, original class): count, share called diseased, mean P(diseased)."""
    keys = sorted({(s.folder, s.source, s.original_label, s.label) for s in samples})
    rows = []
    for folder, source, original, label in keys:
        m = np.array([(s.folder, s.source, s.original_label) == (folder, source, original) for s in samples])
        called = float((prob[m] >= threshold).mean())
        rows.append({
            "folder": folder, "source": source, "class": original, "label": "diseased" if label else "healthy",
            "n": int(m.sum()), "called_diseased": called, "mean_probability": float(prob[m].mean()),
            # the share answered correctly: sensitivity for a disease class, specificity for a healthy one
            "correct": called if label else 1.0 - called,
        })
    return rows


def _standardise(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean(0)) / (ref.std(0) + 1e-6)


def logistic_fit(x: np.ndarray, y: np.ndarray, k: int, l2: float = 1e-2, steps: int = 300) -> np.ndarray:
    """Multinomial logistic regression (with a bias column) by full-batch gradient descent; weights."""
    xb = np.c_[x, np.ones(len(x))]
    w = np.zeros((xb.shape[1], k))
    onehot = np.eye(k)[y]
    lr = 0.5
    for _ in range(steps):
        z = xb @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        grad = xb.T @ (p - onehot) / len(x) + l2 * np.r_[w[:-1], np.zeros((1, k))]
        w -= lr * grad
    return w


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes]))


def shortcut_probe(features: np.ndarray, samples: Sequence[Sample], folds: int = 5, seed: int = 0) -> dict:
    """Within each label, how well the features predict the collection (folder:source): balanced
    accuracy of a logistic regression, 5-fold cross-validated by patient, beside chance (1/k)."""
    out = {}
    for label, name in ((0, "healthy"), (1, "diseased")):
        idx = np.array([i for i, s in enumerate(samples) if s.label == label])
        if len(idx) == 0:
            continue
        groups = [f"{samples[i].folder}:{samples[i].source}" for i in idx]
        counts = Counter(groups)
        kept = [j for j, g in enumerate(groups) if counts[g] >= 10]  # a collection needs photos to learn it
        names = sorted({groups[j] for j in kept})
        if len(names) < 2:
            continue
        idx = idx[kept]
        y = np.array([names.index(groups[j]) for j in kept])
        patients = np.array([samples[i].patient_id for i in idx])
        unique = np.unique(patients)
        fold_of = dict(zip(unique, np.random.default_rng(seed).permutation(len(unique)) % folds, strict=True))
        fold = np.array([fold_of[p] for p in patients])
        pred = np.empty(len(idx), np.int64)
        x = features[idx].astype(np.float64)
        for f in range(folds):
            tr, te = fold != f, fold == f
            if not te.any() or len(np.unique(y[tr])) < 2:
                pred[te] = 0
                continue
            w = logistic_fit(_standardise(x[tr], x[tr]), y[tr], len(names))
            pred[te] = np.argmax(np.c_[_standardise(x[te], x[tr]), np.ones(te.sum())] @ w, axis=1)
        out[name] = {"collections": {n: int(c) for n, c in zip(names, np.bincount(y), strict=True)},
                     "balanced_accuracy": balanced_accuracy(y, pred), "chance": 1.0 / len(names)}
    return out


def trained_patients(model_dir: str | Path, card: dict) -> set[str]:
    """Patients the model was trained or tuned on: from the artifact's list, else recomputed from the card."""
    train, val = seen_parts(model_dir, card)
    return train | val


def seen_parts(model_dir: str | Path, card: dict) -> tuple[set[str], set[str]]:
    """(trained on, tuned on): the patients of the model's training and validation parts."""
    listed = Path(model_dir) / SPLIT_FILE
    if listed.is_file():
        parts = json.loads(listed.read_text())
        return set(parts.get("train", [])), set(parts.get("val", []))
    from training.data import load_sources, split_by_patient

    training = card.get("training", {})
    data = training.get("data")
    if not data:
        raise ValueError(f"{model_dir}: no {SPLIT_FILE} and no training data in the card: cannot tell "
                         "which photos the model saw (pass --all-photos to evaluate on every photo)")
    root = Path(__file__).resolve().parent.parent
    spec = ",".join(str(p if Path(p).is_absolute() else root / p) for p in str(data).split(","))
    train, val, _ = split_by_patient(load_sources(spec).samples, seed=training.get("config", {}).get("seed", 0))
    return {s.patient_id for s in train}, {s.patient_id for s in val}


def model_outputs(model, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(P(diseased), pooled features) of every image, in inference mode, in one pass per batch."""
    import keras
    import tensorflow as tf

    pooled = next(layer for layer in model.layers if layer.name in ("gap", "flatten"))
    both = keras.Model(model.inputs, [model.outputs[0], pooled.output])
    fn = tf.function(lambda x: both(x, training=False))
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        p, f = fn(tf.constant(images[i : i + batch_size], tf.float32))
        probs.append(np.asarray(p)[:, 1])
        feats.append(np.asarray(f, np.float32))
    return np.concatenate(probs).astype(np.float64), np.concatenate(feats)


def evaluate_model(
    model_dir: str | Path,
    data,
    out: str | Path,
    cache_dir: str | Path | None = None,
    all_photos: bool = False,
    log: Callable[[str], None] = print,
    write_card: bool = False,
    exclude_seen_by: Sequence[str | Path] = (),
) -> dict:
    """Evaluate the artifact in ``model_dir`` on ``data`` and write evaluation.md/.json into ``out``;
    ``write_card`` also records the per-task figures in the model card (``evaluation``), which the
    result page shows. ``exclude_seen_by``: other artifacts whose training and validation patients are
    left out too, so that two models are compared on the same photos, unseen by both."""
    from aisight.artifact import load_model, read_card
    from training.data import load_arrays, load_sources

    card = read_card(model_dir)
    preprocessing = card.get("preprocessing", "resize")
    samples = load_sources(data).samples
    excluded = 0
    if not all_photos:
        seen = trained_patients(model_dir, card)
        excluded = sum(s.patient_id in seen for s in samples)
        samples = [s for s in samples if s.patient_id not in seen]
    for other in exclude_seen_by:
        seen = trained_patients(other, read_card(other))
        excluded += sum(s.patient_id in seen for s in samples)
        samples = [s for s in samples if s.patient_id not in seen]
    log(f"{len(samples)} photos ({excluded} of patients the model trained or was tuned on left out)")
    x, _, samples, bad = load_arrays(samples, cache_dir, preprocessing=preprocessing)
    for path, why in bad:
        log(f"unreadable, skipped: {path}: {why}")
    model = load_model(model_dir)
    prob, features = model_outputs(model, x)
    threshold = float(card["threshold"])
    result = {
        "model": {k: card.get(k) for k in ("name", "version", "architecture", "preprocessing")},
        "threshold": threshold,
        "data": str(data),
        "photos": len(samples),
        "excluded_trained_photos": excluded,
        "excluded_seen_by": [str(o) for o in exclude_seen_by],
        "tasks": task_metrics(samples, prob, threshold),
        "classes": class_metrics(samples, prob, threshold),
        "shortcut_probe": shortcut_probe(features, samples),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "evaluation.md").write_text(markdown(result))
    # What `python -m training paired` needs to set two evaluations on the same photos side by side.
    np.savez_compressed(out / "predictions.npz", prob=prob, path=np.array([s.path for s in samples]),
                        y=np.array([s.label for s in samples]), source=np.array([s.source for s in samples]),
                        original_label=np.array([s.original_label for s in samples]))
    if write_card:
        if all_photos or exclude_seen_by:
            raise ValueError("--write-card records the model's own held-out photos: drop --all-photos and "
                             "--exclude-seen-by")
        import datetime as dt

        from aisight.artifact import write_card as save_card

        card["evaluation"] = {
            "date": dt.date.today().isoformat(),
            "folders": sorted({s.folder for s in samples if s.folder}),
            "photos": len(samples),
            "excluded_trained_photos": excluded,
            "rule": "photos of patients the model was neither trained nor tuned on",
            "tasks": result["tasks"],
            "shortcut_probe": {k: {"balanced_accuracy": v["balanced_accuracy"], "chance": v["chance"]}
                               for k, v in result["shortcut_probe"].items()},
        }
        save_card(model_dir, card)
    log(markdown(result))
    return result


def _f(v: float, digits: int = 3) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def markdown(r: dict) -> str:
    """The evaluation as Markdown tables."""
    m = r["model"]
    lines = [
        f"# Evaluation of {m['name']} {m['version']} ({m['architecture']}, input {m.get('preprocessing') or 'resize'})",
        "",
        f"{r['photos']} photos from {r['data']}; {r['excluded_trained_photos']} photos of patients the model "
        f"trained or was tuned on left out"
        + (f" (also those of {', '.join(r['excluded_seen_by'])})" if r.get("excluded_seen_by") else "")
        + f". Threshold {r['threshold']:.4f} (the model card's).",
        "",
        "## Tasks (source-controlled first)",
        "",
        "| task | controlled | healthy | diseased | AUC [95% CI] | sensitivity | specificity |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for t in sorted(r["tasks"].values(), key=lambda t: not t["controlled"]):
        lo, hi = t["auc_ci95"]
        lines.append(f"| {t['title']} | {'yes' if t['controlled'] else 'no'} | {t['negatives']} | {t['positives']} | "
                     f"{_f(t['auc'])} [{_f(lo)}, {_f(hi)}] | {_f(t['sensitivity'])} | {_f(t['specificity'])} |")
    lines += ["", "## Per source and class", "",
              "| folder | source | class | label | photos | called diseased | correct | mean P(diseased) |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for c in r["classes"]:
        lines.append(f"| {c['folder']} | {c['source']} | {c['class']} | {c['label']} | {c['n']} | "
                     f"{_f(c['called_diseased'])} | {_f(c['correct'])} | {_f(c['mean_probability'])} |")
    lines += ["", "## Shortcut probe", "",
              "Balanced accuracy of a logistic regression that predicts the collection from the model's pooled "
              "features, within one label (5-fold, by patient). Chance = a model blind to the camera; lower is "
              "better.", "",
              "| label | collections (photos) | balanced accuracy | chance |", "| --- | --- | ---: | ---: |"]
    for label, p in r["shortcut_probe"].items():
        cols = ", ".join(f"{k} ({v})" for k, v in p["collections"].items())
        lines.append(f"| {label} | {cols} | {_f(p['balanced_accuracy'])} | {_f(p['chance'])} |")
    return "\n".join(lines) + "\n"
