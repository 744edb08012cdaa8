"""The Gradio demo, mounted at /ui of a real server, driven with gradio_client and a headless Chromium."""

import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import BUNDLE, ROOT, Server

pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason=f"no bundle at {BUNDLE}")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gradio")  # the demo's temporary files, deleted after 2 s
    srv = Server(env={"GRADIO_TEMP_DIR": str(cache), "FLOWMAP_UI_CACHE_SECONDS": "2"}).wait_ready()
    srv.cache = cache
    yield srv
    log = srv.stop()
    assert "Traceback" not in log, log  # visitors' bad input never prints a traceback in the server log


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
    with pytest.raises(AppError, match="greater than maximum value 16"):
        client.predict("7", 100, 0, "1.5", 1, api_name="/generate")  # past the slider's range
    with pytest.raises(AppError, match="images: 2.5 is not a whole number"):
        client.predict("7", 2.5, 0, "1.5", 1, api_name="/generate")  # it would have made 2
    # NaN, which a JSON client cannot send but a hand-written call can: a message, and no traceback in the log
    call = httpx.post(client.src.rstrip("/") + "/gradio_api/call/generate",
                      content=b'{"data": ["7", 2, NaN, "1.5", 1, ""]}', headers={"content-type": "application/json"})
    events = httpx.get(client.src.rstrip("/") + f"/gradio_api/call/generate/{call.json()['event_id']}", timeout=30)
    assert "event: error" in events.text and "seed (-1 = random): nan is not a number it takes" in events.text
    with pytest.raises(AppError):
        client.predict("cat", 1, 0, "1.5", 1, api_name="/generate")  # not one of the classes


def test_behind_a_proxy_prefix_the_demo_keeps_its_slash_and_the_api_drops_one():
    """Under a proxy's root_path (uvicorn's path includes it), /api/ui/ is the demo's page, not a redirect to
    itself, and /api/v1/generate/ reaches /v1/generate."""
    import asyncio

    from serving import in_process

    async def scenario():
        async with in_process(mount_ui=True, root_path="/api") as (client, _):
            return (await client.get("/api/ui/"), await client.post("/api/v1/generate/", json={"labels": [1]}),
                    (await client.get("/api/metrics")).text)

    page, generated, metrics = asyncio.run(scenario())
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert generated.status_code == 200 and len(generated.json()["images"]) == 1
    # counted under the route's own path, not "other"
    assert 'flowmap_http_requests_total{route="/v1/generate",status="200"} 1.0' in metrics


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_temporary_image_files_do_not_pile_up(server, client):
    for seed in range(40):  # 40 generations, 40 distinct images: twice what may stay
        client.predict("5", 1, 1000 + seed, "1.5", 1, api_name="/generate")
    assert len(files_under(server.cache)) > 0  # Gradio did write them here
    give_up = time.monotonic() + 15
    while len(files_under(server.cache)) > 20:  # old files go every 2 s
        assert time.monotonic() < give_up, f"{len(files_under(server.cache))} files left in {server.cache}"
        time.sleep(0.5)


