"""The shared preprocessing: every mode and format, EXIF orientation, draft decoding, hostile files."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from aisight import preprocess as pp
from aisight.preprocess import IMAGE_SIZE, ImageError, open_image, preprocess_bytes, preprocess_path, to_rgb
from tests.conftest import fundus_jpeg, run_at_once

SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# Pillow warns between 1 and 2 x MAX_PIXELS; the app silences that once at import, pytest resets filters.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def quadrants(w: int = 160, h: int = 120) -> Image.Image:
    """An asymmetric picture: each quadrant its own colour, so any rotation or flip shows."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 0)
    return Image.fromarray(arr, "RGB")


def check(arr: np.ndarray) -> np.ndarray:
    assert arr.shape == SHAPE and arr.dtype == np.uint8
    return arr


# ------------------------------------------------------------------------------------------ formats

FORMATS = {
    "JPEG": {"quality": 95},
    "PNG": {},
    "WEBP": {"quality": 95},
    "BMP": {},
    "TIFF": {},
    "GIF": {},
    "HEIF": {"quality": 95},
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_becomes_the_model_input(fmt):
    if fmt == "HEIF" and not pp.HEIF_SUPPORTED:
        pytest.skip("pillow-heif not installed")
    img = quadrants()
    arr = check(preprocess_bytes(encode(img, fmt, **FORMATS[fmt])))
    want = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)).astype(int)
    # Lossy formats and GIF's palette move colours a little; the layout must be the same.
    assert np.abs(arr.astype(int) - want).mean() < 12


def test_mpo_phone_jpeg_reads_first_picture():
    first, second = Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 10, 200))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.abs(preprocess_bytes(data)[0, 0].astype(int) - (200, 10, 10)).max() < 8


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert tuple(preprocess_bytes(data)[20, 20]) == (255, 0, 0)


def test_multipage_tiff_uses_the_first_page():
    pages = [Image.new("RGB", (40, 40), c) for c in ((0, 128, 0), (255, 0, 255))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert tuple(preprocess_bytes(data)[5, 5]) == (0, 128, 0)


# ---------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
             "I", "I;16", "I;16B", "F"]
)
def test_every_mode_converts_to_rgb(mode):
    out = to_rgb(Image.new(mode, (30, 20)))
    assert out.mode == "RGB" and out.size == (30, 20)


