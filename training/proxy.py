"""Compare training methods cheaply: a small network, one split, per-task validation every epoch.

``python -m training compare`` trains one configuration on the patient split of all given folders
(optionally leaving one source out of training entirely: the estimate of a new clinic) and writes
``result.json`` with the per-task validation AUCs of every epoch and of the kept epoch. The winner
of these comparisons is what the one long Xception run uses.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from training.config import TrainConfig


def run_comparison(
    cfg: TrainConfig,
    data,
    out: str | Path,
    cache_dir: str | Path | None,
    leave_out: str | None = None,
    train_sources: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> dict:
    """Train ``cfg`` on the training patients (minus source ``leave_out``, or only ``train_sources``);
    validate on the validation patients of every source, plus every photo of the left-out source."""
    from training.data import load_arrays, load_sources, split_by_patient
    from training.fit import fit
    from training.tasks import TASKS, cells, controlled_names, looks, task_masks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    ds = load_sources(data)
    train, val, _test = split_by_patient(ds.samples, seed=0)  # the same split for every comparison
    train = [s for s in train if s.source != leave_out and (not train_sources or s.source in train_sources)]
    evaluate = [s for s in val if s.source != leave_out]
    if leave_out:
        evaluate += [s for s in ds.samples if s.source == leave_out]  # never trained on: all of it
    if not train:
        raise ValueError("no training photos left after --leave-out/--train-sources")
    crops = cfg.preprocessing == "fundus-v2"
    x_tr, y_tr, train, _ = load_arrays(train, cache_dir, preprocessing=cfg.preprocessing, crops=crops)
    x_ev, y_ev, evaluate, _ = load_arrays(evaluate, cache_dir, preprocessing=cfg.preprocessing)
    log(f"train {len(y_tr)} ({dict(Counter((s.source, s.label) for s in train))}), evaluate {len(y_ev)}"
        + (f", left out: {leave_out}" if leave_out else ""))
    masks = task_masks(evaluate)
    t0 = time.perf_counter()
    model, history = fit(
        cfg, (x_tr, y_tr), (x_ev, y_ev), log, out / "history.csv", val_tasks=masks,
        controlled_tasks=controlled_names(), train_cells=cells(train), train_looks=looks(train),
        checkpoint=out / "checkpoint", resume=resume,
    )
    from training.fit import predict_proba
    from training.metrics import classification_metrics

    prob = predict_proba(model, x_ev)
    best = {name: classification_metrics(y_ev[m], prob[m])["auc"] for name, m in masks.items()}
    per_source = {}
    for src in sorted({s.source for s in evaluate}):
        m = np.array([s.source == src for s in evaluate])
        per_source[src] = {"n": int(m.sum()), "mean_prob_healthy": _mean(prob[m & (y_ev == 0)]),
                           "mean_prob_diseased": _mean(prob[m & (y_ev == 1)])}
    result = {
        "config": asdict(cfg),
        "leave_out": leave_out,
        "train_sources": list(train_sources),
        "best_epoch": int(getattr(model, "best_epoch", -1)),
        "epochs_run": len(history),
        "seconds": time.perf_counter() - t0,
        "auc": best,
        "tasks": {t.name: t.title for t in TASKS if t.name in masks},
        "per_source": per_source,
        "history": history,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    np.savez_compressed(out / "predictions.npz", prob=prob, y=y_ev, path=np.array([s.path for s in evaluate]),
                        source=np.array([s.source for s in evaluate]),
                        original_label=np.array([s.original_label for s in evaluate]))
    log(f"kept epoch {result['best_epoch']}: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    return result


def _mean(v: np.ndarray) -> float:
    return float(v.mean()) if v.size else float("nan")


def paired(run: str | Path, baseline: str | Path) -> dict[str, dict]:
    """Per task, two comparison runs' AUCs on the same photos and their paired difference (run minus
    baseline) with a bootstrap 95% interval: did a method change help, beyond the photos' luck?"""
    from types import SimpleNamespace

    from training.evaluate import bootstrap_auc_difference
    from training.metrics import auc
    from training.tasks import TASKS

    a, b = (np.load(Path(d) / "predictions.npz") for d in (run, baseline))
    same = [k for k in ("path", "y", "source", "original_label") if k in a.files and k in b.files]
    if len(a["y"]) != len(b["y"]) or not all(np.array_equal(a[k], b[k]) for k in same):
        raise ValueError(f"{run} and {baseline} were not evaluated on the same photos (same data, split and "
                         "--leave-out are needed)")
    samples = [SimpleNamespace(source=s, label=int(y), original_label=o)
               for s, y, o in zip(a["source"], a["y"], a["original_label"], strict=True)]
    out = {}
    for task in TASKS:
        mask, y = task.select(samples)
        if 0 < y.sum() < len(y):
            diff, lo, hi = bootstrap_auc_difference(y, a["prob"][mask], b["prob"][mask])
            out[task.name] = {"title": task.title, "controlled": task.controlled, "n": int(mask.sum()),
                              "run": auc(y, a["prob"][mask]), "baseline": auc(y, b["prob"][mask]),
                              "difference": diff, "ci95": [lo, hi]}
    return out


def paired_markdown(result: dict[str, dict], run: str, baseline: str) -> str:
    """``paired``'s result as a Markdown table."""
    lines = [f"run `{run}` against baseline `{baseline}`, the same photos; AUC difference with a paired "
             "bootstrap 95% interval", "", "| task | photos | baseline | run | difference [95% CI] |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in result.values():
        lo, hi = r["ci95"]
        lines.append(f"| {r['title']} | {r['n']} | {r['baseline']:.3f} | {r['run']:.3f} | "
                     f"{r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines) + "\n"

