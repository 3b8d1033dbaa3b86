"""Training-time augmentation for the camera-invariant input (``fundus-v2``), in TensorFlow.

Training caches the field's crop and mask (``aisight.fundus.fundus_crop``) instead of the finished
input, so that every augmentation acts where a different camera would: on the photo, before the
normalisation. Camera traits (sharpness, JPEG quality, noise, exposure curve, framing) then vary
within every label, and the network cannot use them as a label. ``normalise`` repeats
``aisight.fundus.normalise`` with the same matrices (float32 rounding aside; a test holds them to
one grey level).
"""

from __future__ import annotations

import numpy as np

from aisight.fundus import EDGE_KEEP, SIDE, SIGMA, SPREADS, _blur_matrix


def stack_crop(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pack a crop (H, W, 3) and its mask (H, W) into one uint8 (H, W, 4) array for the cache."""
    return np.concatenate([crop, mask[..., None].astype(np.uint8) * 255], axis=-1)


def inputs_from_crops(stacked: np.ndarray) -> np.ndarray:
    """The model inputs (N, H, W, 3) of packed crops (N, H, W, 4), with ``aisight.fundus.normalise``."""
    from aisight.fundus import normalise

    out = np.empty((*stacked.shape[:3], 3), np.uint8)
    for i, a in enumerate(stacked):
        out[i] = normalise(a[..., :3], a[..., 3] > 127)
    return out


def _circle(side: int):
    import tensorflow as tf

    y, x = np.mgrid[0:side, 0:side]
    c = (side - 1) / 2.0
    inside = ((x - c) ** 2 + (y - c) ** 2 <= (EDGE_KEEP * side / 2.0) ** 2).astype(np.float32)
    return tf.constant(inside[None, :, :, None])


def normalise(crop, mask):
    """``aisight.fundus.normalise`` on a batch: crop float32 (B, H, W, 3) 0..255, mask (B, H, W, 1) 0/1.

    Returns float32 (B, H, W, 3) holding whole numbers 0..255, as the served uint8 input.
    """
    import tensorflow as tf

    side = int(crop.shape[1])
    g = tf.constant(_blur_matrix(side, SIGMA))

    def blur(a):
        return tf.einsum("ij,bjkc,lk->bilc", g, a, g)

    weight = blur(mask)
    local = blur(crop * mask) / tf.maximum(weight, 1e-3)
    detail = (crop - local) * mask
    count = tf.maximum(tf.reduce_sum(mask, axis=[1, 2], keepdims=True), 1.0)
    spread = tf.sqrt(tf.reduce_sum(detail**2, axis=[1, 2], keepdims=True) / count)
    scaled = detail / tf.maximum(spread, 0.5) * (127.5 / SPREADS) + 128.0
    scaled = tf.where(mask > 0.5, scaled, 128.0)
    return tf.round(tf.clip_by_value(scaled, 0.0, 255.0))


def photometric(crop, seed=None):
    """One crop (H, W, 3) uint8 as another camera might have taken it: exposure curve, colour balance,
    focus, noise and JPEG quality vary. Returns uint8."""
    import tensorflow as tf

    x = tf.cast(crop, tf.float32) / 255.0
    gamma = tf.exp(tf.random.uniform([1, 1, 3], -0.35, 0.35, seed=seed))  # per channel: colour curve
    gain = tf.exp(tf.random.uniform([1, 1, 3], -0.3, 0.3, seed=seed))
    x = tf.clip_by_value(tf.pow(tf.maximum(x, 1e-4), gamma) * gain, 0.0, 1.0)
    # Focus / resolution: a Gaussian blur of 0 to 1.2 px at 128 (half the photos stay sharp).
    sigma = tf.maximum(tf.random.uniform([], -1.2, 1.2, seed=seed), 0.0) + 1e-3
    r = tf.range(-3.0, 4.0)
    k = tf.exp(-0.5 * (r / sigma) ** 2)
    k = k / tf.reduce_sum(k)
    kx = tf.tile(tf.reshape(k, [1, 7, 1, 1]), [1, 1, 3, 1])
    ky = tf.tile(tf.reshape(k, [7, 1, 1, 1]), [1, 1, 3, 1])
    x = tf.nn.depthwise_conv2d(x[None], kx, [1, 1, 1, 1], "SAME")
    x = tf.nn.depthwise_conv2d(x, ky, [1, 1, 1, 1], "SAME")[0]
    x = x + tf.random.normal(tf.shape(x), stddev=tf.random.uniform([], 0.0, 0.015, seed=seed), seed=seed)
    x = tf.image.convert_image_dtype(tf.clip_by_value(x, 0.0, 1.0), tf.uint8, saturate=True)
    return tf.image.random_jpeg_quality(x, 50, 95, seed=seed)


def geometric(seed: int):
    """Flips, rotation and scale applied to crop and mask together (a Keras layer stack on 4 channels)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.5, fill_mode="constant", seed=seed),  # any angle
            keras.layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=seed),
        ],
        name="geometric",
    )


def fundus_dataset(stacked: np.ndarray, targets: np.ndarray, batch_size: int, seed: int, augment: bool = True,
                   sample_weight: np.ndarray | None = None):
    """tf.data of (model input, target[, weight]) from packed crops: augment, then normalise."""
    import tensorflow as tf

    side = stacked.shape[1]
    circle = _circle(side)
    geo = geometric(seed) if augment else None
    items = (stacked, targets) if sample_weight is None else (stacked, targets, sample_weight)
    ds = tf.data.Dataset.from_tensor_slices(items)

    def photo(a, *rest):
        crop = photometric(a[..., :3], seed=None) if augment else a[..., :3]
        return (tf.concat([tf.cast(crop, tf.float32), tf.cast(a[..., 3:], tf.float32) / 255.0], -1), *rest)

    def finish(a, *rest):
        if geo is not None:
            a = geo(a, training=True)
        mask = tf.cast(a[..., 3:] > 0.5, tf.float32) * circle
        return (normalise(a[..., :3], mask), *rest)

    ds = ds.map(photo, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


__all__ = ["SIDE", "fundus_dataset", "geometric", "inputs_from_crops", "normalise", "photometric", "stack_crop"]