def test_rgba_drops_alpha_instead_of_compositing():
    # The paper drops the alpha channel: a fully transparent red pixel stays red (not white or black).
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[..., 0] = 220
    arr[..., 3] = 0
    out = preprocess_bytes(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert tuple(out[10, 10]) == (220, 0, 0)


def test_palette_with_transparency():
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    data = encode(img, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 1
    assert tuple(preprocess_bytes(data)[0, 0]) == (10, 200, 30)


def test_greyscale_becomes_three_equal_channels():
    out = preprocess_bytes(encode(Image.new("L", (40, 40), 77), "PNG"))
    assert (out == 77).all()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    arr = np.full((40, 40), 32768, np.uint16)  # mid-grey in 16 bits; naive clipping would give 255
    img = Image.fromarray(arr)
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = preprocess_bytes(data)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_float_image_in_unit_range_is_scaled():
    out = to_rgb(Image.fromarray(np.full((8, 8), 0.5, np.float32), "F"))
    assert np.all(np.abs(np.asarray(out).astype(int) - 128) <= 1)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    img = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    out = preprocess_bytes(encode(img, fmt))
    r, g, b = (int(v) for v in out[20, 20])
    assert r > 200 and g < 60 and b < 60


def test_one_bit_image():
    img = Image.new("1", (40, 40), 1)
    assert (preprocess_bytes(encode(img, "PNG")) == 255).all()


# ---------------------------------------------------------------------------------------------- EXIF

# EXIF orientation -> the transpose that, applied to the upright picture, gives what the camera stored.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(orientation, fmt):
    upright = quadrants()
    method = STORED[orientation]
    stored = upright if method is None else upright.transpose(method)  # FLIP_LEFT_RIGHT is 0: falsy
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, fmt, exif=exif, **({"quality": 95} if fmt != "PNG" else {}))
    img = open_image(data)
    assert img.size == upright.size
    want = preprocess_bytes(encode(upright, fmt, **({"quality": 95} if fmt != "PNG" else {})))
    assert np.abs(preprocess_bytes(data).astype(int) - want.astype(int)).mean() < 4


# ------------------------------------------------------------------------------------------- draft


@pytest.fixture(scope="module")
def phone_jpeg() -> bytes:
    """A 12 MP (4000x3000) fundus-like JPEG, as a phone camera makes them."""
    small = Image.open(io.BytesIO(fundus_jpeg(diseased=True, size=750, seed=3)))
    img = small.resize((4000, 3000), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(0).integers(-6, 7, size=arr.shape, dtype=np.int16)  # sensor grain
    return encode(Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def test_large_jpeg_decodes_at_reduced_scale(phone_jpeg):
    draft, full = open_image(phone_jpeg), open_image(phone_jpeg, draft=False)
    assert full.size == (4000, 3000)
    # 1/8 scale, and never below twice the model's input.
    assert draft.size == (500, 375)
    assert min(draft.size) >= 2 * IMAGE_SIZE


def test_draft_decode_matches_full_decode_closely(phone_jpeg):
    a = preprocess_bytes(phone_jpeg).astype(int)
    b = preprocess_bytes(phone_jpeg, draft=False).astype(int)
    diff = np.abs(a - b)
    assert diff.mean() < 1.0, diff.mean()
    assert diff.max() <= 12, diff.max()


def test_draft_decode_is_much_faster(phone_jpeg):
    def best(draft: bool) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            preprocess_bytes(phone_jpeg, draft=draft)
            times.append(time.perf_counter() - t)
        return min(times)

    fast, slow = best(True), best(False)
    print(f"12 MP JPEG preprocess: draft {fast * 1000:.0f} ms, full {slow * 1000:.0f} ms")
    assert fast < slow / 3, (fast, slow)


def test_small_jpeg_is_not_drafted():
    data = fundus_jpeg(size=300)
    assert open_image(data).size == (300, 300)


# -------------------------------------------------------------------------------------- bad input


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a bomb's header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


NOT_IMAGES = {
    "text": b"hello, this is not a photo\n",
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "zip": b"PK\x03\x04" + b"\x00" * 26 + b"PK\x05\x06" + b"\x00" * 18,
    "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
}


@pytest.mark.parametrize("kind", sorted(NOT_IMAGES))
def test_not_an_image_is_unsupported(kind):
    with pytest.raises(ImageError) as e:
        preprocess_bytes(NOT_IMAGES[kind])
    assert (e.value.status, e.value.code) == (415, "unsupported_media_type")


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "AVIF"])
def test_image_formats_we_do_not_take_are_unsupported(fmt):
    try:
        data = encode(Image.new("RGB", (32, 32), "red"), fmt)
    except (KeyError, OSError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    with pytest.raises(ImageError) as e:
        preprocess_bytes(data)
    assert e.value.status == 415


def test_empty_bytes():
    with pytest.raises(ImageError) as e:
        preprocess_bytes(b"")
    assert (e.value.status, e.value.code) == (400, "empty_file")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_truncated_file_is_corrupt(fmt):
    data = encode(quadrants(400, 300), fmt)
    with pytest.raises(ImageError) as e:
        preprocess_bytes(data[: len(data) // 2])
    assert e.value.status == 400 and e.value.code in ("corrupt_image", "unsupported_media_type")


def test_damaged_png_data_is_corrupt():
    data = bytearray(encode(quadrants(400, 300), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    with pytest.raises(ImageError) as e:
        preprocess_bytes(bytes(data))
    assert (e.value.status, e.value.code) == (400, "corrupt_image")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about damaged TIFF tags
def test_fuzzed_files_never_escape_as_other_errors():
    rng = np.random.default_rng(7)
    seeds = {fmt: encode(quadrants(64, 48), fmt) for fmt in ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP")}
    for fmt, data in seeds.items():
        for _ in range(40):
            d = bytearray(data)
            for _ in range(int(rng.integers(1, 12))):
                d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 256))
            try:
                check(preprocess_bytes(bytes(d)))
            except ImageError as e:
                assert 400 <= e.status < 500, fmt


@pytest.mark.parametrize("size", [(10_000, 10_000), (50_000, 1_001), (8_000, 6_251)])
def test_decompression_bomb_header_is_refused_before_decoding(size):
    with pytest.raises(ImageError) as e:
        preprocess_bytes(png_with_size(*size))
    assert (e.value.status, e.value.code) == (413, "image_too_large")


def test_real_decompression_bomb_is_refused():
    data = encode(Image.new("1", (8_000, 7_000)), "PNG")  # 56 MP, a few kB on the wire
    assert len(data) < 100_000
    with pytest.raises(ImageError) as e:
        preprocess_bytes(data)
    assert e.value.status == 413


def test_just_under_the_limit_is_not_a_bomb():
    # The header check must not refuse what it should let through (this one then fails as truncated).
    with pytest.raises(ImageError) as e:
        preprocess_bytes(png_with_size(7_000, 7_000))
    assert e.value.code == "corrupt_image"


def test_concurrent_use_is_safe():
    # gunicorn threads and the training loader call this concurrently.
    data = [fundus_jpeg(seed=i) for i in range(4)] + [png_with_size(10_000, 10_000)]
    want = [preprocess_bytes(d) for d in data[:4]]
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(5):
                for d, w in zip(data[:4], want, strict=True):
                    assert np.array_equal(preprocess_bytes(d), w)
                with pytest.raises(ImageError):
                    preprocess_bytes(data[4])
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    run_at_once(lambda _: work(), 4, timeout=None)
    assert not errors


def test_preprocess_path_equals_preprocess_bytes(tmp_path):
    data = fundus_jpeg(seed=5, size=900)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert np.array_equal(preprocess_path(path), preprocess_bytes(data))
