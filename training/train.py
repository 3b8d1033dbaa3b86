"""Train one configuration: fit, check in inference mode every epoch, pick a threshold, export."""

from __future__ import annotations

import numpy as np


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
