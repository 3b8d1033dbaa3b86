"""Bad input through the app: every case gets a clear 4xx (JSON from the API, a page from the form)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import fundus_jpeg
from tests.unit.test_app import encode, post_image, ready_app

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def png_header_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid PNG header that claims width x height pixels, with almost no data behind it."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated(fmt: str) -> bytes:
    data = encode(Image.open(io.BytesIO(fundus_jpeg(size=400))), fmt)
    return data[: len(data) // 2]


def damaged_jpeg() -> bytes:
    data = bytearray(fundus_jpeg(size=400))
    i = data.find(b"\xff\xc4")  # the first Huffman table, overwritten
    data[i + 5 : i + 40] = b"\xff" * 35
    return bytes(data)


# name -> (file bytes, expected status, expected code)
BAD_FILES = {
    "zero_bytes": (b"", 400, "empty_file"),
    "text": (b"just some text, not a photo\n" * 10, 415, "unsupported_media_type"),
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF", 415,
            "unsupported_media_type"),
    "zip": (b"PK\x03\x04\x14\x00\x00\x00\x00\x00" + b"\x00" * 20 + b"PK\x05\x06" + b"\x00" * 18, 415,
            "unsupported_media_type"),
    "html": (b"<!DOCTYPE html><html><script>alert(1)</script></html>", 415, "unsupported_media_type"),
    "svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
            b'<circle cx="50" cy="50" r="40"/></svg>', 415, "unsupported_media_type"),
    "ico": (encode(Image.new("RGB", (32, 32)), "ICO"), 415, "unsupported_media_type"),
    "ppm": (encode(Image.new("RGB", (32, 32)), "PPM"), 415, "unsupported_media_type"),
    "tga": (encode(Image.new("RGB", (32, 32)), "TGA"), 415, "unsupported_media_type"),
    "truncated_jpeg": (truncated("JPEG"), 400, "corrupt_image"),
    "truncated_png": (truncated("PNG"), 400, "corrupt_image"),
    "truncated_webp": (truncated("WEBP"), 400, "corrupt_image"),
    "damaged_jpeg": (damaged_jpeg(), 400, "corrupt_image"),
    "bomb_header": (png_header_bomb(), 413, "image_too_large"),
    "bomb_real": (encode(Image.new("1", (8_000, 7_000)), "PNG"), 413, "image_too_large"),
}




def assert_still_serving(client) -> None:
    r = post_image(client, fundus_jpeg(seed=21))
    assert r.status_code == 200, r.get_json()


def assert_json_error(r, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.mimetype == "application/json"
    err = r.get_json()["error"]
    assert err["code"] == code and err["message"]
    assert "label" not in r.get_json()


def assert_page_error(r, status: int, code: str) -> None:
    assert r.status_code == status
    assert r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert 'role="alert"' in html and f'data-error="{code}"' in html
    assert "data-prediction" not in html
    assert 'type="file"' in html  # the form is right there to try again


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_api(client, name):
    data, status, code = BAD_FILES[name]
    assert_json_error(post_image(client, data, filename=f"{name}.jpg"), status, code)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_form(client, name):
    data, status, code = BAD_FILES[name]
    assert_page_error(post_image(client, data, url="/", filename=f"{name}.jpg"), status, code)


def test_serving_goes_on_after_every_bad_file(client):
    for data, _status, _code in BAD_FILES.values():
        post_image(client, data)
    assert_still_serving(client)


@pytest.mark.parametrize("url", ["/api/v1/predict", "/"])
def test_no_file_part(client, url):
    check = assert_json_error if url.startswith("/api") else assert_page_error
    check(client.post(url, data={}, content_type="multipart/form-data"), 400, "no_file")
    check(client.post(url, data={"photo": (io.BytesIO(fundus_jpeg()), "a.jpg")}), 400, "no_file")
    check(client.post(url, data={"image": "just a text field"}), 400, "no_file")
    check(client.post(url, data=fundus_jpeg(), content_type="image/jpeg"), 400, "no_file")
    check(client.post(url, json={"image": "aGVsbG8="}), 400, "no_file")


@pytest.mark.parametrize("url", ["/api/v1/predict", "/"])
def test_empty_filename(client, url):
    # What a browser sends when the form is submitted with no file chosen.
    check = assert_json_error if url.startswith("/api") else assert_page_error
    check(post_image(client, b"", url=url, filename=""), 400, "empty_filename")


def test_body_over_the_limit_is_413(client):
    data = b"\xff\xd8\xff" + b"\x00" * (21 * 1024 * 1024)  # the default limit is 20 MB
    assert_json_error(post_image(client, data), 413, "payload_too_large")
    r = post_image(client, data, url="/")
    assert_page_error(r, 413, "payload_too_large")
    assert "20 MB" in r.get_data(as_text=True)
    assert_still_serving(client)


def test_upload_limit_follows_config(model_dir, monkeypatch):
    monkeypatch.setenv("AISIGHT_MAX_UPLOAD_MB", "1")
    c = ready_app(model_dir).test_client()
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")  # noise does not compress: about 1.5 MB
    assert len(data) > 1024 * 1024
    r = post_image(c, data)
    assert_json_error(r, 413, "payload_too_large")
    assert "1 MB" in r.get_json()["error"]["message"]
    assert post_image(c, fundus_jpeg()).status_code == 200  # a photo under the limit still goes through


def test_file_of_exactly_the_limit_passes_the_body_check(model_dir):
    # The multipart framing around a file of exactly MAX_UPLOAD_MB must not push it over the limit.
    c = ready_app(model_dir, MAX_UPLOAD_MB=1).test_client()
    r = post_image(c, b"\x00" * (1024 * 1024))
    assert r.status_code == 415  # refused as not an image, not as too large


def test_too_many_parts(client):
    data = {f"f{i}": "x" for i in range(100)}
    data["image"] = (io.BytesIO(fundus_jpeg()), "a.jpg")
    r = client.post("/api/v1/predict", data=data)
    assert 400 <= r.status_code < 500 and r.get_json()["error"]["code"]


def test_declared_content_type_is_not_trusted(client):
    # A JPEG declared as text/plain is still a JPEG; a text file declared as image/jpeg is still text.
    r = client.post("/api/v1/predict", data={"image": (io.BytesIO(fundus_jpeg()), "x.txt", "text/plain")})
    assert r.status_code == 200
    r = client.post("/api/v1/predict", data={"image": (io.BytesIO(b"hello"), "x.jpg", "image/jpeg")})
    assert_json_error(r, 415, "unsupported_media_type")


def test_error_page_for_unknown_html_route(client):
    r = client.get("/nothing-here", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.mimetype == "text/html"
    r = client.get("/nothing-here", headers={"Accept": "application/json"})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
