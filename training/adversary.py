"""A domain-adversarial head (DANN, Ganin et al. 2016), conditioned on the label.

Beside the classifier, a small head tries to tell from the pooled features which camera look (cell:
folder x source) a training photo came from, *among the photos of its own label*. A gradient-reversal
layer between the features and that head turns its gradient around, so the network learns features
from which the camera cannot be told within a label: the shortcut (ODIR's healthy eyes against other
collections' diseased ones) stops paying. Conditioning on the label matters because sources and labels
are entangled: an unconditional adversary would also erase the disease wherever a collection holds one
label only. A label with a single cell gives the head nothing to learn.

Training uses a *trainer* (the classifier's input -> [class probabilities | cell logits]); the classifier
inside it shares its layers and is what is evaluated and saved, without the head. ``cfg.adversary`` is
the reversal's weight (0: off); it ramps in over the run as in the DANN paper.
"""

from __future__ import annotations

import math

import numpy as np

SUFFIX = "_dann"


def ramp(epoch: int, epochs: int) -> float:
    """DANN's schedule 2 / (1 + exp(-10 p)) - 1 at training progress p = epoch / epochs (0 -> 1)."""
    p = min(1.0, max(0.0, epoch / max(1, epochs)))
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def cell_labels(cells: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label of every cell number (cells are per (folder, source, label), so each has one)."""
    cells, labels = np.asarray(cells, np.int64), np.asarray(labels, np.int64)
    out = np.full(int(cells.max()) + 1, -1, np.int64)
    out[cells] = labels
    if (out < 0).any():
        raise ValueError("cell numbers must be 0..n-1, each with training photos")
    for c in np.unique(cells):
        if len(np.unique(labels[cells == c])) != 1:
            raise ValueError(f"cell {c} holds photos of both labels")
    return out


def register():
    """Define (once) the Keras objects a saved trainer needs: the reversal layer, the loss, the metrics."""
    global _OBJECTS
    if _OBJECTS is not None:
        return _OBJECTS
    import keras
    import tensorflow as tf

    keep = keras.saving.register_keras_serializable("aisight")

    @tf.custom_gradient
    def _reverse(x, scale):
        def grad(dy):
            return -scale * dy, tf.zeros_like(scale)

        return tf.identity(x), grad

    @keep
    class GradientReversal(keras.layers.Layer):
        """Identity forward; multiplies the gradient by -scale backward (scale set per epoch)."""

        def build(self, input_shape):
            self.scale = self.add_weight(shape=(), initializer="zeros", trainable=False, name="scale")

        def call(self, x):
            return _reverse(x, tf.cast(tf.convert_to_tensor(self.scale), x.dtype))

    @keep
    class ConditionalSourceLoss(keras.losses.Loss):
        """The classifier's loss on columns 0-1, plus the cell cross-entropy among the cells of each
        photo's own label on the rest. Targets: [one-hot label (2), cell number]."""

        def __init__(self, cell_labels, primary="mean_squared_error", name="dann_loss", **kwargs):
            super().__init__(name=name, **kwargs)
            self.cell_labels = [int(c) for c in cell_labels]
            self.primary = primary

        def call(self, y_true, y_pred):
            own = keras.losses.get(self.primary)(y_true[:, :2], y_pred[:, :2])
            cell = keras.ops.cast(y_true[:, 2], "int32")
            logits = _own_label_logits(y_true, y_pred, self.cell_labels)
            return own + keras.losses.sparse_categorical_crossentropy(cell, logits, from_logits=True)

        def get_config(self):
            return {**super().get_config(), "cell_labels": self.cell_labels, "primary": self.primary}

    @keep
    def accuracy(y_true, y_pred):
        """The classifier's accuracy (columns 0-1)."""
        ops = keras.ops
        return ops.cast(ops.equal(ops.argmax(y_true[:, :2], -1), ops.argmax(y_pred[:, :2], -1)), "float32")

    @keep
    class SourceAccuracy(keras.metrics.MeanMetricWrapper):
        """How often the head names the photo's cell among those of its label: falls as the features
        stop showing the camera (1.0 for a label with one cell)."""

        def __init__(self, cell_labels, name="source_accuracy", dtype=None):
            table = [int(c) for c in cell_labels]

            def hits(y_true, y_pred):
                named = keras.ops.argmax(_own_label_logits(y_true, y_pred, table), -1)
                return keras.ops.cast(keras.ops.equal(keras.ops.cast(y_true[:, 2], named.dtype), named), "float32")

            super().__init__(hits, name=name, dtype=dtype)
            self.cell_labels = table

        def get_config(self):
            return {"cell_labels": self.cell_labels, "name": self.name, "dtype": self.dtype}

    def _own_label_logits(y_true, y_pred, cell_labels):
        """The head's cell logits, with the cells of the other label pushed out of reach."""
        ops = keras.ops
        label = ops.cast(ops.argmax(y_true[:, :2], axis=-1), "int32")
        same = ops.equal(ops.convert_to_tensor(cell_labels, "int32")[None, :], label[:, None])
        return ops.where(same, y_pred[:, 2:], -1e9)

    _OBJECTS = {"GradientReversal": GradientReversal, "ConditionalSourceLoss": ConditionalSourceLoss,
                "accuracy": accuracy, "SourceAccuracy": SourceAccuracy}
    return _OBJECTS


_OBJECTS: dict | None = None


def trainer(model, labels_of_cells: np.ndarray, optimizer, primary_loss: str, hidden: int = 64,
            feature: str | None = None):
    """The compiled trainer around ``model``, a classifier whose last layer is ``prediction``; the head
    reads layer ``feature`` (default: the pooled features, ``gap`` or ``flatten``)."""
    import keras

    objs = register()
    if feature is None:
        feature = "gap" if "gap" in {layer.name for layer in model.layers} else "flatten"
    feature = model.get_layer(feature).output
    z = objs["GradientReversal"](name="dann_reverse")(feature)
    z = keras.layers.Dense(hidden, activation="relu", dtype="float32", name="dann_hidden")(z)
    logits = keras.layers.Dense(len(labels_of_cells), dtype="float32", name="dann_cells")(z)
    out = keras.layers.Concatenate(name="dann_out", dtype="float32")([model.output, logits])
    t = keras.Model(model.inputs, out, name=model.name + SUFFIX)
    t.compile(optimizer=optimizer, loss=objs["ConditionalSourceLoss"](labels_of_cells, primary_loss),
              metrics=[objs["accuracy"], objs["SourceAccuracy"](labels_of_cells)])
    return t


def classifier(trainer_model):
    """The classifier inside a (loaded) trainer: same layers, without the head."""
    import keras

    return keras.Model(trainer_model.inputs, trainer_model.get_layer("prediction").output,
                       name=trainer_model.name.removesuffix(SUFFIX))


def set_scale(trainer_model, scale: float) -> None:
    """Set the reversal's weight (call before each epoch)."""
    trainer_model.get_layer("dann_reverse").scale.assign(float(scale))


def targets(onehot: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Trainer targets: the one-hot label and the cell number, as one float array."""
    return np.concatenate([onehot.astype(np.float32), np.asarray(cells, np.float32)[:, None]], axis=1)

