"""Serializable layers that live inside saved models, so a model file takes raw RGB in 0..255."""

from __future__ import annotations

import keras
from keras import ops

# keras.applications' preprocess_input modes, written as plain arithmetic so no Lambda is saved.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("tf", "caffe", "torch", "none")


@keras.saving.register_keras_serializable(package="aisight")
class FamilyPreprocess(keras.layers.Layer):
    """Apply a keras.applications family's ``preprocess_input`` to raw RGB 0..255 input."""

    def __init__(self, mode: str = "tf", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, "float32")
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, "float32")
            std = ops.convert_to_tensor(_TORCH_STD, "float32")
            return (x / 255.0 - mean) / std
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
