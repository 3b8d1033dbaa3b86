"""Grad-CAM: the heatmap points at the evidence, stays in [0, 1], is cached, and overlays as a PNG."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from aisight import explain
from aisight.artifact import load_model, read_card
from aisight.preprocess import INPUT_SHAPE
from training.synthetic import make_fundus

SIZE = INPUT_SHAPE[0]
LESION_RADIUS = 0.04 * SIZE  # 5 px on the 128 px model input
# A hit: the upsampled heatmap's peak within the lesion plus one feature-map cell (8 px for TinyNet).
HIT_DISTANCE = LESION_RADIUS + 10
LESION_RGB = (255, 230, 40)  # bright yellow, unlike the pinkish-white optic disc


def lesion_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Return (healthy, diseased, lesion centre in px): one generated photo, without and with a lesion.

    The healthy copy carries a decoy at another place: a flat patch of the local background colour,
    the lesion's shape without its colour. Without it a model can find the lesion as "texture missing
    here", negative evidence that Grad-CAM (positive evidence only) cannot show; with it, only the
    bright colour tells the classes apart. The two copies share the photo, so nothing else differs.
    """
    base = make_fundus(rng, diseased=False, size=SIZE)
    out = []
    centre = (0.0, 0.0)
    for diseased in (False, True):
        fx, fy = rng.uniform(0.28, 0.72, 2) * SIZE
        img = base.copy()
        fill = LESION_RGB if diseased else base.getpixel((int(fx), int(fy)))
        r = LESION_RADIUS
        ImageDraw.Draw(img).ellipse((fx - r, fy - r, fx + r, fy + r), fill=fill)
        out.append(np.asarray(img.filter(ImageFilter.GaussianBlur(0.6))))
        if diseased:
            centre = (float(fx), float(fy))
    return out[0], out[1], centre


