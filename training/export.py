"""Export a trained model as the serving artifact (model.keras + model_card.json)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from aisight import LABELS
from aisight.artifact import MODEL_FILE, write_card
from aisight.ov_backend import remove_ir
from aisight.preprocess import INPUT_SHAPE
from training.models import last_conv_layer


def export_artifact(model, out_dir: str | Path, card: dict[str, Any]) -> Path:
    """Save ``model`` in float32 Keras format with a card completed by the fields the app needs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = {
        "name": card.get("name", "aisight"),
        "version": card.get("version", dt.date.today().isoformat()),
        "architecture": card.get("architecture", model.name),
        "labels": list(LABELS),
        "input_shape": list(INPUT_SHAPE),
        "input": "RGB uint8 0..255, resized to 128x128 by aisight.preprocess (preprocessing is inside the model)",
        "preprocessing": "resize",
        "threshold": 0.5,
        "gradcam_layer": last_conv_layer(model),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "params": int(model.count_params()),
        **card,
    }
    # An OpenVINO IR converted from an earlier model.keras here would be refused anyway (checksum); drop it.
    remove_ir(out)
    _without_optimizer(model).save(out / MODEL_FILE)
    write_card(out, full)
    return out


def _without_optimizer(model):
    """The model with its weights but no optimizer: Keras saves a compiled model's Adam moments too
    (3x the file: 239 MB instead of 84 MB for Xception), which serving never reads."""
    if getattr(model, "optimizer", None) is None:
        return model
    # From the config, not clone_model: clone_model copies the compiled state (and the optimizer) too.
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone
