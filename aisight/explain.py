"""Where the model looked: Grad-CAM heatmaps from the served model, and their overlay on the photo.

``gradcam`` weights the last convolutional block's feature maps by the gradient of the class score
(Selvaraju et al., 2017) for one 128x128 model input; ``overlay_png`` colours the heatmap and blends
it over the uploaded photo. The gradient function is built and traced once per (model, layer) and
cached, so only the first explanation pays for tracing; requests that ask for no explanation never
touch this module (import it lazily or at start-up, it imports TensorFlow only when first used).
"""

from __future__ import annotations

import io
import threading
import weakref
from typing import Any

import numpy as np
from PIL import Image

from aisight.preprocess import INPUT_SHAPE

# Model -> {layer name -> traced gradient function}; entries go when the model is garbage-collected.
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
# Probabilities are clipped here before the log, so a saturated softmax still has finite gradients.
_EPS = 1e-30


def target_layer(model, layer_name: str | None = None) -> str:
    """Return ``layer_name`` if the model has it, else its last layer with a 4-D (spatial) output.

    The same rule as ``training.models.last_conv_layer``, repeated here so serving does not import
    the training package. Pass the model card's ``gradcam_layer`` when there is one.
    """
    if layer_name:
        model.get_layer(layer_name)  # ValueError with Keras' message if it is not there
        return layer_name
    for layer in reversed(model.layers):
        output = getattr(layer, "output", None)
        if output is not None and len(output.shape) == 4:
            return layer.name
    raise ValueError("model has no spatial layer to explain")


def _grad_fn(model, layer_name: str):
    """Build (once) the traced function image batch -> (class-score Grad-CAM maps, probabilities)."""
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        fn = per_model.get(layer_name)
        if fn is not None:
            return fn
        import keras
        import tensorflow as tf

        grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])

        @tf.function(
            input_signature=[tf.TensorSpec((None, *INPUT_SHAPE), tf.float32), tf.TensorSpec((), tf.int32)],
            reduce_retracing=True,
        )
        def fn(x, class_index):
            with tf.GradientTape() as tape:
                features, probs = grad_model(x, training=False)
                tape.watch(features)
                # The class's logit relative to the mean logit (log p_c - mean log p): a softmax output
                # near 0 or 1 leaves the probability's own gradient vanishingly small, this one not.
                logp = tf.math.log(tf.clip_by_value(probs, _EPS, 1.0))
                score = tf.gather(logp, class_index, axis=1) - tf.reduce_mean(logp, axis=1)
            grads = tape.gradient(score, features)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per feature map
            cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
            return cam, probs

        per_model[layer_name] = fn
        return fn


def prepare(model, layer_name: str | None = None) -> str:
    """Build and trace the Grad-CAM function now (e.g. at start-up); return the layer it explains."""
    name = target_layer(model, layer_name)
    gradcam(model, np.zeros(INPUT_SHAPE, np.uint8), name)
    return name


def gradcam(model, image: np.ndarray, layer_name: str | None = None, class_index: int = 1) -> np.ndarray:
    """Return the Grad-CAM heatmap in [0, 1] at ``layer_name``'s spatial size for one model input.

    ``image`` is the (128, 128, 3) uint8 array the model classifies (``aisight.preprocess.resize``);
    ``class_index`` 1 explains "diseased", 0 "healthy". An all-zero map means no region raised the score.
    """
    image = np.asarray(image)
    if image.shape != INPUT_SHAPE:
        raise ValueError(f"expected one image of shape {INPUT_SHAPE}, got {image.shape}")
    import tensorflow as tf

    fn = _grad_fn(model, target_layer(model, layer_name))
    cam, _ = fn(tf.constant(image[None].astype(np.float32)), tf.constant(class_index, tf.int32))
    cam = cam.numpy()[0].astype(np.float32)
    top = float(cam.max())
    if not np.isfinite(top) or top <= 0.0:
        return np.zeros_like(cam)
    return cam / top


def upsample(
    heatmap: np.ndarray, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BILINEAR
) -> np.ndarray:
    """Resize a heatmap to ``size`` (width, height), bilinear unless told otherwise, staying in [0, 1]."""
    img = Image.fromarray(np.ascontiguousarray(heatmap, np.float32))  # mode "F"
    return np.clip(np.asarray(img.resize(size, resample), np.float32), 0.0, 1.0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a jet-like map (blue, cyan, yellow, red)."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    # Each channel is a tent around its centre (blue 0.25, green 0.5, red 0.75), clipped to [0, 1].
    centres = np.array([0.75, 0.5, 0.25], np.float32)
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _layer(heatmap: np.ndarray, size: tuple[int, int], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB uint8 colours, float32 opacity in [0, alpha]) of the heatmap upsampled to ``size``.

    Cold regions are more transparent than hot ones (opacity runs from 30% to 100% of ``alpha``
    with the heat) so the retina stays readable under the colour. The heat is upsampled before it is
    coloured (bicubic: a 4x4 map, Xception's, otherwise shows bilinear's diamonds); colours blended
    after colouring would pass through purple between blue and red instead of along the colour map.
    """
    levels = (upsample(heatmap, size, Image.Resampling.BICUBIC) * 255.0 + 0.5).astype(np.uint8)
    return _LUT[levels], (alpha * (0.3 + 0.7 * levels.astype(np.float32) / 255.0))[..., None]


_LUT = colormap(np.linspace(0.0, 1.0, 256))  # 256 heat levels -> RGB, so colouring is one lookup


def overlay_png(photo: Image.Image, heatmap: np.ndarray, alpha: float = 0.45, max_side: int = 768) -> bytes:
    """Blend the coloured heatmap over ``photo`` (downscaled to ``max_side``) and return PNG bytes.

    The model's input is the whole photo resized to 128x128 without keeping its aspect ratio, so the
    heatmap is stretched back over the whole photo.
    """
    img = photo.convert("RGB") if photo.mode != "RGB" else photo.copy()
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    colours, weight = _layer(heatmap, img.size, alpha)
    out = np.asarray(img, np.float32) * (1.0 - weight) + colours * weight
    return _png(Image.fromarray((out + 0.5).astype(np.uint8)))


def heatmap_png(heatmap: np.ndarray, size: tuple[int, int] | None = None, alpha: float = 0.45) -> bytes:
    """Return the coloured heatmap alone as an RGBA PNG, to lay over the displayed photo.

    By default at the heatmap's own resolution (16x16 for TinyNet: well under 1 kB), for the browser to
    stretch over the photo's box (CSS width/height 100%). The browser blends the colours, not the heat,
    so a coarse map looks washed out that way: ``size`` (width, height) upsamples it here first, which
    is what the result page does (``aisight.web.HEATMAP_LAYER_SIDE``).
    """
    size = size or (heatmap.shape[1], heatmap.shape[0])
    colours, weight = _layer(heatmap, size, alpha)
    rgba = np.concatenate([colours, (weight * 255.0 + 0.5).astype(np.uint8)], axis=-1)
    return _png(Image.fromarray(rgba))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Lowest compression: the PNG is made per request and sent once; speed matters more than bytes.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def peak(heatmap: np.ndarray, size: tuple[int, int] = INPUT_SHAPE[:2]) -> tuple[int, int]:
    """Return the (x, y) of the heatmap's maximum after upsampling to ``size`` (width, height)."""
    up = upsample(heatmap, size)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    return int(x), int(y)