def lesion_set(n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys, centres = [], [], []
    for _ in range(n_pairs):
        healthy, diseased, centre = lesion_pair(rng)
        xs += [healthy, diseased]
        ys += [0, 1]
        centres += [(np.nan, np.nan), centre]
    return np.stack(xs), np.array(ys), np.array(centres)


@pytest.fixture(scope="module")
def lesion_model():
    """TinyNet trained (from scratch, ~20 s on 2 cores) to flag photos with one bright lesion."""
    import keras

    from training.models import build_model
    from training.train import recalibrate_bn

    keras.utils.set_random_seed(1)
    x, y, _ = lesion_set(120, seed=1)
    # No dropout: it spreads the decision over redundant, diffuse feature maps and blurs the heatmap.
    model = build_model("TinyNet", weights="none", head="gap", trainable="all", bn_momentum=0.9, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="categorical_crossentropy")
    model.fit(x.astype("float32"), keras.utils.to_categorical(y, 2), batch_size=16, epochs=12, verbose=0)
    recalibrate_bn(model, x)  # otherwise BatchNormalization's inference statistics lag the weights
    return model


def test_heatmap_peak_lies_on_the_lesion(lesion_model):
    x, y, centres = lesion_set(20, seed=99)  # held out: new photos, new lesion places
    probs = lesion_model(x.astype("float32"), training=False).numpy()[:, 1]
    assert np.mean((probs >= 0.5) == y) >= 0.9, "the model did not learn the task; the heatmap test means nothing"
    diseased = np.flatnonzero(y == 1)
    peaks = np.array([explain.peak(explain.gradcam(lesion_model, x[i])) for i in diseased], float)
    dist = np.hypot(*(peaks - centres[diseased]).T)
    hits = float(np.mean(dist <= HIT_DISTANCE))
    assert hits >= 0.8, f"peak on the lesion in {hits:.0%} of photos; distances {np.round(dist).astype(int)}"
    # Control: measured against other photos' lesions the same peaks are far off (a hit is not luck:
    # lesions lie in a 56 px square, so a random point lands within 15 px of one about 20% of the time).
    shuffled = np.hypot(*(peaks - np.roll(centres[diseased], 1, axis=0)).T)
    assert np.median(shuffled) > 2 * np.median(dist)


def test_heatmap_shape_range_and_layer(lesion_model):
    _, diseased, _ = lesion_pair(np.random.default_rng(5))
    h = explain.gradcam(lesion_model, diseased, "tiny_relu2", class_index=1)
    assert h.shape == (16, 16) and h.dtype == np.float32
    assert 0.0 <= float(h.min()) and float(h.max()) == pytest.approx(1.0)
    assert explain.target_layer(lesion_model) == "tiny_relu2"  # the last spatial layer by default
    np.testing.assert_allclose(explain.gradcam(lesion_model, diseased), h)
    healthy_map = explain.gradcam(lesion_model, diseased, class_index=0)
    assert healthy_map.shape == h.shape and float(healthy_map.max()) <= 1.0


def test_bad_arguments_are_refused(lesion_model):
    with pytest.raises(ValueError):
        explain.gradcam(lesion_model, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError):
        explain.gradcam(lesion_model, np.zeros(INPUT_SHAPE, np.uint8), layer_name="no_such_layer")


def test_the_gradient_function_is_built_once_and_fast(lesion_model):
    layer = explain.prepare(lesion_model)
    fn = explain._CACHE[lesion_model][layer]
    image = np.zeros(INPUT_SHAPE, np.uint8)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        explain.gradcam(lesion_model, image)
        times.append(time.perf_counter() - t)
    assert explain._CACHE[lesion_model][layer] is fn
    assert float(np.median(times)) < 0.25  # a few ms on an idle CPU; room for a shared one


def test_served_model_explains_with_its_cards_layer(model_dir):
    model, card = load_model(model_dir), read_card(model_dir)
    image = np.asarray(make_fundus(np.random.default_rng(0), diseased=True, size=SIZE))
    h = explain.gradcam(model, image, card.get("gradcam_layer"))
    assert h.ndim == 2 and np.all((h >= 0) & (h <= 1))


@pytest.mark.parametrize(("size", "expected"), [((1000, 600), (768, 461)), ((400, 265), (400, 265))])
def test_overlay_png_matches_the_displayed_photo(size, expected):
    photo = make_fundus(np.random.default_rng(1), diseased=True, size=max(size)).resize(size)
    heat = np.zeros((16, 16), np.float32)
    heat[4, 10] = 1.0
    png = explain.overlay_png(photo, heat)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.size == expected and out.mode == "RGB"
    # The hot cell is red-dominant where it lands on the photo; a cold corner keeps the photo's look.
    arr = np.asarray(out, np.int32)
    hx, hy = int((10.5 / 16) * expected[0]), int((4.5 / 16) * expected[1])
    assert arr[hy, hx, 0] > arr[hy, hx, 2]
    assert photo.size == size  # the caller's photo is left as it was


def test_overlay_of_an_empty_heatmap_is_a_valid_png():
    photo = Image.new("RGB", (300, 200), (120, 60, 30))
    out = Image.open(io.BytesIO(explain.overlay_png(photo, np.zeros((4, 4), np.float32), max_side=150)))
    assert out.size == (150, 100)


def test_heatmap_layer_png_is_small_and_transparent_where_cold():
    heat = np.zeros((16, 16), np.float32)
    heat[8, 8] = 1.0
    png = explain.heatmap_png(heat)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.mode == "RGBA" and out.size == (16, 16)
    assert len(png) < 2048
    a = np.asarray(out)
    assert a[8, 8, 3] == round(0.45 * 255) and a[0, 0, 3] == round(0.45 * 0.3 * 255)
    assert a[8, 8, 0] > a[8, 8, 2] and a[0, 0, 2] > a[0, 0, 0]  # hot red, cold blue
    assert Image.open(io.BytesIO(explain.heatmap_png(heat, (100, 60)))).size == (100, 60)


def test_colormap_runs_blue_to_red():
    c = explain.colormap(np.array([0.0, 0.5, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert c[0, 2] > c[0, 0]  # cold: blue
    assert c[1, 1] == 255  # middle: green at its peak
    assert c[2, 0] > c[2, 2]  # hot: red
