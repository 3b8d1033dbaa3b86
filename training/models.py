"""The 17 candidate base networks of the paper and the model builder with the paper's head."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aisight.preprocess import INPUT_SHAPE


@dataclass(frozen=True)
class Arch:
    """A keras.applications base: constructor name and its preprocess_input mode."""

    name: str
    constructor: str
    preprocess: str  # FamilyPreprocess mode: tf, caffe or torch


# Stage 1 of the paper, in its order (method.md §Stages).
ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("Xception", "Xception", "tf"),
        Arch("ResNet50", "ResNet50", "caffe"),
        Arch("ResNet50V2", "ResNet50V2", "tf"),
        Arch("ResNet101", "ResNet101", "caffe"),
        Arch("ResNet101V2", "ResNet101V2", "tf"),
        Arch("ResNet152", "ResNet152", "caffe"),
        Arch("ResNet152V2", "ResNet152V2", "tf"),
        Arch("VGG16", "VGG16", "caffe"),
        Arch("VGG19", "VGG19", "caffe"),
        Arch("InceptionV3", "InceptionV3", "tf"),
        Arch("InceptionResNetV2", "InceptionResNetV2", "tf"),
        Arch("MobileNet", "MobileNet", "tf"),
        Arch("DenseNet121", "DenseNet121", "torch"),
        Arch("DenseNet169", "DenseNet169", "torch"),
        Arch("DenseNet201", "DenseNet201", "torch"),
        Arch("NASNetLarge", "NASNetLarge", "tf"),
        Arch("NASNetMobile", "NASNetMobile", "tf"),
    )
}
# Not paper candidates: a few-layer CNN for fast tests and the generated-image demo model, and small
# networks for comparing training methods cheaply before the one long Xception run (training.proxy).
TINY = Arch("TinyNet", "TinyNet", "tf")
PROXY = Arch("ProxyNet", "ProxyNet", "tf")
MOBILENET_V2 = Arch("MobileNetV2", "MobileNetV2", "tf")
EXTRA = {a.name: a for a in (TINY, PROXY, MOBILENET_V2)}
HEADS = ("flatten", "gap")
TRAINABLE = ("bn", "all")


def get_arch(name: str) -> Arch:
    """Look an architecture up by name, case-insensitively."""
    for key, arch in {**ARCHS, **EXTRA}.items():
        if key.lower() == name.lower():
            return arch
    raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)} (or {', '.join(EXTRA)})")


def resolve_weights(weights: str) -> str | None:
    """Turn ``--weights`` into what keras.applications takes, refusing to download anything.

    ``none`` is random init; ``imagenet`` works only if Keras' cache already holds the file (there is
    no network at training time); any other value is a path to a weights file.
    """
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return str(path)


def imagenet_cached(arch: Arch) -> bool:
    """Whether Keras' cache holds notop ImageNet weights for ``arch`` (a name-based check)."""
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    stem = arch.name.lower().replace("v2", "_v2")
    return cache.is_dir() and any(stem in p.name.lower() and "notop" in p.name for p in cache.iterdir())


def build_model(
    arch: str,
    *,
    weights: str = "none",
    head: str = "flatten",
    dropout: float = 0.5,
    trainable: str = "bn",
    bn_momentum: float | None = None,
):
    """Build base + head on a 128x128x3 raw-RGB input, with the family's preprocessing inside.

    The paper's defaults: Flatten -> Dropout(0.5) -> Dense(2, softmax), base frozen except its
    BatchNormalization layers. ``trainable='all'`` unfreezes the base (sensible without pretrained
    weights, which have nothing to protect); ``bn_momentum`` lowers BatchNormalization's momentum so
    its inference statistics keep up with a short training run.
    """
    import keras

    from aisight.layers import FamilyPreprocess

    spec = get_arch(arch)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable {trainable!r}; choose from {TRAINABLE}")
    w = resolve_weights(weights)
    if w == "imagenet" and not imagenet_cached(spec):
        raise RuntimeError(
            f"ImageNet weights for {spec.name} are not in Keras' cache "
            f"({os.environ.get('KERAS_HOME', '~/.keras')}/models) and there is no network here: "
            "pass --weights none or --weights PATH"
        )
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = FamilyPreprocess(spec.preprocess, name="preprocess")(inputs)
    if spec is TINY:
        base = _tiny_base(x)
    elif spec is PROXY:
        base = _proxy_base(x)
    else:
        constructor = getattr(keras.applications, spec.constructor)
        # input_tensor keeps the base's layers in this model's graph (flat), which Grad-CAM relies on.
        base = constructor(include_top=False, weights=w, input_tensor=x)
    for layer in base.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable == "all" or is_bn
        if is_bn and bn_momentum is not None:
            layer.momentum = bn_momentum
    y = base.output
    if head == "flatten":
        y = keras.layers.Flatten(name="flatten")(y)
    else:
        y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    y = keras.layers.Dropout(dropout, name="dropout")(y)
    outputs = keras.layers.Dense(2, activation="softmax", name="prediction")(y)
    return keras.Model(inputs, outputs, name=f"aisight_{spec.name.lower()}")


def _tiny_base(x):
    """Three conv-BN-ReLU blocks: small enough to train in seconds on a CPU."""
    from types import SimpleNamespace

    import keras

    layers = []
    for i, filters in enumerate((16, 32, 64)):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"tiny_conv{i}"),
            keras.layers.BatchNormalization(name=f"tiny_bn{i}"),
            keras.layers.Activation("relu", name=f"tiny_relu{i}"),
        ]
    for layer in layers:
        x = layer(x)
    return SimpleNamespace(layers=layers, output=x)


def _proxy_base(x):
    """A VGG-style network with BatchNormalization (about 0.08 GMAC at 128 px): a strided 3x3 convolution
    to 64x64 as Xception's stem does, then two 3x3 convolutions per scale and max pooling (which keeps a
    small lesion's response), global average pooling. Trains about 4x faster than Xception on a CPU."""
    from types import SimpleNamespace

    import keras

    layers = [
        keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="proxy_stem"),
        keras.layers.BatchNormalization(name="proxy_stem_bn"),
        keras.layers.Activation("relu", name="proxy_stem_relu"),
    ]
    for i, filters in enumerate((16, 32, 64, 128)):
        for j in range(2):
            layers += [
                keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"proxy_conv{i}{j}"),
                keras.layers.BatchNormalization(name=f"proxy_bn{i}{j}"),
                keras.layers.Activation("relu", name=f"proxy_relu{i}{j}"),
            ]
        if i < 3:
            layers.append(keras.layers.MaxPooling2D(2, name=f"proxy_pool{i}"))
    for layer in layers:
        x = layer(x)
    return SimpleNamespace(layers=layers, output=x)


def last_conv_layer(model) -> str:
    """Name of the last layer with a 4-D (spatial) output: the target of Grad-CAM."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError("model has no spatial layer")
