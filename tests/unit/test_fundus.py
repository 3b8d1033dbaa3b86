"""The camera-invariant input (fundus-v2): field crop, normalisation, invariance, train/serve parity."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aisight.fundus import crop_relative, find_field, fundus_crop, fundus_input, normalise
from aisight.preprocess import PREPROCESSING, preprocess_bytes, resize
from training.synthetic import make_fundus


def photo(seed: int = 0, size: int = 300, diseased: bool = False) -> Image.Image:
    return make_fundus(np.random.default_rng(seed), diseased, size=size)


def on_canvas(img: Image.Image, canvas: tuple[int, int], at: tuple[int, int], fill=(0, 0, 0)) -> Image.Image:
    out = Image.new("RGB", canvas, fill)
    out.paste(img, at)
    return out


def test_input_shape_and_grey_outside_the_field():
    x, _ = fundus_input(photo())
    assert x.shape == (128, 128, 3) and x.dtype == np.uint8
    assert np.all(x[:6, :6] == 128) and np.all(x[-6:, -6:] == 128)  # corners: outside the field
    assert x[40:90, 40:90].std() > 5  # inside: detail


def test_field_is_found_wherever_it_lies():
    img = photo(size=300)
    field = find_field(on_canvas(img, (900, 600), (450, 200)))
    # The synthetic field is a circle of radius 0.44-0.48 x 300 centred in its 300 px square.
    assert abs(field.left + field.side / 2 - 600) < 6 and abs(field.top + field.side / 2 - 350) < 6
    assert 255 < field.side < 295


def test_white_surround_is_a_surround_too():
    img = photo(size=300)
    white = np.asarray(img).copy()
    white[np.asarray(img).max(axis=2) < 5] = 255
    field = find_field(on_canvas(Image.fromarray(white), (500, 500), (100, 100), fill=(255, 255, 255)))
    assert abs(field.left + field.side / 2 - 250) < 6 and 255 < field.side < 295


def test_a_circle_cut_at_top_and_bottom_keeps_its_scale():
    img = photo(size=400)
    cut = img.crop((0, 60, 400, 340))  # as many cameras frame the field
    full, _ = fundus_input(img)
    trimmed, field = fundus_input(cut)
    assert field.side == pytest.approx(find_field(img).side, abs=4)
    inner = np.s_[40:88, 20:108]  # the band both photos show
    assert np.abs(full[inner].astype(int) - trimmed[inner]).mean() < 6


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a * 0.6,  # darker exposure
        lambda a: a * 1.15 + 8,  # brighter (the optic disc starts to clip)
        lambda a: a * np.array([0.8, 1.1, 1.3]),  # another white balance
        lambda a: a + np.array([15.0, -10.0, 5.0]),  # a colour cast
    ],
)
def test_normalised_input_barely_changes_under_brightness_and_colour_shifts(change):
    img = photo(seed=3, diseased=True)
    a = np.asarray(img, np.float64)
    field = a.max(axis=2) > 8
    shifted = np.where(field[..., None], np.clip(change(a), 0, 255), 0).astype(np.uint8)
    before, after = fundus_input(img)[0], fundus_input(Image.fromarray(shifted))[0]
    # The plain resize moves by tens of grey levels; the normalised input by a few at most (where
    # pixels clip, the photo itself lost detail).
    plain = np.abs(resize(img).astype(int) - resize(Image.fromarray(shifted))).mean()
    moved = np.abs(before.astype(int) - after).mean()
    assert plain > 5 and moved < min(3.0, plain / 5), (plain, moved)


def test_normalise_is_flat_without_a_field():
    crop = np.zeros((128, 128, 3), np.uint8)
    assert np.all(normalise(crop, np.zeros((128, 128), bool)) == 128)


def test_crop_relative_matches_the_model_crop():
    img = on_canvas(photo(size=300), (800, 500), (400, 150))
    _, field = fundus_input(img)
    shown = crop_relative(img, field.relative(*img.size))
    assert abs(shown.width - field.side) <= 2 and abs(shown.height - field.side) <= 2


def test_preprocess_names_and_bytes_path():
    assert set(PREPROCESSING) == {"resize", "fundus-v2"}
    buf = io.BytesIO()
    photo().save(buf, format="JPEG", quality=92)
    data = buf.getvalue()
    from aisight.preprocess import open_image

    assert np.array_equal(preprocess_bytes(data, preprocessing="fundus-v2"), fundus_input(open_image(data))[0])
    assert np.array_equal(preprocess_bytes(data), resize(open_image(data)))
    with pytest.raises(ValueError, match="unknown preprocessing"):
        preprocess_bytes(data, preprocessing="sharpen")


def test_training_normalisation_matches_serving():
    """training.augment normalises cached crops in TensorFlow; it must give the served input (within 1)."""
    import tensorflow as tf

    from training.augment import inputs_from_crops, stack_crop
    from training.augment import normalise as tf_normalise

    crops = [fundus_crop(photo(seed=s, diseased=s % 2 == 1)) for s in range(4)]
    stacked = np.stack([stack_crop(c, m) for c, m, _ in crops])
    served = np.stack([fundus_input(photo(seed=s, diseased=s % 2 == 1))[0] for s in range(4)])
    assert np.array_equal(inputs_from_crops(stacked), served)
    out = tf_normalise(tf.constant(stacked[..., :3], tf.float32), tf.constant(stacked[..., 3:] / 255.0, tf.float32))
    assert np.abs(out.numpy() - served).max() <= 1.0


def test_augmented_batches_are_valid_inputs():
    from training.augment import fundus_dataset, stack_crop

    stacked = np.stack([stack_crop(*fundus_crop(photo(seed=s))[:2]) for s in range(6)])
    x, y = next(iter(fundus_dataset(stacked, np.eye(2)[[0, 1, 0, 1, 0, 1]], 6, seed=0)))
    x = x.numpy()
    assert x.shape == (6, 128, 128, 3) and x.min() >= 0 and x.max() <= 255
    assert np.all(x == np.round(x)) and y.shape == (6, 2)
