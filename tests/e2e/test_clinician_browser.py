"""A clinician on a phone, in real Chromium against the real server (nginx + gunicorn, SQLite store):
sign in, open a visit, shoot both eyes, record a review, open the printable report. Screenshots are kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, fundus_jpeg
from tests.e2e.conftest import start_server, stop_server
from tests.e2e.test_browser import VIEWPORTS

pytestmark = pytest.mark.e2e
PASSWORD = "a long clinic password"
ALL_IMAGES_SHOWN = "[...document.querySelectorAll('.eye img')].every(i => i.complete && i.naturalWidth > 0)"


@pytest.fixture(scope="module")
def clinic_server(model_dir, artifacts_dir, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'aisight.db'}"
    made = subprocess.run([sys.executable, "-m", "aisight.cli", "users", "create", "dr.lee", "--password-stdin"],
                          input=PASSWORD + "\n", capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)})
    assert made.returncode == 0, made.stderr
    s = start_server(model_dir, artifacts_dir / "e2e-clinic.log", AISIGHT_STORE="on", DATABASE_URL=url,
                     SECRET_KEY="e2e-secret", AISIGHT_RATE_LIMIT="off")
    yield s
    stop_server(s)


def test_a_clinician_visit_on_a_phone(browser, clinic_server, artifacts_dir):
    ctx = browser.new_context(**VIEWPORTS["phone"])
    errors: list[str] = []
    page = ctx.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(clinic_server.url + "/visits")
        assert "/login" in page.url  # sign in first
        page.fill("#username", "dr.lee")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/visits")
        page.fill("#patient_ref", "PT-2026-001")
        page.click(".new-visit button[type=submit]")
        page.wait_for_selector("h1:has-text('PT-2026-001')")
        for i, eye in enumerate(("left", "right")):
            page.set_input_files(f"#image-{eye}", files=[{"name": f"{eye}.jpg", "mimeType": "image/jpeg",
                                                         "buffer": fundus_jpeg(diseased=bool(i), seed=20 + i)}])
            page.click(f"[data-eye={eye}] button[type=submit]")
            page.wait_for_selector(f"[data-eye={eye}] [data-prediction]")
        assert page.locator("[data-prediction]").count() == 2
        # Not wait_for_function: its polling evaluates strings, which the page's CSP (rightly) forbids.
        page.wait_for_load_state("load")
        assert page.evaluate(ALL_IMAGES_SHOWN)
        page.screenshot(path=str(artifacts_dir / "clinic-visit-phone.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        page.fill("#note", "Refer the right eye.")
        page.click("form[action$='/note'] button")
        page.click("text=Printable report")
        page.wait_for_selector("[data-notice=screening-aid]")
        page.wait_for_load_state("load")
        assert page.locator(".eye img").count() == 4 and page.evaluate(ALL_IMAGES_SHOWN)  # photo + heatmap, both eyes
        page.emulate_media(media="print")
        page.screenshot(path=str(artifacts_dir / "clinic-report-print.png"), full_page=True)
        assert "Refer the right eye." in page.content() and page.locator("header.site").is_hidden()
        page.emulate_media(media="screen")

        page.goto(clinic_server.url + "/review")
        page.locator("[data-review]").first.click()
        page.check("input[name=reading][value=diseased]")
        page.check("input[name=finding][value=retinopathy]")
        page.click("button:has-text('Record reading')")
        page.wait_for_url("**/review")
        assert page.locator("[data-review]").count() == 1  # one photo left to read
        page.goto(clinic_server.url + "/review/dashboard")
        page.screenshot(path=str(artifacts_dir / "clinic-dashboard-phone.png"), full_page=True)
        assert page.locator("tr[data-version] td").nth(1).inner_text() == "1"  # one reading counted
    finally:
        ctx.close()
    assert errors == []
