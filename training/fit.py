"""The training loop shared by ``train``, ``select`` and the proxy comparisons.

Every epoch: draw the epoch's images (optionally balanced by label or by source x label), fit, re-estimate
BatchNormalization statistics, score the validation photos in inference mode (overall and per task),
keep the best epoch, and, with a checkpoint folder, save everything needed to resume after a stop.
"""

from __future__ import annotations

import csv
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training import adversary
from training.checkpoint import Checkpoint, lr_schedule, warm_restart
from training.config import TrainConfig, loss_name, make_optimizer
from training.metrics import classification_metrics, loss_value
from training.sampling import epoch_indices

SELECT_METRICS = ("val_auc", "val_auc_odir", "val_auc_controlled", "val_loss", "last")


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


_PREDICT_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def predict_proba(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(diseased) in inference mode, batch by batch (no model.predict: it is slow and leaks).

    The traced function is kept per model: validation every epoch then traces once, not every epoch."""
    import tensorflow as tf

    fn = _PREDICT_FNS.get(model)
    if fn is None:
        fn = _PREDICT_FNS[model] = tf.function(lambda x: model(x, training=False))
    out = [
        np.asarray(fn(tf.constant(images[i : i + batch_size], tf.float32)))[:, 1]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def train_dataset(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, aug=None, seed: int | None = None,
                  cells: np.ndarray | None = None):
    """The training input pipeline: shuffle, batch, cast to float32, augment (optional), prefetch.

    ``x`` with 4 channels holds fundus crops + masks (``training.augment``): they are augmented as a
    camera would change them, then normalised (with ``cfg.augment``; normalised only without).
    ``cells`` appends each photo's cell number to its target (the domain-adversarial trainer's).
    """
    import keras
    import tensorflow as tf

    seed = cfg.seed if seed is None else seed
    targets = keras.utils.to_categorical(y, 2)
    if cells is not None:
        targets = adversary.targets(targets, cells)
    if x.ndim == 4 and x.shape[-1] == 4:
        from training.augment import fundus_dataset

        order = np.random.default_rng(seed).permutation(len(x))
        return fundus_dataset(x[order], targets[order], cfg.batch_size, seed, augment=cfg.augment)
    ds = tf.data.Dataset.from_tensor_slices((x, targets))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if aug is not None:
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _model_inputs(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Model inputs of ``x[idx]`` (normalising packed fundus crops)."""
    if x.shape[-1] == 4:
        from training.augment import inputs_from_crops

        return inputs_from_crops(x[idx])
    return x[idx]


def _score(cfg: TrainConfig, row: dict) -> float:
    if cfg.select_metric == "last":
        return float(row["epoch"])  # every epoch improves on the one before: the final weights are kept
    if cfg.select_metric == "val_loss":
        return -row["val_loss"]
    if cfg.select_metric not in SELECT_METRICS and cfg.select_metric not in row:
        raise ValueError(f"unknown select_metric {cfg.select_metric!r}; choose from {', '.join(SELECT_METRICS)} "
                         "or val_auc_<task>")
    score = row.get(cfg.select_metric, float("nan"))
    return score if np.isfinite(score) else row["val_auc"]  # e.g. no such photos in this data: fall back


