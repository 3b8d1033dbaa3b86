"""The model artifact: a Keras file plus a JSON model card, in one folder the app can load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
# The bundled model (models/<version>/); model/ holds 1.0.0, kept to compare against (model/README.md).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "2.0.0"

# Keys the app relies on; everything else in the card is shown as-is.
REQUIRED_CARD_KEYS = ("name", "version", "architecture", "threshold", "labels", "input_shape")


class ArtifactError(RuntimeError):
    """The model folder is missing, incomplete or unreadable."""


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """Read and check the model card in ``model_dir``."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"model card not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model card unreadable: {path}: {exc}") from None
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ArtifactError(f"model card {path} lacks {', '.join(missing)}")
    threshold = card["threshold"]
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ArtifactError(f"model card {path}: threshold must be a number in [0, 1], got {threshold!r}")
    if list(card["labels"]) != ["healthy", "diseased"]:
        raise ArtifactError(f"model card {path}: labels must be ['healthy', 'diseased']")
    from aisight.preprocess import PREPROCESSING

    if card.get("preprocessing", "resize") not in PREPROCESSING:
        raise ArtifactError(f"model card {path}: unknown preprocessing {card['preprocessing']!r} "
                            f"(this app knows {', '.join(PREPROCESSING)})")
    return card


def write_card(model_dir: str | Path, card: dict[str, Any]) -> Path:
    """Write ``card`` as the model card of ``model_dir`` (checked the same way it is read)."""
    path = Path(model_dir) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    read_card(model_dir)
    return path


def load_model(model_dir: str | Path):
    """Load the Keras model of ``model_dir`` for inference (no optimizer state needed)."""
    import keras

    import aisight.layers  # noqa: F401  registers FamilyPreprocess for deserialization

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"model file not found: {path}")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged zip/h5; all mean the same here
        raise ArtifactError(f"model file unreadable: {path}: {exc}") from exc


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The short form of the card returned in API answers."""
    training = card.get("training", {})
    return {
        "name": card["name"],
        "version": card["version"],
        "architecture": card["architecture"],
        "trained_on": training.get("data_summary", training.get("data", "unknown")),
    }
