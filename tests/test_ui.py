"""The Gradio demo, mounted at /ui of a real server, driven with gradio_client and a headless Chromium."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import BUNDLE, ROOT, Server

pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server():
    srv = Server().wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url + "/ui/", verbose=False)


def test_generate_tab(client):
    gallery, info = client.predict("7", 4, 5, "1.5", 1, api_name="/generate")
    assert len(gallery) == 4
    assert "seeds: 5, 6, 7, 8" in info.lower() and "round trip" in info
    image = np.asarray(Image.open(gallery[0]["image"]))
    assert image.shape[:2] == (128, 128)  # shown large: 8x8 digits upscaled 16x by nearest neighbour
    # nearest-neighbour: every 16x16 block is one flat colour
    blocks = image.reshape(8, 16, 8, 16, -1)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_generate_is_reproducible_by_seed(client):
    first, _ = client.predict("3", 2, 11, "1", 2, api_name="/generate")
    again, _ = client.predict("3", 2, 11, "1", 2, api_name="/generate")
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(np.asarray(Image.open(a["image"])), np.asarray(Image.open(b["image"])))


def test_best_of_n_tab(client):
    gallery, chosen, random_image, report = client.predict("3", 12, 10, 0, "1.5", api_name="/search")
    assert len(gallery) == 12
    assert gallery[0]["caption"].startswith("★ chosen")  # best first, the chosen one marked
    scores = [float(re.search(r"log p = (\S+)", item["caption"]).group(1)) for item in gallery]
    assert scores == sorted(scores, reverse=True)
    assert chosen is not None and random_image is not None
    assert "Best-of-12" in report and "Random noise" in report and "network evaluations" in report


def test_api_errors_are_readable_messages(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict("7", 2, 2**63, "1.5", 1, api_name="/generate")  # a seed past the allowed range
    message = str(err.value)
    assert "every seed must lie in 0.." in message and "HTTP 422" in message and "Traceback" not in message


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_page_renders_the_gallery_after_a_click(server):
    playwright = pytest.importorskip("playwright.sync_api")
    shots = ROOT / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/ui/", wait_until="networkidle")
        page.click("#generate-button")
        page.wait_for_selector("#generate-gallery img", timeout=30_000)
        assert page.locator("#generate-gallery img").count() >= 1
        page.screenshot(path=str(shots / "demo-generate.png"), full_page=True)
        page.get_by_role("tab", name="Best-of-N").click()
        page.click("#search-button")
        page.wait_for_selector("text=chose seed", timeout=60_000)
        page.wait_for_timeout(500)  # let the two teacher images paint
        page.screenshot(path=str(shots / "demo-search.png"), full_page=True)
        browser.close()
    assert Path(shots / "demo-generate.png").stat().st_size > 10_000
