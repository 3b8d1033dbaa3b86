"""Train one configuration: fit, check in inference mode every epoch, pick a threshold, export."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from training.metrics import classification_metrics, loss_value, threshold_for_sensitivity


def recalibrate_bn(model, images: np.ndarray, batch_size: int = 32, max_batches: int = 16) -> None:
    """Re-estimate every BatchNormalization layer's moving statistics on ``images``.

    Training from scratch moves the weights faster than BatchNormalization's moving averages follow,
    so in inference mode a model can answer one class for everything although it fits the training
    set. A cumulative average of batch statistics under the final weights fixes that.
    """
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return
    saved = [layer.momentum for layer in bns]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    n_batches = max(1, min(max_batches, len(images) // batch_size))
    for k in range(n_batches):
        for layer in bns:
            layer.momentum = k / (k + 1)  # k=0 replaces the statistics; later batches average in
        batch = images[order[k * batch_size : (k + 1) * batch_size]]
        model(np.asarray(batch, np.float32), training=True)
    for layer, momentum in zip(bns, saved, strict=True):
        layer.momentum = momentum


@dataclass
class TrainConfig:
    """One training configuration; every field is a command-line option and lands in the model card."""

    arch: str = "Xception"
    optimizer: str = "adam"
    loss: str = "mse"
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine (with warm-up) or constant
    warmup_epochs: int = 1
    epochs: int = 15
    batch_size: int = 32
    head: str = "flatten"
    dropout: float = 0.5
    trainable: str = "bn"
    bn_momentum: float | None = None
    weights: str = "none"
    augment: bool = False
    class_weight: bool = False
    precision: str = "float32"  # or bf16 (mixed precision: bfloat16 compute, float32 weights)
    seed: int = 0
    target_sensitivity: float = 0.94
    # Epoch kept: best val_auc, val_auc_odir (source-controlled), lowest val_loss, or the last (the paper's).
    select_metric: str = "val_auc"
    patience: int = 0  # stop after this many epochs without improvement (0: never)
    time_budget_minutes: float = 0.0  # stop before an epoch that would overrun this wall time (0: none)
    recalibrate_batches: int = 8
    name: str = "aisight"
    version: str = ""
    notes: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown options {sorted(unknown)}")
        return cls(**data)


OPTIMIZERS = ("adam", "rmsprop", "adagrad", "sgd")
LOSSES = {"mse": "mean_squared_error", "cce": "categorical_crossentropy", "mae": "mean_absolute_error"}


def make_optimizer(name: str, lr, **kwargs):
    """Build a Keras optimizer by short name."""
    import keras

    table = {
        "adam": keras.optimizers.Adam,
        "rmsprop": keras.optimizers.RMSprop,
        "adagrad": keras.optimizers.Adagrad,
        "sgd": keras.optimizers.SGD,
    }
    if name.lower() not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(table)}")
    return table[name.lower()](learning_rate=lr, **kwargs)


def loss_name(name: str) -> str:
    """Map a short loss name (mse, cce, mae; or the Keras name) to the Keras loss."""
    key = name.lower()
    if key in LOSSES:
        return LOSSES[key]
    if key in LOSSES.values():
        return key
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def augmenter(seed: int):
    """Random flips, small rotations and zooms, brightness and contrast jitter (training only)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.08, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed),
            keras.layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed),
            keras.layers.RandomContrast(0.15, seed=seed),
        ],
        name="augment",
    )


