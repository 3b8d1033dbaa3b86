"""Camera-invariant model input: crop to the fundus field, then normalise illumination and colour.

Photos from different cameras and clinics differ in framing (field size, black or white surround, a
circle cut at the top and bottom), in overall brightness and in colour balance. None of that says
anything about disease, but a network trained on a few collections learns it readily. This module
removes it before the network sees the photo (the ``fundus-v2`` input of ``aisight.preprocess``):

1. find the field of view (pixels that differ from the surround, estimated from the corners), and
   crop a square centred on it whose side is the field's larger extent (so a circle cut at the top and
   bottom keeps its true scale), padding with the surround;
2. resize to 128x128;
3. per channel, subtract a Gaussian-blurred copy computed inside the field only (normalised
   convolution, so the dark surround does not bleed in), and divide by the channel's spread inside
   the field. What is left is local contrast (vessels, lesions, the disc's rim) in units of the
   photo's own contrast: invariant to a gain and an offset per channel (brightness, exposure, white
   balance), up to clipping. Kaggle's 2015 retinopathy winner subtracted a blurred copy the same way;
4. map to uint8 (128 = no local contrast, +-4 spreads = 0..255) and set everything outside a circle
   just inside the field to 128, so the field's edge carries no camera signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

SIDE = 128


def blur_sigma(side: int) -> float:
    """The local background's scale in px for a crop of ``side`` px: about 1/15 of the field's radius."""
    return side / 30.0


SIGMA = blur_sigma(SIDE)
SPREADS = 4.0  # +-4 spreads of local contrast fill 0..255
FIELD_LEVEL = 24.0  # a pixel belongs to the field if any channel differs this much from the surround
EDGE_KEEP = 0.94  # keep a circle of this fraction of the field's radius (the rim is camera-specific)
_PROBE = 256  # side of the thumbnail the field is found on


@dataclass(frozen=True)
class Field:
    """The square crop around the fundus field, in the photo's pixels (may reach outside it)."""

    left: float
    top: float
    side: float
    surround: tuple[int, int, int]

    def relative(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop as (left, top, right, bottom) fractions of the photo's width and height."""
        return (self.left / width, self.top / height, (self.left + self.side) / width, (self.top + self.side) / height)


def _surround(a: np.ndarray) -> np.ndarray:
    """The surround's colour: the median of the four corner patches (black on most cameras)."""
    h, w = a.shape[:2]
    k = max(2, min(h, w) // 16)
    corners = np.concatenate([a[:k, :k], a[:k, -k:], a[-k:, :k], a[-k:, -k:]]).reshape(-1, 3)
    return np.median(corners, axis=0)


def _extent(share: np.ndarray, min_share: float = 0.04) -> tuple[int, int] | None:
    """First and last index whose share of field pixels reaches ``min_share`` (ignores stray labels)."""
    idx = np.flatnonzero(share >= min_share)
    if idx.size == 0:
        return None
    return int(idx[0]), int(idx[-1]) + 1


def find_field(img: Image.Image) -> Field:
    """Locate the fundus field of an RGB photo and return the square crop around it.

    Falls back to the centred square of the whole photo's larger side when no surround is found (a
    photo filled by the field, or not a fundus photo at all: the gate refuses those before this).
    """
    w, h = img.size
    scale = min(1.0, _PROBE / max(w, h))
    small = img if scale == 1.0 else img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                Image.Resampling.BILINEAR, reducing_gap=2.0)
    a = np.asarray(small, np.float32)
    surround = _surround(a)
    field = np.abs(a - surround).max(axis=2) > FIELD_LEVEL
    cols = _extent(field.mean(axis=0))
    rows = _extent(field.mean(axis=1))
    sw, sh = small.size
    if cols is None or rows is None or field.mean() > 0.97:
        x0, x1, y0, y1 = 0, sw, 0, sh
    else:
        (x0, x1), (y0, y1) = cols, rows
    side = max(x1 - x0, y1 - y0) / scale
    cx, cy = (x0 + x1) / 2 / scale, (y0 + y1) / 2 / scale
    colour = tuple(int(round(float(v))) for v in surround)
    return Field(cx - side / 2, cy - side / 2, side, colour)  # type: ignore[arg-type]


def crop_field(img: Image.Image, field: Field, size: int = SIDE) -> np.ndarray:
    """The square around ``field`` resized to ``size``, padded with the surround where it leaves the photo."""
    box = (field.left, field.top, field.left + field.side, field.top + field.side)
    # Image.resize with box reads only inside the photo, so pad first when the square reaches outside.
    w, h = img.size
    if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
        pad_l, pad_t = max(0, -int(np.floor(box[0]))), max(0, -int(np.floor(box[1])))
        pad_r, pad_b = max(0, int(np.ceil(box[2])) - w), max(0, int(np.ceil(box[3])) - h)
        canvas = Image.new("RGB", (w + pad_l + pad_r, h + pad_t + pad_b), field.surround)
        canvas.paste(img, (pad_l, pad_t))
        img, box = canvas, (box[0] + pad_l, box[1] + pad_t, box[2] + pad_l, box[3] + pad_t)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    return np.asarray(out, np.uint8)


def crop_relative(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop ``img`` to ``box`` given as fractions of its size (``Field.relative``), padding with black
    where the box leaves the photo: the displayed counterpart of the model's input."""
    w, h = img.size
    left, top, right, bottom = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    if right - left < 1 or bottom - top < 1:
        return img
    return img.crop((left, top, right, bottom))  # Pillow fills the outside with zeros (black)


@lru_cache(maxsize=4)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """An n x n matrix that blurs a length-n signal with a Gaussian (zero outside): blur = G @ x."""
    i = np.arange(n, dtype=np.float64)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    g /= g.sum(axis=1, keepdims=True).max()
    return g.astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) float32 array (zero padding)."""
    gh = _blur_matrix(a.shape[0], sigma)
    gw = _blur_matrix(a.shape[1], sigma)
    if a.ndim == 2:
        return gh @ a @ gw.T
    return np.einsum("ij,jkc,lk->ilc", gh, a, gw, optimize=True)


def field_mask(crop: np.ndarray, surround: tuple[int, int, int]) -> np.ndarray:
    """Boolean mask of the field in a cropped square: differs from the surround, inside the circle."""
    n = crop.shape[0]
    differs = np.abs(crop.astype(np.float32) - np.asarray(surround, np.float32)).max(axis=2) > FIELD_LEVEL
    y, x = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2.0
    circle = (x - c) ** 2 + (y - c) ** 2 <= (EDGE_KEEP * n / 2.0) ** 2
    # Two pixels in from a cut edge (top and bottom of many cameras' fields): the edge is no lesion.
    inner = _blur(differs.astype(np.float32), 2.0) > 0.98
    return inner & circle


def normalise(crop: np.ndarray, mask: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """Local contrast per channel inside ``mask``, in units of the channel's own spread, as uint8."""
    m = mask.astype(np.float32)
    a = crop.astype(np.float32) * m[..., None]
    weight = _blur(m, sigma)
    local = _blur(a, sigma) / np.maximum(weight, 1e-3)[..., None]
    detail = (crop.astype(np.float32) - local) * m[..., None]
    count = float(m.sum())
    if count < 16:  # no field to speak of: a flat input (the gate refuses such photos anyway)
        return np.full(crop.shape, 128, np.uint8)
    spread = np.sqrt((detail**2).sum(axis=(0, 1)) / count)  # per channel; the mean detail is ~0
    scaled = detail / np.maximum(spread, 0.5) * (127.5 / SPREADS) + 128.0
    scaled = np.where(mask[..., None], scaled, 128.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def fundus_crop(img: Image.Image, size: int = SIDE) -> tuple[np.ndarray, np.ndarray, Field]:
    """The field's square crop (uint8), its field mask (bool) and where the crop lies in the photo.

    Training caches this stage: its augmentations act on the crop, before ``normalise`` (as a
    different camera would), and ``training.augment`` normalises with the same arithmetic.
    """
    field = find_field(img)
    crop = crop_field(img, field, size)
    return crop, field_mask(crop, field.surround), field


def fundus_input(img: Image.Image, size: int = SIDE) -> tuple[np.ndarray, Field]:
    """The camera-invariant model input of an RGB photo, and the field crop it came from."""
    crop, mask, field = fundus_crop(img, size)
    return normalise(crop, mask, blur_sigma(size)), field
