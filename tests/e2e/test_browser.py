"""Real Chromium on the real server: upload a photo at desktop and phone sizes, with and without JS.

Screenshots go to test-artifacts/ (look at them: the phone ones are what most users see).
"""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import fundus_jpeg
from tests.e2e.test_server import post

pytestmark = pytest.mark.e2e

VIEWPORTS = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {
        "viewport": {"width": 360, "height": 740},
        "device_scale_factor": 2,
        "is_mobile": True,
        "has_touch": True,
    },
}


@pytest.fixture
def open_page(browser, server):
    """Open a page of the server in a fresh context; collects console errors (CSP violations show there)."""
    contexts, errors = [], []

    def _open(viewport: str, *, javascript: bool = True, path: str = "/"):
        ctx = browser.new_context(**VIEWPORTS[viewport], java_script_enabled=javascript)
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + path)
        return page

    yield _open, errors
    for ctx in contexts:
        ctx.close()


def choose(page, data: bytes, name: str = "fundus.jpg", mime: str = "image/jpeg") -> None:
    page.set_input_files('input[type="file"][name="image"]', files=[{"name": name, "mimeType": mime, "buffer": data}])


def fits_width(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def api_label(server, data: bytes) -> str:
    status, _, body = post(server.url, data)
    assert status == 200
    return json.loads(body)["label"]


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_upload_with_javascript(open_page, server, artifacts_dir, viewport):
    _open, errors = open_page
    page = _open(viewport)
    assert fits_width(page), "no sideways scrolling"
    page.screenshot(path=artifacts_dir / f"e2e-index-{viewport}.png", full_page=True)
    data = fundus_jpeg(diseased=True, size=600, seed=31)
    choose(page, data)
    page.wait_for_selector(".preview:not([hidden]) img")
    page.screenshot(path=artifacts_dir / f"e2e-preview-{viewport}.png", full_page=True)
    page.evaluate("window.__samePage = true")  # survives only if the result comes without a reload
    page.click('button[type="submit"]')
    el = page.wait_for_selector("[data-prediction]", timeout=60_000)
    label = el.get_attribute("data-prediction")
    assert label in ("healthy", "diseased")
    assert page.evaluate("window.__samePage === true"), "the script should show the result without reloading"
    assert label == api_label(server, data)
    assert "picked" in el.get_attribute("class")  # the predicted class is the highlighted one
    page.wait_for_selector(".photo img")  # the photo and its heatmap follow the answer (aisight.streaming)
    assert page.is_visible(".photo img") and page.evaluate("document.querySelector('.photo img').naturalWidth") > 0
    assert page.is_visible("text=not a diagnosis")
    assert fits_width(page)
    page.screenshot(path=artifacts_dir / f"e2e-result-{viewport}.png", full_page=True)
    assert errors == []


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_upload_without_javascript(open_page, server, artifacts_dir, viewport):
    _open, errors = open_page
    page = _open(viewport, javascript=False)
    data = fundus_jpeg(diseased=False, size=600, seed=32)
    choose(page, data)
    with page.expect_navigation():
        page.click('button[type="submit"]')  # a plain form POST
    el = page.wait_for_selector("[data-prediction]")
    assert el.get_attribute("data-prediction") == api_label(server, data)
    assert page.is_visible(".photo img")
    assert fits_width(page)
    page.screenshot(path=artifacts_dir / f"e2e-result-nojs-{viewport}.png", full_page=True)
    assert errors == []


def test_bad_file_shows_a_clear_message(open_page, artifacts_dir):
    _open, errors = open_page
    page = _open("phone")
    choose(page, b"this is a text file, not a photo", name="notes.jpg")
    page.click('button[type="submit"]')
    alert = page.wait_for_selector('[data-error="unsupported_media_type"]')
    assert "not an image" in alert.inner_text()
    assert page.query_selector("[data-prediction]") is None
    page.screenshot(path=artifacts_dir / "e2e-error-phone.png", full_page=True)
    # The form is back and works.
    choose(page, fundus_jpeg(seed=33))
    page.click('button[type="submit"]')
    page.wait_for_selector("[data-prediction]")
    # The browser logs the 415 answer itself as a failed resource; anything else is an error of ours.
    assert [e for e in errors if "415" not in e] == []


def test_too_large_file_is_stopped_before_upload(open_page, server):
    _open, _ = open_page
    page = _open("phone")
    assert page.get_attribute("form.upload", "data-max-bytes") == str(20 * 1024 * 1024)
    # The script reads the limit from the form; a lower one saves pushing 20 MB through the test driver.
    page.evaluate("document.querySelector('form.upload').dataset.maxBytes = '1000'")
    requests = []
    page.on("request", lambda r: r.method == "POST" and requests.append(r.url))
    choose(page, fundus_jpeg(seed=34), name="huge.jpg")
    page.wait_for_selector(".client-error:not([hidden])")
    page.click('button[type="submit"]')
    assert "larger than 20 MB" in page.inner_text(".client-error")
    assert requests == []


def test_real_photos_on_a_phone(open_page, fundus_dir, artifacts_dir):
    _open, errors = open_page
    with open(fundus_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picks = [next(r for r in rows if r["label"] == want) for want in ("healthy", "diseased")]
    for row in picks:
        page = _open("phone")
        choose(page, (fundus_dir / row["path"]).read_bytes(), name=row["path"].rsplit("/", 1)[-1])
        page.click('button[type="submit"]')
        el = page.wait_for_selector("[data-prediction]", timeout=60_000)
        assert el.get_attribute("data-prediction") in ("healthy", "diseased")
        page.screenshot(path=artifacts_dir / f"e2e-result-real-{row['label']}-phone.png", full_page=True)
    assert errors == []


def heatmap_visibility(page) -> str:
    return page.evaluate("getComputedStyle(document.querySelector('.photo .heatmap')).visibility")


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "nojs"])
def test_heatmap_toggle(open_page, artifacts_dir, javascript):
    _open, errors = open_page
    page = _open("phone", javascript=javascript)
    choose(page, fundus_jpeg(diseased=True, size=600, seed=35))
    page.click('button[type="submit"]')
    page.wait_for_selector("[data-prediction]", timeout=60_000)
    page.wait_for_selector(".photo .heatmap", state="attached")  # it follows the answer
    # The photo first; the heatmap stacked over it, hidden until asked for.
    assert heatmap_visibility(page) == "hidden"
    assert page.evaluate("document.querySelector('.photo .heatmap').naturalWidth") > 0
    assert page.is_visible("text=This is not a map of disease.")
    box, photo = page.locator(".photo .heatmap").bounding_box(), page.locator(".stack > img").first.bounding_box()
    assert box == photo, "the heatmap covers the photo exactly"
    page.click('label[for="show-heatmap"]')  # the label is the big touch target
    assert page.is_checked("#show-heatmap")
    assert heatmap_visibility(page) == "visible"
    assert page.is_visible(".heat-legend")
    assert fits_width(page)
    suffix = "" if javascript else "-nojs"
    page.locator(".result").screenshot(path=artifacts_dir / f"e2e-heatmap{suffix}-phone.png")
    page.click("#show-heatmap")
    assert heatmap_visibility(page) == "hidden"
    assert errors == []


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "nojs"])
def test_refusal_explains_itself_on_a_phone(open_page, artifacts_dir, tmp_path, javascript):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    cat = tmp_path / "cat.jpg"
    Image.fromarray(skimage_data.chelsea()).save(cat, quality=90)
    _open, errors = open_page
    page = _open("phone", javascript=javascript)
    page.set_input_files('input[type="file"][name="image"]', str(cat))
    page.click('button[type="submit"]')
    alert = page.wait_for_selector('[data-error="not_fundus"]', timeout=60_000)
    text = alert.inner_text()
    assert "We did not screen this photo." in text and "does not look like a colour fundus photograph" in text
    assert "What to do: Take the photo through the fundus camera" in text
    assert page.is_visible(".refusal .example svg")
    assert page.query_selector("[data-prediction]") is None
    assert page.is_visible('input[type="file"]')  # the form is right there to try again
    assert fits_width(page)
    if javascript:
        page.screenshot(path=artifacts_dir / "e2e-refusal-phone.png", full_page=True)
    # The browser logs the 422 answer itself as a failed resource; anything else is an error of ours.
    assert [e for e in errors if "422" not in e] == []
