"""The ``/erase`` page in headless Chromium (Debian's ``chromium`` through Playwright): upload a photo, paint a mask
stroke with the mouse, erase, and the result appears beside the original. The screenshot is kept under
``outputs/erase_page.png`` (gitignored; CI keeps it as an artifact) and in the test's tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import encode, photo, serve

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[3] / "outputs"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_upload_paint_erase_and_the_result_appears(tiny_sd_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    upload = tmp_path / "photo.png"
    upload.write_bytes(encode(photo(128, 96)))
    with serve(tiny_sd_dir) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/erase")
            page.set_input_files("#file", str(upload))
            page.wait_for_function("document.getElementById('photo').width === 128")
            page.click("#erase")  # nothing painted yet: the page says so, no request
            assert "Paint over the object first" in page.inner_text("#status")
            box = page.locator("#overlay").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
            page.mouse.down()
            for i in range(1, 11):
                page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * i), box["y"] + box["height"] * 0.5)
            page.mouse.up()
            painted = page.evaluate("""() => {
                return Array.from(document.getElementById('overlay').getContext('2d')
                    .getImageData(0, 0, 128, 96).data).filter((v, i) => i % 4 === 3 && v > 0).length;
            }""")
            assert painted > 200
            with page.expect_response("**/v1/images/erase") as response:
                page.click("#erase")
            assert response.value.status == 200
            page.wait_for_function("document.getElementById('result').naturalWidth === 128", timeout=60_000)
            assert page.evaluate("document.getElementById('result').naturalHeight") == 96
            assert page.is_visible("#download") and "Done in" in page.inner_text("#status")
            shot = tmp_path / "erase_page.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "erase_page.png")
            assert errors == []
        finally:
            browser.close()