def predict_proba(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(diseased) in inference mode, batch by batch (no model.predict: it is slow and leaks)."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    out = [
        np.asarray(fn(tf.constant(images[i : i + batch_size], tf.float32)))[:, 1]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


SELECT_METRICS = ("val_auc", "val_auc_odir", "val_loss", "last")


def train_dataset(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, aug=None):
    """The training input pipeline: shuffle, batch, cast to float32, augment (optional), prefetch."""
    import keras
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 2)))
    ds = ds.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if aug is not None:
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def fit(
    cfg: TrainConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    log: Callable[[str], None] = print,
    history_path: Path | None = None,
    val_controlled: np.ndarray | None = None,
    progress: bool = False,
):
    """Train ``cfg`` on ``train``; every epoch recalibrate BatchNormalization and score ``val`` in
    inference mode; keep the weights of the best epoch. ``val_controlled`` marks the validation
    images of the source-controlled subset, reported (and selectable) separately. ``progress`` shows
    Keras' per-batch progress bar (long epochs on a CPU).
    Returns (model, history rows)."""
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if cfg.precision == "bf16" else "float32")
    model = build_model(
        cfg.arch, weights=cfg.weights, head=cfg.head, dropout=cfg.dropout, trainable=cfg.trainable,
        bn_momentum=cfg.bn_momentum,
    )
    x_train, y_train = train
    x_val, y_val = val
    steps = int(np.ceil(len(x_train) / cfg.batch_size))
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if cfg.warmup_epochs else cfg.lr, decay_steps=max(1, steps * (cfg.epochs - cfg.warmup_epochs)),
            warmup_target=cfg.lr if cfg.warmup_epochs else None, warmup_steps=steps * cfg.warmup_epochs,
        )
    elif cfg.schedule == "constant":
        lr = cfg.lr
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    model.compile(optimizer=make_optimizer(cfg.optimizer, lr), loss=loss_name(cfg.loss), metrics=["accuracy"])

    aug = augmenter(cfg.seed) if cfg.augment else None
    ds = train_dataset(x_train, y_train, cfg, aug)
    class_weight = None
    if cfg.class_weight:
        counts = np.bincount(y_train, minlength=2)
        class_weight = {i: len(y_train) / (2.0 * max(1, c)) for i, c in enumerate(counts)}

    history: list[dict[str, float]] = []
    best = {"score": -np.inf, "weights": None, "epoch": -1}
    stale = 0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        if cfg.time_budget_minutes and history:
            per_epoch = (t0 - started) / len(history)
            if t0 - started + per_epoch > cfg.time_budget_minutes * 60:
                log(f"time budget of {cfg.time_budget_minutes:g} min reached after {len(history)} epochs: stopping")
                break
        h = model.fit(ds, epochs=1, verbose=1 if progress else 0, class_weight=class_weight)
        train_seconds = time.perf_counter() - t0
        recalibrate_bn(model, x_train, cfg.batch_size, cfg.recalibrate_batches)
        p_val = predict_proba(model, x_val)
        vm = classification_metrics(y_val, p_val)
        val_loss = loss_value(loss_name(cfg.loss), y_val, p_val)
        row = {
            "epoch": epoch,
            "loss": float(h.history["loss"][-1]),
            "accuracy": float(h.history["accuracy"][-1]),
            "val_loss": val_loss,
            "val_accuracy": vm["accuracy"],
            "val_auc": vm["auc"],
            "val_sensitivity": vm["sensitivity"],
            "val_specificity": vm["specificity"],
            "val_auc_odir": (
                classification_metrics(y_val[val_controlled], p_val[val_controlled])["auc"]
                if val_controlled is not None and val_controlled.any()
                else float("nan")
            ),
            "val_mean_prob": float(p_val.mean()),
            "seconds": time.perf_counter() - t0,
            "images_per_second": len(x_train) / train_seconds,
        }
        history.append(row)
        if history_path:
            _append_csv(history_path, row)
        if cfg.select_metric not in SELECT_METRICS:
            raise ValueError(f"unknown select_metric {cfg.select_metric!r}; choose from {', '.join(SELECT_METRICS)}")
        if cfg.select_metric == "last":
            score = float(epoch)  # every epoch improves on the one before: the final weights are kept
        else:
            score = -row["val_loss"] if cfg.select_metric == "val_loss" else row[cfg.select_metric]
        if not np.isfinite(score):  # e.g. no source-controlled images in this data: fall back
            score = row["val_auc"]
        improved = np.isfinite(score) and score > best["score"]
        if improved:
            best = {"score": score, "weights": model.get_weights(), "epoch": epoch}
            stale = 0
            if history_path:  # a checkpoint of the best epoch so far, for inspection or a crash
                model.save_weights(history_path.with_name("best.weights.h5"))
        else:
            stale += 1
        log(
            f"epoch {epoch}/{cfg.epochs} loss {row['loss']:.4f} acc {row['accuracy']:.3f} | val loss {val_loss:.4f} "
            f"acc {vm['accuracy']:.3f} auc {vm['auc']:.3f} (odir {row['val_auc_odir']:.3f}) "
            f"sens {vm['sensitivity']:.3f} spec {vm['specificity']:.3f} "
            f"| {row['seconds']:.0f}s {row['images_per_second']:.1f} img/s{' *' if improved else ''}"
        )
        if cfg.patience and stale >= cfg.patience:
            log(f"no improvement in {cfg.patience} epochs: stopping")
            break
    if best["weights"] is not None:
        model.set_weights(best["weights"])
    model.best_epoch = best["epoch"]
    return model, history


