"""One training configuration (every field a command-line option, recorded in the model card), and the
optimizers and losses it names."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


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
    # How a photo becomes the model input (aisight.preprocess.PREPROCESSING); the card records it.
    preprocessing: str = "resize"
    # Each epoch draws epoch_size training images (0: as many as there are) balanced by: none (every
    # image once, shuffled), label, cell (source x label: no source can stand in for a label), or pairs
    # (most of each label from the looks that hold both labels, label-balanced within each: training.sampling).
    balance: str = "none"
    pair_share: float = 0.75  # balance pairs: the share of each label drawn from the looks holding both
    epoch_size: int = 0
    seed: int = 0
    target_sensitivity: float = 0.94
    # Epoch kept: best val_auc, val_auc_odir, val_auc_controlled (mean AUC of the source-controlled tasks),
    # val_auc_<task> (training.tasks), lowest val_loss, or the last (the paper's).
    select_metric: str = "val_auc"
    patience: int = 0  # stop after this many epochs without improvement (0: never)
    time_budget_minutes: float = 0.0  # stop before an epoch that would overrun this wall time (0: none)
    # A resumed run whose schedule has run out can go on: hold this learning rate for one epoch, then
    # cosine-decay it to 0 by the (larger) epochs. 0: continue the saved schedule unchanged.
    restart_lr: float = 0.0
    # Weight of a domain-adversarial head that tries to name each training photo's camera look among the
    # photos of its label, behind a gradient reversal (training.adversary; needs balance cell's cells). 0: off.
    adversary: float = 0.0
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
