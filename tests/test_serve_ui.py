"""`qitrt serve --ui`: the Gradio page on the real server, through the same engine as the API. One test drives it
in a real headless Chromium (Debian's `chromium`, through Playwright); it skips where either is missing."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import AUTH, KEY, Server

pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[ui]'")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def ui_server(tiny_checkpoint, tmp_path_factory):
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("jobs"), "--ui", "--default-size", "64x64",
               "--default-steps", "3", devices="cpu")
    yield s
    s.kill()


def api_image(server, prompt: str, seed: int) -> np.ndarray:
    r = server.post({"prompt": prompt, "seed": seed, "size": "64x64", "num_inference_steps": 3})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))


def test_the_page_needs_the_key_and_a_link_sets_it(ui_server):
    url = ui_server.url
    assert httpx.get(url + "/ui/").status_code == 401
    assert httpx.get(url + "/ui?key=wrong").status_code == 401
    r = httpx.get(url + f"/ui?key={KEY}")
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    page = httpx.get(url + "/ui/", cookies={"qitrt_key": KEY})
    assert page.status_code == 200 and "<html" in page.text
    assert httpx.get(url + "/metrics", cookies={"qitrt_key": KEY}).status_code == 401  # the cookie is for /ui only


def test_the_page_generates_through_the_servers_engine(ui_server):
    from gradio_client import Client

    client = Client(ui_server.url + "/ui/", headers=AUTH, verbose=False)
    gallery, info = client.predict("a green ball", "", "64x64", 3, 11, 4.0, 2, api_name="/generate")
    assert len(gallery) == 2 and "seed 11" in gallery[0]["caption"] and "seed 12" in gallery[1]["caption"]
    got = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    assert np.array_equal(got, api_image(ui_server, "a green ball", 11))  # the same request as the API's
    assert "worker 0" in info
    with pytest.raises(Exception, match="prompt: a non-empty string"):  # the server's own check, field named
        client.predict("   ", "", "64x64", 3, 1, 4.0, 1, api_name="/generate")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt install chromium)")
def test_a_person_generates_an_image_in_a_real_browser(ui_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses the system chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(ui_server.url + f"/ui?key={KEY}")  # the link sets the cookie, then the page loads
        page.wait_for_selector("#qitrt-prompt textarea", timeout=60_000)
        page.fill("#qitrt-prompt textarea", "a lighthouse at dusk, oil painting")
        page.click("#qitrt-generate")
        page.wait_for_selector("#qitrt-gallery img", timeout=90_000)
        caption = page.inner_text("#qitrt-gallery")
        assert "a lighthouse at dusk" in caption and "seed 0" in caption
        page.wait_for_function("document.querySelector('#qitrt-health').innerText.includes('queue')", timeout=10_000)
        assert "ready" in page.inner_text("#qitrt-health")
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert Image.open(shot).size[0] >= 1000
    docs_shot = ROOT / "docs" / "ui.png"
    if not docs_shot.exists():  # the committed screenshot is this test's; delete it to take a new one
        shutil.copy(shot, docs_shot)
