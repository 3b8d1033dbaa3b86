"""The registry of the paper's 17 bases and the model builder with the paper's head."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from training.models import ARCHS, build_model, get_arch, resolve_weights

METHOD = Path(__file__).resolve().parents[3] / "shared" / "docs" / "method.md"
PAPER_ORDER = (
    "Xception ResNet50 ResNet50V2 ResNet101 ResNet101V2 ResNet152 ResNet152V2 VGG16 VGG19 InceptionV3 "
    "InceptionResNetV2 MobileNet DenseNet121 DenseNet169 DenseNet201 NASNetLarge NASNetMobile"
).split()


def test_registry_holds_the_17_bases_in_the_papers_order():
    assert list(ARCHS) == PAPER_ORDER
    if METHOD.is_file():  # the spec, when the shared folder is beside the checkout
        listed = re.search(r"Stage 1 \(N=17\): (.*?) —", METHOD.read_text(), re.S).group(1)
        assert [a.strip() for a in listed.replace("\n", " ").split(",")] == PAPER_ORDER


def test_every_base_exists_in_keras_applications():
    import keras

    for arch in ARCHS.values():
        assert callable(getattr(keras.applications, arch.constructor))
        assert arch.preprocess in ("tf", "caffe", "torch")


def test_lookup_is_case_insensitive_and_unknown_names_list_the_choices():
    assert get_arch("xception").name == "Xception"
    assert get_arch("tinynet").name == "TinyNet"
    with pytest.raises(ValueError, match="unknown architecture 'AlexNet'.*Xception"):
        get_arch("AlexNet")


def test_weights_option(tmp_path, monkeypatch):
    assert resolve_weights("none") is None and resolve_weights("NONE") is None
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve_weights(str(tmp_path / "missing.h5"))
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"")
    assert resolve_weights(str(f)) == str(f)
    # ImageNet only from Keras' cache: an empty cache fails with a message, never a download.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(RuntimeError, match="not in Keras' cache.*--weights none"):
        build_model("MobileNet", weights="imagenet")


NO_BATCHNORM = ("VGG16", "VGG19")


def _check_paper_model(model, arch_name):
    import keras

    assert tuple(model.input.shape[1:]) == (128, 128, 3)
    assert tuple(model.output.shape[1:]) == (2,)
    names = [layer.name for layer in model.layers]
    assert names[1] == "preprocess"  # the family's preprocess_input, inside the model
    assert names[-3:] == ["flatten", "dropout", "prediction"]
    assert model.get_layer("dropout").rate == 0.5
    assert model.get_layer("prediction").activation.__name__ == "softmax"
    base = model.layers[2:-3]
    bns = [layer for layer in base if isinstance(layer, keras.layers.BatchNormalization)]
    # VGG has no batch normalisation at all: its base is wholly frozen under the paper's rule.
    assert bool(bns) == (arch_name not in NO_BATCHNORM), arch_name
    assert all(layer.trainable for layer in bns)
    assert not any(layer.trainable_weights for layer in base if not isinstance(layer, keras.layers.BatchNormalization))


def test_tiny_model_has_the_papers_head_and_only_bn_trainable_in_the_base():
    model = build_model("TinyNet")
    _check_paper_model(model, "TinyNet")
    out = model(np.zeros((2, 128, 128, 3), np.float32), training=False).numpy()
    assert np.allclose(out.sum(axis=1), 1.0)


def test_a_keras_base_is_frozen_except_batchnorm():
    _check_paper_model(build_model("MobileNet", weights="none"), "MobileNet")


def test_other_heads_and_trainable_all():
    model = build_model("TinyNet", head="gap", trainable="all", dropout=0.2, bn_momentum=0.9)
    assert model.get_layer("gap") and model.get_layer("dropout").rate == 0.2
    assert all(layer.trainable for layer in model.layers)
    with pytest.raises(ValueError, match="unknown head"):
        build_model("TinyNet", head="mlp")


@pytest.mark.slow
@pytest.mark.parametrize("arch", PAPER_ORDER)
def test_every_base_builds_at_128(arch):
    """All 17 bases take 128x128x3 raw RGB with the paper's head (minutes on a CPU: slow)."""
    _check_paper_model(build_model(arch, weights="none"), arch)


def test_export_leaves_the_optimizer_out(tmp_path):
    """A compiled, trained model is exported with its weights only: the same answers, no Adam moments."""
    import zipfile

    import keras

    from aisight.artifact import load_model
    from training.export import export_artifact

    model = build_model("TinyNet", weights="none")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(0).uniform(0, 255, (8, 128, 128, 3)).astype("float32")
    model.fit(x, keras.utils.to_categorical(np.arange(8) % 2, 2), epochs=1, verbose=0)
    export_artifact(model, tmp_path, {"name": "t", "architecture": "TinyNet"})
    with zipfile.ZipFile(tmp_path / "model.keras") as z:
        import h5py

        with z.open("model.weights.h5") as f, h5py.File(f) as h5:
            assert "optimizer" not in h5, "Adam's moments would triple the file"
    again = load_model(tmp_path)
    np.testing.assert_allclose(again(x, training=False), model(x, training=False), atol=1e-6)
