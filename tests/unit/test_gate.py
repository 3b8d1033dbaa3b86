"""The fundus gate: refuses non-fundus and ungradable images, accepts fundus photos, fast and JSON-safe."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from aisight import gate
from aisight.gate import GateVerdict, check_fundus, gate_enabled, measure
from aisight.preprocess import open_image
from bench.gate_thresholds import degrade, generated_negatives, skimage_images, skimage_retina
from training.synthetic import make_fundus

# Natural photos and documents: these must be refused as not a fundus photo, not for another reason.
NOT_FUNDUS_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "coins", "page", "text", "moon")


@pytest.fixture(scope="module")
def skimage_negatives() -> dict[str, Image.Image]:
    pytest.importorskip("skimage", reason="scikit-image (a dev dependency) provides the negative photos")
    images = skimage_images()
    assert len(images) >= 20, f"too few scikit-image samples load offline: {sorted(images)}"
    return images


def test_no_scikit_image_negative_is_accepted(skimage_negatives):
    accepted = {name: v.measures for name, img in skimage_negatives.items() if (v := check_fundus(img)).ok}
    assert accepted == {}


@pytest.mark.parametrize("name", NOT_FUNDUS_PHOTOS)
def test_photos_and_documents_are_refused_as_not_fundus(skimage_negatives, name):
    v = check_fundus(skimage_negatives[f"skimage.{name}"])
    assert (v.ok, v.code) == (False, "not_fundus"), v.measures
    assert "fundus" in v.message and "fundus camera" in v.hint


def test_no_generated_negative_is_accepted():
    verdicts = {name: check_fundus(img) for name, img in generated_negatives().items()}
    assert {n for n, v in verdicts.items() if v.ok} == set()
    # Screenshots, documents and plain colours are "not a fundus photo"; a black frame is "too dark".
    for name in ("screenshot_light", "screenshot_dark", "document", "plain_white", "plain_orange", "noise"):
        assert verdicts[f"generated.{name}"].code == "not_fundus", name
    assert verdicts["generated.plain_black"].code == "too_dark"


@pytest.mark.parametrize("size", [128, 200, 256, 400, 800])
def test_generated_fundus_photos_are_accepted(size):
    rng = np.random.default_rng(size)
    for i in range(6):
        v = check_fundus(make_fundus(rng, diseased=i % 2 == 1, size=size))
        assert v.ok, (size, i, v.code, v.measures)


def test_generated_fundus_through_the_apps_decoder_is_accepted(synthetic_jpeg):
    img = open_image(synthetic_jpeg)
    assert check_fundus(img, Image.open(io.BytesIO(synthetic_jpeg)).size).ok


def test_scikit_image_retina_is_accepted():
    pytest.importorskip("skimage")
    v = check_fundus(skimage_retina())
    assert v.ok, v.measures


@pytest.mark.parametrize(
    ("kind", "code"),
    [("dark", "too_dark"), ("blurred", "blurred"), ("tiny", "too_small"), ("overexposed", "too_bright")],
)
def test_ungradable_copies_are_refused_with_the_reason(kind, code):
    rng = np.random.default_rng(7)
    for i in range(6):
        photo = make_fundus(rng, diseased=i % 2 == 1, size=400)
        assert check_fundus(photo).ok
        v = check_fundus(degrade(photo, kind))
        assert (v.ok, v.code) == (False, code), (kind, i, v.measures)
        assert v.message and v.hint


def test_original_size_decides_too_small_after_draft_decoding():
    photo = make_fundus(np.random.default_rng(1), diseased=False, size=300)
    # A large upload decoded small (draft mode) is judged by the upload's size...
    assert check_fundus(photo, original_size=(3000, 3000)).ok
    # ...and a thumbnail by its own.
    v = check_fundus(photo, original_size=(100, 100))
    assert v.code == "too_small" and "128" in v.message


def test_rotated_original_size_is_harmless():
    photo = make_fundus(np.random.default_rng(2), diseased=False, size=300).crop((0, 40, 300, 260))
    assert check_fundus(photo, original_size=(220, 300)).ok  # EXIF rotation swaps width and height


@pytest.mark.parametrize("size", [(1, 1), (5, 300), (300, 5), (127, 400), (2000, 40)])
def test_degenerate_sizes_do_not_crash(size):
    v = check_fundus(Image.new("RGB", size, (180, 80, 30)))
    assert v.code == "too_small"


def test_odd_modes_are_measured_as_rgb():
    photo = make_fundus(np.random.default_rng(3), diseased=False, size=256)
    assert check_fundus(photo.convert("RGBA")).ok
    assert check_fundus(photo.convert("L").convert("RGB")).code == "not_fundus"  # grey is not a colour photo


def test_a_desaturated_colour_photo_passes_a_greyscale_one_does_not():
    """Some cameras and exports leave a fundus photo almost grey (8 of the 2312 real photos); it still has
    a little colour, which a greyscale image (chroma 0) or a colour wheel (chroma ~150) does not."""
    photo = make_fundus(np.random.default_rng(3), diseased=False, size=256)
    a = np.asarray(photo, np.float32)
    grey = a.mean(axis=2, keepdims=True)
    faded = Image.fromarray(np.clip(grey + 0.03 * (a - grey), 0, 255).astype(np.uint8))
    m = measure(faded)
    assert m["red_blue"] < 1.05 and 2 <= m["chroma"] <= 100, m
    assert check_fundus(faded).ok
    assert measure(photo.convert("L").convert("RGB"))["chroma"] == 0.0


def test_white_padding_is_trimmed():
    photo = make_fundus(np.random.default_rng(4), diseased=False, size=300)
    padded = Image.new("RGB", (400, 300), (255, 255, 255))
    padded.paste(photo, (50, 0))
    v = check_fundus(padded)
    assert v.ok and v.measures.get("trimmed") == 1.0, v.measures


def test_verdict_is_json_ready_and_every_refusal_has_words():
    v = check_fundus(make_fundus(np.random.default_rng(5), diseased=True, size=256))
    body = json.dumps(v.as_dict(), allow_nan=False)
    assert json.loads(body)["code"] == "ok"
    assert isinstance(v, GateVerdict)
    for code in ("not_fundus", "too_dark", "too_bright", "blurred", "too_small"):
        r = gate.verdict(code)
        assert not r.ok and r.code == code
        assert len(r.message) > 20 and len(r.hint) > 20 and "{" not in r.message
    with pytest.raises(AttributeError):
        v.ok = False  # frozen


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        (None, True),
        ("on", True),
        ("1", True),
        ("off", False),
        ("OFF", False),
        ("0", False),
        ("false", False),
        ("no", False),
    ],
)
def test_gate_switch(value, enabled):
    env = {} if value is None else {"AISIGHT_GATE": value}
    assert gate_enabled(env) is enabled


def test_a_check_takes_milliseconds():
    img = make_fundus(np.random.default_rng(6), diseased=True, size=400)
    check_fundus(img)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        check_fundus(img)
        times.append(time.perf_counter() - t)
    # A few ms on an idle core; the bound leaves room for a CPU shared with training runs.
    assert float(np.median(times)) < 0.1
