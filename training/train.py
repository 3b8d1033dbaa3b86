"""Train one configuration: fit, check in inference mode every epoch, pick a threshold, export."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

# Moved to training.config and training.fit; imported here so existing callers keep working.
from training.config import LOSSES, OPTIMIZERS, TrainConfig, loss_name, make_optimizer  # noqa: E402,F401
from training.fit import (  # noqa: E402,F401
    SELECT_METRICS,
    augmenter,
    fit,
    predict_proba,
    recalibrate_bn,
    to_float32,
    train_dataset,
)
from training.metrics import classification_metrics, threshold_for_sensitivity

SOURCE_CONTROLLED = "odir"  # DATA.md: the one collection with both healthy and diseased photos


def evaluate_parts(
    y: np.ndarray, prob: np.ndarray, samples: list, threshold: float
) -> dict[str, dict]:
    """Metrics on the whole part and on its source-controlled subset (``source == odir``)."""
    out = {"all": classification_metrics(y, prob, threshold)}
    mask = np.array([s.source == SOURCE_CONTROLLED for s in samples])
    if mask.any() and len(set(y[mask])) == 2:
        out[SOURCE_CONTROLLED] = classification_metrics(y[mask], prob[mask], threshold)
    return out


def train_and_export(
    cfg: TrainConfig,
    data: str | Path,
    out_dir: str | Path,
    run_dir: str | Path,
    cache_dir: str | Path | None = ".cache/arrays",
    log: Callable[[str], None] = print,
    protocol: str = "leakfree",
    recipe=None,
    limit: int | None = None,
    resume: bool = False,
) -> dict:
    """Split ``data`` by patient (leak-free), train ``cfg``, choose the threshold on validation data,
    evaluate on the test patients and export the serving artifact with its model card.

    ``data`` may join several folders; patients are grouped across them. Every epoch is checkpointed
    in ``run_dir/checkpoint``; ``resume`` continues a stopped run from there. With a ``recipe``
    (training.recipe.Recipe), ``protocol='paper'`` or a ``limit`` the split comes from training.recipe
    instead: the paper's sampling and augmentation, split by patient first (leakfree) or after
    augmenting (paper, the published leak). Without them: the plain patient split, every photo once
    (how the bundled model is trained).
    """
    import datetime as dt

    from training.data import load_arrays, load_sources, split_by_patient, write_split
    from training.evaluate import SPLIT_FILE, class_metrics, task_metrics
    from training.export import export_artifact
    from training.tasks import cells, controlled_names, looks, task_masks

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    ds = load_sources(data)
    log(f"data: {len(ds.samples)} images {ds.counts()}, {len(ds.skipped)} skipped")
    recipe_info = None
    crops = cfg.preprocessing == "fundus-v2"
    if protocol == "leakfree" and recipe is None and limit is None:
        parts = dict(zip(("train", "val", "test"), split_by_patient(ds.samples, seed=cfg.seed), strict=True))
        write_split(run / "split", parts)
        arrays = {}
        for name, samples in parts.items():
            x, y, kept, bad = load_arrays(samples, cache_dir, preprocessing=cfg.preprocessing,
                                          crops=crops and name == "train")
            for path, why in bad:
                log(f"unreadable, skipped: {path}: {why}")
            arrays[name] = (x, y, kept)
            log(f"{name}: {len(y)} images, {int(y.sum())} diseased, {len({s.patient_id for s in kept})} patients")
        split_text = "split by patient 60/20/20 across folders (leak-free)"
    else:
        from training.recipe import Recipe, prepare, write_parts

        if cfg.preprocessing != "resize":
            raise ValueError("the paper's recipe and --limit use the plain resize: pass --preprocessing resize")
        recipe = recipe or Recipe()
        prep = prepare(ds.samples, recipe, protocol, cfg.seed, limit, cache_dir, None, log)
        write_parts(run / "split", prep.parts, prep.info)
        arrays, recipe_info = prep.arrays, prep.info
        split_text = (
            f"{recipe.name} recipe, augmented then split 60/20/20 by image (the paper's protocol: copies of "
            "one photo in train and test)"
            if protocol == "paper"
            else f"split by patient 60/20/20, then the {recipe.name} recipe on the training part (leak-free)"
        )

    history_path = run / "history.csv"
    model, history = fit(  # the tasks include ODIR (val_auc_odir) where the data has it
        cfg, arrays["train"][:2], arrays["val"][:2], log, history_path,
        val_tasks=task_masks(arrays["val"][2]), controlled_tasks=controlled_names(),
        train_cells=cells(arrays["train"][2]), train_looks=looks(arrays["train"][2]),
        checkpoint=run / "checkpoint", resume=resume,
    )
    best_epoch = int(getattr(model, "best_epoch", -1))  # read before to_float32 returns a clone
    model = to_float32(model, cfg)
    if crops:  # scored on the served input, not on the cached crops
        from training.augment import inputs_from_crops

        arrays["train"] = (inputs_from_crops(arrays["train"][0]), *arrays["train"][1:])
    probs = {name: predict_proba(model, x) for name, (x, _, _) in arrays.items()}
    threshold = threshold_for_sensitivity(arrays["val"][1], probs["val"], cfg.target_sensitivity)
    metrics = {name: evaluate_parts(y, probs[name], kept, threshold) for name, (_, y, kept) in arrays.items()}
    train_acc = classification_metrics(arrays["train"][1], probs["train"], 0.5)["accuracy"]
    val_at_half = classification_metrics(arrays["val"][1], probs["val"], 0.5)
    metrics["overfitting"] = train_acc - val_at_half["accuracy"]
    metrics["generalisation_gap"] = {
        k: abs(metrics["val"]["all"][k] - metrics["test"]["all"][k]) for k in ("accuracy", "sensitivity", "specificity")
    }
    # Per task (source-controlled first) with 95% intervals, and per source x class, on val and test.
    metrics["tasks"] = {name: task_metrics(arrays[name][2], probs[name], threshold) for name in ("val", "test")}
    metrics["classes"] = {"test": class_metrics(arrays["test"][2], probs["test"], threshold)}
    np.savez_compressed(run / "predictions.npz", **{f"{k}_prob": v for k, v in probs.items()},
                        **{f"{k}_y": arrays[k][1] for k in arrays})
    card = {
        "name": cfg.name,
        "version": cfg.version or dt.date.today().isoformat(),
        "architecture": cfg.arch,
        "optimizer": cfg.optimizer,
        "loss": cfg.loss,
        "preprocessing": cfg.preprocessing,
        "input": _input_text(cfg.preprocessing),
        "threshold": threshold,
        "threshold_rule": f"highest threshold with validation sensitivity >= {cfg.target_sensitivity}",
        "training": {
            "data": str(data),
            "data_summary": f"{len(ds.samples)} photos ({_summary(ds.samples)}), {split_text}",
            "sources": sorted({s.source for s in ds.samples if s.source}),
            "protocol": protocol,
            **({"recipe": recipe_info} if recipe_info else {}),
            "split_counts": {k: {"images": len(v[1]), "diseased": int(v[1].sum())} for k, v in arrays.items()},
            "config": asdict(cfg),
            "best_epoch": best_epoch,
            "epochs_run": len(history),
        },
        "metrics": metrics,
        "notes": cfg.notes,
    }
    export_artifact(model, out_dir, card)
    split_patients = {k: sorted({s.patient_id for s in v[2]}) for k, v in arrays.items()}
    (Path(out_dir) / SPLIT_FILE).write_text(json.dumps(split_patients) + "\n")
    _export_openvino(out_dir, arrays["test"][0][:8], log)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps({k: metrics[k] for k in ("val", "test")}, indent=1))
    return card


def _summary(samples) -> str:
    """``folder: source n, ...`` counts of a joined data set."""
    counts = Counter((s.folder or "data", s.source or "unknown") for s in samples)
    return ", ".join(f"{f}/{src}: {n}" for (f, src), n in sorted(counts.items()))


def _input_text(preprocessing: str) -> str:
    if preprocessing == "fundus-v2":
        return ("RGB uint8: the fundus field cropped, resized to 128x128, local contrast per channel in units of "
                "its own spread, outside the field grey (aisight.fundus, applied by aisight.preprocess)")
    return "RGB uint8 0..255, resized to 128x128 by aisight.preprocess (preprocessing is inside the model)"


def _export_openvino(out_dir: str | Path, check_images, log: Callable[[str], None]) -> None:
    """Add the OpenVINO IR (the CPU fast path) to the artifact, if OpenVINO is installed here."""
    from aisight import ov_backend

    if not ov_backend.available():
        log("OpenVINO not installed: no IR written (the app serves with TensorFlow)")
        return
    info = ov_backend.export_dir(out_dir, check_images=check_images)
    log(f"OpenVINO IR written to {Path(out_dir) / ov_backend.IR_FILE} (largest difference {info['max_abs_diff']:.2g})")