def test_with_api_keys_the_demo_asks_for_a_key_and_forwards_it():
    """On a server listening on another address than 127.0.0.1 (here 127.0.0.2), whose demo must call it there."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    srv = Server(env={"FLOWMAP_API_KEYS": "alpha, beta"}, api_key="alpha", host="127.0.0.2").wait_ready()
    try:
        anonymous = Client(srv.url + "/ui/", verbose=False)
        with pytest.raises(AppError, match="a valid API key is required"):
            anonymous.predict("7", 2, 5, "1.5", 1, api_name="/generate")
        with pytest.raises(AppError, match="a valid API key is required"):
            anonymous.predict("3", 256, 200, 0, "1.5", api_name="/search")
        with pytest.raises(AppError, match="a valid API key is required"):
            anonymous.predict("7", 2, 5, "1.5", 1, "gamma", api_name="/generate")  # a wrong key typed in
        gallery, _ = anonymous.predict("7", 2, 5, "1.5", 1, "beta", api_name="/generate")  # the key typed in
        assert len(gallery) == 2
        with_header = Client(srv.url + "/ui/", verbose=False, headers={"Authorization": "Bearer alpha"})
        gallery, _ = with_header.predict("7", 2, 5, "1.5", 1, api_name="/generate")
        assert len(gallery) == 2
        # Gradio's routes that take files (which the page never sends) write none for a visitor without a key
        for route, field in (("upload", "files"), ("upload/", "files"), ("process_recording", "video")):
            upload = httpx.post(f"{srv.url}/ui/gradio_api/{route}", files={field: ("a.bin", b"x" * 1000)})
            assert upload.status_code == 401, (route, upload.text)
        upload = httpx.post(srv.url + "/ui/gradio_api/upload", files={"files": ("a.bin", b"x" * 1000)},
                            headers={"Authorization": "Bearer beta"})
        assert upload.status_code == 200, upload.text
        refused = sum(srv.metric("flowmap_http_requests_total", route=route, status="401")
                      for route in ("/v1/generate", "/v1/search"))
        assert refused == 3  # the API itself turned the demo's keyless calls away
        # the page keeps no run history: Gradio's would store each call's inputs, the key among them, in the browser
        page = httpx.get(srv.url + "/ui/config", headers={"Authorization": "Bearer beta"}).json()
        assert page["run_history"] is False and "runs" not in page["footer_links"]
    finally:
        srv.stop()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_the_demo_reaches_a_server_on_this_machine_past_a_proxy_setting(server, monkeypatch):
    """Behind a corporate proxy (HTTP_PROXY set, no NO_PROXY), the mounted demo still calls its own server on
    loopback directly; a remote server's URL keeps the proxy."""
    from ui.demo import ApiClient, loopback

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    assert "student" in ApiClient(server.url).models()
    assert loopback("http://[::1]:8000") and loopback("http://localhost:1") and not loopback("http://10.0.0.7:80")


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


def test_one_page_over_two_servers(server, tiny_text_bundles):
    """`flowmap demo --url A --url B`: digits and a text bundle on one page, a tab each, each tab calling
    its own server (the second bundle's handlers are named after it)."""
    import socket

    import httpx
    from gradio_client import Client

    from ui.demo import build_demo

    text = Server("--no-ui", bundle=tiny_text_bundles["sd3"][0]).wait_ready()
    demo = None
    try:
        name = httpx.get(text.url + "/v1/models").json()["data"][0]["id"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        demo = build_demo([server.url, text.url])
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        digits, _ = client.predict("7", 2, 5, "1.5", 1, api_name="/generate")
        prompted, info = client.predict("a red circle left of a blue square", 2, 5, "1", 1,
                                        api_name=f"/generate_{name}")
    finally:
        if demo is not None:
            demo.close()
        text.stop()
    assert len(digits) == 2 and len(prompted) == 2
    assert "prompt `a red circle left of a blue square`" in info
    assert np.asarray(Image.open(digits[0]["image"])).shape[-1] == 3 and digits[0]["caption"] == "seed 5"


def test_the_sweeper_deletes_old_files_while_requests_add_new_ones(tmp_path):
    """Gradio's own deletion walks its live set of files while request threads add to it, and dies at the first
    clash; the demo's sweeper walks a copy, so a sweep meeting a growing set still deletes what it should."""
    import threading

    import gradio as gr

    from ui.temp_files import sweep

    with gr.Blocks() as demo:
        image = gr.Image()
    names = demo.temp_file_sets[0]
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"x")
    image.keep_in_cache.add(str(kept))  # an example image the page shows: never deleted
    paths = [tmp_path / f"{index}.png" for index in range(2000)]
    for path in paths:
        path.write_bytes(b"x")
    names.update(map(str, [*paths, kept]))
    assert sweep(demo, 3600) == 0 and all(path.exists() for path in paths)  # none is an hour old

    stop = threading.Event()

    def add() -> None:  # a request thread: a new name while the sweep walks the set
        index = 0
        while not stop.is_set():
            names.add(str(tmp_path / f"new-{index}.png"))
            index += 1

    adder = threading.Thread(target=add)
    adder.start()
    try:
        deleted = sweep(demo, None)
    finally:
        stop.set()
        adder.join()
    assert deleted >= len(paths) and not any(path.exists() for path in paths) and kept.exists()
    assert str(kept) in names and not names & set(map(str, paths))