def fit(
    cfg: TrainConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    log: Callable[[str], None] = print,
    history_path: Path | None = None,
    val_controlled: np.ndarray | None = None,
    progress: bool = False,
    *,
    val_tasks: dict[str, np.ndarray] | None = None,
    controlled_tasks: tuple[str, ...] = (),
    train_cells: np.ndarray | None = None,
    train_looks: np.ndarray | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
):
    """Train ``cfg`` on ``train``; every epoch recalibrate BatchNormalization and score ``val`` in
    inference mode; keep the weights of the best epoch.

    ``val_controlled`` marks the validation images of ODIR (``val_auc_odir``); ``val_tasks`` maps task
    names to validation masks, each scored as ``val_auc_<task>``, and the mean over ``controlled_tasks``
    is ``val_auc_controlled``. ``train_cells`` (look x label cell per image) serves ``balance='cell'``, with
    ``train_looks`` (folder x source per image) ``balance='pairs'``.
    With ``checkpoint`` a folder keeps the last epoch's model and optimizer (every epoch) and the best
    weights; ``resume`` continues from it. ``progress`` shows Keras' per-batch bar.
    Returns (model, history rows).
    """
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if cfg.precision == "bf16" else "float32")
    x_train, y_train = train
    x_val, y_val = val
    size = cfg.epoch_size or len(x_train)
    steps = int(np.ceil(size / cfg.batch_size))
    ckpt = Checkpoint(checkpoint) if checkpoint else None
    history: list[dict[str, float]] = []
    best = {"score": -np.inf, "weights": None, "epoch": -1}
    stale, first_epoch, restart = 0, 1, None
    if cfg.adversary and (train_cells is None or cfg.class_weight):
        raise ValueError("adversary needs train_cells (the camera look of every training photo) and no class_weight")
    if resume and ckpt and ckpt.exists():
        trainer, state = ckpt.load()  # the trainer, head included, for a domain-adversarial run
        model = adversary.classifier(trainer) if cfg.adversary else trainer
        history, stale = state["history"], state["stale"]
        best.update(score=state["best_score"], epoch=state["best_epoch"])
        first_epoch = state["epoch"] + 1
        log(f"resumed from {ckpt.folder} after epoch {state['epoch']} (best epoch {state['best_epoch']})")
        restart = state.get("restart") or warm_restart(cfg, trainer, state["epoch"], steps, log)
    else:
        model = build_model(
            cfg.arch, weights=cfg.weights, head=cfg.head, dropout=cfg.dropout, trainable=cfg.trainable,
            bn_momentum=cfg.bn_momentum,
        )
        optimizer = make_optimizer(cfg.optimizer, lr_schedule(cfg, steps))
        if cfg.adversary:
            trainer = adversary.trainer(model, adversary.cell_labels(train_cells, y_train), optimizer,
                                        loss_name(cfg.loss))
        else:
            trainer = model
            model.compile(optimizer=optimizer, loss=loss_name(cfg.loss), metrics=["accuracy"])
        if history_path:
            history_path.unlink(missing_ok=True)

    aug = augmenter(cfg.seed) if cfg.augment and x_train.shape[-1] == 3 else None
    class_weight = None
    if cfg.class_weight and cfg.balance == "none":
        counts = np.bincount(y_train, minlength=2)
        class_weight = {i: len(y_train) / (2.0 * max(1, c)) for i, c in enumerate(counts)}
    tasks = val_tasks or {}
    if val_controlled is not None and val_controlled.any() and "odir" not in tasks:
        tasks = {**tasks, "odir": val_controlled}
    started = time.perf_counter() - sum(h["seconds"] for h in history)
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        if cfg.time_budget_minutes and history:
            per_epoch = (t0 - started) / len(history)
            if t0 - started + per_epoch > cfg.time_budget_minutes * 60:
                log(f"time budget of {cfg.time_budget_minutes:g} min reached after {len(history)} epochs: stopping")
                break
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)  # the same draws after a resume
        idx = epoch_indices(y_train, train_cells, cfg.balance, cfg.epoch_size, rng, train_looks, cfg.pair_share)
        if cfg.adversary:
            adversary.set_scale(trainer, cfg.adversary * adversary.ramp(epoch, cfg.epochs))
        ds = train_dataset(x_train[idx], y_train[idx], cfg, aug, seed=cfg.seed * 1000 + epoch,
                           cells=train_cells[idx] if cfg.adversary else None)
        h = trainer.fit(ds, epochs=1, verbose=1 if progress else 0, class_weight=class_weight)
        train_seconds = time.perf_counter() - t0
        calib = rng.choice(len(x_train), size=min(len(x_train), cfg.batch_size * cfg.recalibrate_batches),
                           replace=False)
        recalibrate_bn(model, _model_inputs(x_train, calib), cfg.batch_size, cfg.recalibrate_batches)
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
            "val_auc_odir": float("nan"),
        }
        if "source_accuracy" in h.history:  # the adversary's hit rate on the camera look (falls as it is erased)
            row["train_source_accuracy"] = float(h.history["source_accuracy"][-1])
        for name, mask in tasks.items():
            row[f"val_auc_{name}"] = classification_metrics(y_val[mask], p_val[mask])["auc"]
        controlled = [row[f"val_auc_{t}"] for t in controlled_tasks if f"val_auc_{t}" in row]
        row["val_auc_controlled"] = float(np.nanmean(controlled)) if controlled else float("nan")
        row.update(val_mean_prob=float(p_val.mean()), seconds=time.perf_counter() - t0,
                   images_per_second=len(idx) / train_seconds)
        history.append(row)
        if history_path:
            _append_csv(history_path, row)
        score = _score(cfg, row)
        improved = bool(np.isfinite(score) and score > best["score"])
        if improved:
            best = {"score": score, "weights": model.get_weights(), "epoch": epoch}
            stale = 0
            if ckpt or history_path:  # the best epoch so far, for inspection, a crash or a resume
                path = ckpt.best_path if ckpt else history_path.with_name("best.weights.h5")
                path.parent.mkdir(parents=True, exist_ok=True)
                model.save_weights(path)
        else:
            stale += 1
        if ckpt:
            ckpt.save(trainer, {"epoch": epoch, "best_score": float(best["score"]), "best_epoch": best["epoch"],
                              "stale": stale, "history": history, "restart": restart})
        per_task = " ".join(f"{k[8:]} {row[k]:.3f}" for k in row if k.startswith("val_auc_") and np.isfinite(row[k]))
        log(
            f"epoch {epoch}/{cfg.epochs} loss {row['loss']:.4f} acc {row['accuracy']:.3f} | val loss {val_loss:.4f} "
            f"auc {vm['auc']:.3f} ({per_task}) sens {vm['sensitivity']:.3f} spec {vm['specificity']:.3f} "
            f"| {row['seconds']:.0f}s {row['images_per_second']:.1f} img/s{' *' if improved else ''}"
        )
        if cfg.patience and stale >= cfg.patience:
            log(f"no improvement in {cfg.patience} epochs: stopping")
            break
    if best["weights"] is not None:
        model.set_weights(best["weights"])
    elif ckpt and ckpt.best_path.is_file() and best["epoch"] != (history[-1]["epoch"] if history else -1):
        model.load_weights(ckpt.best_path)  # resumed: the best epoch came before the stop
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
