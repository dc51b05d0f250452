"""The upload page in real headless Chromium: upload an image, see the predicted class and the chart."""

import base64
import re
from pathlib import Path

import pytest
import requests
from conftest import REPO
from playwright.sync_api import expect, sync_playwright

from fmnist_pyfunc.contract import png_base64

pytestmark = pytest.mark.e2e  # one worker runs this module (conftest.ONE_WORKER_MODULES)
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium: Playwright cannot download browsers here
# Flags for a sandboxed CI container with no network beyond loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (make system-deps does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        yield page
        browser.close()


def test_upload_shows_prediction_and_chart(page, ui_url, dataset, tmp_path):
    """In a real browser, uploading a test image shows a card with the class the served model gives that image
    (as the UI's JSON API answers it) and its probability, ten bars, the 28x28 image the model saw and the
    version that answered, under a header naming the served model and a healthy scoring server."""
    png = png_base64(dataset.test_images[0])
    answer = requests.post(f"{ui_url}/predict", json={"images": [png]}, timeout=60)
    expected = answer.json()["results"][0]["class_name"]
    image = tmp_path / "ankle_boot.png"
    image.write_bytes(base64.b64decode(png))  # test image 0 is an ankle boot
    page.goto(ui_url)
    expect(page.locator("#health")).to_have_text("scoring server: ok")
    expect(page.locator("#model-info")).to_contain_text("fashion-mnist-cnn v")
    page.set_input_files("#files", str(image))
    card = page.locator(".card").first
    expect(card).to_be_visible(timeout=30_000)
    expect(card.locator(".prediction")).to_contain_text(re.compile(rf"^{re.escape(expected)} \(\d+\.\d %\)"))
    expect(card.locator(".bar-row")).to_have_count(10)
    expect(card.locator(".answered-by")).to_have_text(re.compile(r"answered by fashion-mnist-cnn v\d+$"))
    seen = card.locator("img.seen")  # what the model classified, 28x28, beside the upload
    expect(seen).to_be_visible()
    assert seen.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [28, 28]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui_upload.png"), full_page=True)


def test_gallery_click_and_bad_upload_message(page, ui_url, tmp_path):
    """Clicking a gallery image adds a prediction card; uploading a text file named .png shows the server's reason
    in the page."""
    page.goto(ui_url)
    before = page.locator(".card").count()
    page.locator(".sample").first.click()
    expect(page.locator(".card")).to_have_count(before + 1, timeout=30_000)
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    page.set_input_files("#files", str(bad))
    expect(page.locator("#message")).to_contain_text("not an image in an accepted format")
