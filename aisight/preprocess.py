"""Turn uploaded bytes into the model's input: the one path shared by serving and training."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF (iPhone photos); optional so the core still imports without it.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - the pinned requirements include it
    HEIF_SUPPORTED = False

IMAGE_SIZE = 128
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# About 50 megapixels: larger uploads are refused before any pixel is decoded (decompression bombs).
MAX_PIXELS = 50_000_000
# Formats a user may upload; MPO is what many phone cameras call their JPEGs.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "HEIF"})
# Decode JPEGs at a reduced scale no smaller than this (Pillow's draft mode picks 1/2, 1/4 or 1/8).
DRAFT_SIZE = (2 * IMAGE_SIZE, 2 * IMAGE_SIZE)

# Pillow's own bomb check stays on as a second line of defence: it raises above 2 x MAX_PIXELS and only
# warns between 1 and 2 x, where our check below refuses the image anyway. The warning is silenced once,
# here, rather than with warnings.catch_warnings per call, which is not thread-safe (gunicorn threads).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Only these plugins may even parse an upload's header: less code exposed to hostile files.
# JPEG covers MPO (Pillow's JPEG opener returns an MPO image when it finds one).
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", *(("HEIF",) if HEIF_SUPPORTED else ()))
_SUPPORTED_TEXT = "JPEG, PNG, WebP, BMP, TIFF, GIF or HEIC"


class ImageError(ValueError):
    """An upload that cannot become a model input; carries an HTTP status and a stable code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def open_image(data: bytes, *, draft: bool = True, draft_size: tuple[int, int] = DRAFT_SIZE) -> Image.Image:
    """Decode bytes into an upright RGB image, refusing non-images, bombs and corrupt files.

    With ``draft`` a large JPEG is decoded at a reduced scale (still at least ``draft_size``; by default
    twice the model's input size), which is what makes a 12 MP phone photo cheap. The model input must
    always use the default ``draft_size``: a larger one changes the pixels (the display copy may use one).
    """
    if not data:
        raise ImageError("empty_file", "The uploaded file is empty.", 400)
    try:
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        kind = sniff(data)
        if kind:  # Pillow calls a damaged header "unidentified"; the user deserves to hear it is damaged
            raise ImageError("corrupt_image", f"The file looks like a {kind} image but it is damaged.", 400) from None
        raise ImageError(
            "unsupported_media_type",
            f"This file is not an image we can read. Upload a {_SUPPORTED_TEXT} photo.",
            415,
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large() from None
    except MemoryError:
        raise
    except Exception as exc:  # hostile headers raise all sorts (struct.error, KeyError...)
        raise ImageError("corrupt_image", f"The image could not be read ({exc}).", 400) from None

    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(
            "unsupported_media_type",
            f"{img.format} images are not supported. Upload a {_SUPPORTED_TEXT} photo.",
            415,
        )
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise _too_large()
    if width < 1 or height < 1:
        raise ImageError("corrupt_image", "The image has no pixels.", 400)

    try:
        if draft and img.format in ("JPEG", "MPO"):
            img.draft("RGB", draft_size)
        img.seek(0)  # GIF/TIFF/HEIF: the first frame only
        # One decoder call for the whole file instead of one per 64 kB: each call releases the GIL, and
        # taking it back ~45 times per phone photo queues behind the other request threads (measured:
        # 8 threads decode 12 MP photos 1.4x faster this way). The upload is in memory already.
        img.decodermaxblock = max(getattr(img, "decodermaxblock", 0), len(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large() from None
    except MemoryError:
        raise
    except Exception as exc:  # decoders and EXIF parsing fail in many ways on damaged files
        raise ImageError("corrupt_image", f"The image is truncated or corrupt ({exc}).", 400) from None


_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def sniff(data: bytes) -> str | None:
    """Name the supported format whose signature ``data`` starts with, if any (headers only)."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    # "BM" alone starts plenty of text; a real BMP also has a known info-header size at offset 14.
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if HEIF_SUPPORTED and head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "HEIC"
    return None


def _too_large() -> ImageError:
    return ImageError(
        "image_too_large",
        f"The image has more than {MAX_PIXELS // 1_000_000} megapixels. Upload a smaller photo.",
        413,
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is dropped (not composited), as the paper does."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting Pillow clip everything above 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = float(np.nanmax(arr, initial=0.0))
        if mode.startswith("I;16") or peak > 255:
            top = 65535.0
        elif mode == "F" and peak <= 1.0:
            top = 1.0  # float images usually hold 0..1
        else:
            top = 255.0
        arr = np.nan_to_num(arr, nan=0.0)
        arr8 = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA")  # applies palette transparency, which RGB then drops
    if mode == "La":
        img = img.convert("LA")  # Pillow has no direct La -> RGB(A) conversion
    if mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize an RGB image to size x size x 3 uint8, as the paper does (no crop, aspect not kept)."""
    out = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # defensive: to_rgb guarantees 3 channels
        raise ImageError("corrupt_image", "The image could not be converted to RGB.", 400)
    return arr


# How a decoded photo becomes the model's input. A model card names its own ("preprocessing"); cards
# without the key (model 1.0.0) were trained on the plain resize.
#   resize     the paper's: the whole photo squeezed to 128x128 (aspect not kept)
#   fundus-v2  crop to the fundus field, per-channel local contrast (aisight.fundus): camera-invariant
PREPROCESSING = ("resize", "fundus-v2")
DEFAULT_PREPROCESSING = "resize"


def check_preprocessing(name: str) -> str:
    """Return ``name`` if it is a known preprocessing, else raise ValueError naming the known ones."""
    if name not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {name!r}; known: {', '.join(PREPROCESSING)}")
    return name


def model_input_and_crop(
    img: Image.Image, preprocessing: str = DEFAULT_PREPROCESSING
) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """Return the model input (128x128x3 uint8) of a decoded upright RGB photo, and the square it was
    taken from as (left, top, right, bottom) fractions of the photo (None: the whole photo)."""
    if check_preprocessing(preprocessing) == "resize":
        return resize(img), None
    from aisight.fundus import fundus_input

    arr, field = fundus_input(img)
    return arr, field.relative(*img.size)


def model_input(img: Image.Image, preprocessing: str = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Return the model input (128x128x3 uint8) of a decoded upright RGB photo."""
    return model_input_and_crop(img, preprocessing)[0]


def preprocess_bytes(data: bytes, *, draft: bool = True, preprocessing: str = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Return the model input (128x128x3 uint8) for an uploaded file's bytes."""
    return model_input(open_image(data, draft=draft), preprocessing)


def preprocess_path(
    path: str | Path, *, draft: bool = True, preprocessing: str = DEFAULT_PREPROCESSING
) -> np.ndarray:
    """Return the model input for an image file; what training uses, so it matches serving exactly."""
    return preprocess_bytes(Path(path).read_bytes(), draft=draft, preprocessing=preprocessing)
