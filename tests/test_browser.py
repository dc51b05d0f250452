"""The upload page in real headless Chromium: upload an image, see the predicted class and the chart."""

import base64
import re
from pathlib import Path

import pytest
import requests
from conftest import REPO
from playwright.sync_api import expect, sync_playwright

from fmnist_pyfunc.contract import png_base64
from fmnist_testkit import outliers
from fmnist_testkit.images import encode

pytestmark = pytest.mark.e2e  # one worker runs this module (conftest.ONE_WORKER_MODULES)
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium: Playwright cannot download browsers here
# Flags for a sandboxed CI container with no network beyond loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
CANDIDATES = 8  # pictures asked of the JSON API, to upload one it answers a certain way


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
    pngs = [png_base64(image) for image in dataset.test_images[:CANDIDATES]]
    answers = requests.post(f"{ui_url}/predict", json={"images": pngs}, timeout=60).json()["results"]
    index = next(i for i, answer in enumerate(answers) if answer["in_distribution"])  # a garment taken as one
    expected = answers[index]["class_name"]
    image = tmp_path / "garment.png"
    image.write_bytes(base64.b64decode(pngs[index]))
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


def test_a_picture_that_is_not_clothing_is_said_to_be_so(page, ui_url, tmp_path):
    """A picture the model flags as not clothing (a drawn shape) gets a card that says so plainly, with the
    model's best guess shown muted beneath, not as the answer."""
    pngs = [encode(picture) for picture in outliers.shapes(CANDIDATES, 0)]
    answers = requests.post(f"{ui_url}/predict", json={"images": pngs}, timeout=60).json()["results"]
    index = next(i for i, answer in enumerate(answers) if answer["in_distribution"] is False)
    image = tmp_path / "shape.png"
    image.write_bytes(base64.b64decode(pngs[index]))
    page.goto(ui_url)
    page.set_input_files("#files", str(image))
    card = page.locator(".card").first
    expect(card).to_be_visible(timeout=30_000)
    expect(card.locator(".prediction")).to_have_text("This does not look like a clothing item")
    expect(card.locator(".best-guess")).to_contain_text(f"best guess, if it were one: {answers[index]['class_name']} (")
    assert "rgb(148, 163, 184)" in card.locator(".bar.top").evaluate("bar => getComputedStyle(bar).backgroundColor")
    page.screenshot(path=str(ARTIFACTS / "ui_not_clothing.png"), full_page=True)


def _feedback_counts(ui_url: str) -> dict:
    """Corrections stored per model version, as the monitor reports them."""
    report = requests.get(f"{ui_url}/monitor.json", timeout=60).json()
    return {row["version"]: row["feedback"] for row in report["feedback"]}


def test_a_correction_round_trips_from_the_keyboard_and_shows_on_the_monitor_page(page, ui_url, dataset, tmp_path):
    """Under a prediction, "Wrong? Pick the right class" works from the keyboard alone (focus the select, arrow to
    another class, Tab to the button, Enter); the page confirms the class stored, the scoring server's log holds
    it (the monitor's feedback count rises), and the monitor page draws its statistics and plots."""
    before = _feedback_counts(ui_url)
    image = tmp_path / "garment.png"
    image.write_bytes(base64.b64decode(png_base64(dataset.test_images[0])))
    page.goto(ui_url)
    page.set_input_files("#files", str(image))
    card = page.locator(".card").first
    expect(card).to_be_visible(timeout=30_000)
    select = card.get_by_label("Wrong? Pick the right class:")
    predicted = int(select.input_value())
    select.focus()
    page.keyboard.press("ArrowDown" if predicted < 9 else "ArrowUp")
    chosen = int(select.input_value())
    assert chosen != predicted
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    names = requests.post(f"{ui_url}/predict", json={"images": [png_base64(dataset.test_images[0])]},
                          timeout=60).json()["class_names"]
    expect(card.locator(".feedback-status")).to_have_text(f"Thanks: recorded as {names[chosen]}", timeout=30_000)
    version = card.locator(".answered-by").inner_text().rsplit(" v", 1)[1]
    assert _feedback_counts(ui_url)[version] == before.get(version, 0) + 1

    page.goto(f"{ui_url}/monitor")
    expect(page.locator("#model")).to_contain_text("logged predictions in the window")
    expect(page.locator("#statistics tr")).not_to_have_count(1)  # a header and one row per statistic
    expect(page.locator("#plot-mix polyline")).to_have_count(10)
    expect(page.locator("#feedback")).to_contain_text(f"{version}")
    page.screenshot(path=str(ARTIFACTS / "ui_monitor.png"), full_page=True)


def test_the_feedback_form_post_needs_the_csrf_token(ui_url):
    """A cross-site form post to /feedback without the page's token is refused (403); the JSON API relays the
    scoring server's clear 4xx for an unknown prediction."""
    forged = requests.post(f"{ui_url}/feedback", data={"prediction_id": "x-0", "label": "1"}, timeout=30)
    assert forged.status_code == 403
    unknown = requests.post(f"{ui_url}/feedback", json={"prediction_id": "no-such-0", "label": 1}, timeout=30)
    assert unknown.status_code == 404 and "no logged prediction" in unknown.json()["message"]