def to_float32(model, cfg: TrainConfig):
    """A float32 copy of a (possibly mixed-precision) model, for export and serving."""
    import keras

    from training.models import build_model

    if cfg.precision == "float32":
        return model
    keras.mixed_precision.set_global_policy("float32")
    clone = build_model(
        cfg.arch, weights="none", head=cfg.head, dropout=cfg.dropout, trainable=cfg.trainable,
        bn_momentum=cfg.bn_momentum,
    )
    clone.set_weights(model.get_weights())
    return clone


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


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
) -> dict:
    """Split ``data`` by patient (leak-free), train ``cfg``, choose the threshold on validation data,
    evaluate on the test patients and export the serving artifact with its model card.

    With a ``recipe`` (training.recipe.Recipe), ``protocol='paper'`` or a ``limit`` the split comes from
    training.recipe instead: the paper's sampling and augmentation, split by patient first (leakfree)
    or after augmenting (paper, the published leak). Without them: the plain patient split, every photo
    once (how the bundled model is trained).
    """
    import datetime as dt

    from training.data import load_arrays, load_sources, split_by_patient, write_split
    from training.export import export_artifact

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    ds = load_sources(data)
    log(f"data: {len(ds.samples)} images {ds.counts()}, {len(ds.skipped)} skipped")
    recipe_info = None
    if protocol == "leakfree" and recipe is None and limit is None:
        parts = dict(zip(("train", "val", "test"), split_by_patient(ds.samples, seed=cfg.seed), strict=True))
        write_split(run / "split", parts)
        arrays = {}
        for name, samples in parts.items():
            x, y, kept, bad = load_arrays(samples, cache_dir)
            for path, why in bad:
                log(f"unreadable, skipped: {path}: {why}")
            arrays[name] = (x, y, kept)
            log(f"{name}: {len(y)} images, {int(y.sum())} diseased, {len({s.patient_id for s in kept})} patients")
        split_text = "split by patient 60/20/20 (leak-free)"
    else:
        from training.recipe import Recipe, prepare, write_parts

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
    history_path.unlink(missing_ok=True)
    controlled = np.array([s.source == SOURCE_CONTROLLED for s in arrays["val"][2]])
    model, history = fit(cfg, arrays["train"][:2], arrays["val"][:2], log, history_path, controlled)
    best_epoch = int(getattr(model, "best_epoch", -1))  # read before to_float32 returns a clone
    model = to_float32(model, cfg)
    probs = {name: predict_proba(model, x) for name, (x, _, _) in arrays.items()}
    threshold = threshold_for_sensitivity(arrays["val"][1], probs["val"], cfg.target_sensitivity)
    metrics = {name: evaluate_parts(y, probs[name], kept, threshold) for name, (_, y, kept) in arrays.items()}
    train_acc = classification_metrics(arrays["train"][1], probs["train"], 0.5)["accuracy"]
    val_at_half = classification_metrics(arrays["val"][1], probs["val"], 0.5)
    metrics["overfitting"] = train_acc - val_at_half["accuracy"]
    metrics["generalisation_gap"] = {
        k: abs(metrics["val"]["all"][k] - metrics["test"]["all"][k]) for k in ("accuracy", "sensitivity", "specificity")
    }
    np.savez_compressed(run / "predictions.npz", **{f"{k}_prob": v for k, v in probs.items()},
                        **{f"{k}_y": arrays[k][1] for k in arrays})
    sources = ", ".join(f"{k or 'unknown'}: {v}" for k, v in sorted(Counter(s.source for s in ds.samples).items()))
    card = {
        "name": cfg.name,
        "version": cfg.version or dt.date.today().isoformat(),
        "architecture": cfg.arch,
        "optimizer": cfg.optimizer,
        "loss": cfg.loss,
        "threshold": threshold,
        "threshold_rule": f"highest threshold with validation sensitivity >= {cfg.target_sensitivity}",
        "training": {
            "data": str(data),
            "data_summary": f"{len(ds.samples)} photos from {Path(data).name} ({sources}), {split_text}",
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
    _export_openvino(out_dir, arrays["test"][0][:8], log)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps({k: metrics[k] for k in ("val", "test")}, indent=1))
    return card


def _export_openvino(out_dir: str | Path, check_images, log: Callable[[str], None]) -> None:
    """Add the OpenVINO IR (the CPU fast path) to the artifact, if OpenVINO is installed here."""
    from aisight import ov_backend

    if not ov_backend.available():
        log("OpenVINO not installed: no IR written (the app serves with TensorFlow)")
        return
    info = ov_backend.export_dir(out_dir, check_images=check_images)
    log(f"OpenVINO IR written to {Path(out_dir) / ov_backend.IR_FILE} (largest difference {info['max_abs_diff']:.2g})")
