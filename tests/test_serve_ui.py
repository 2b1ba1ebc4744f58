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


def test_the_edit_tab_runs_img2img_and_inpaint_through_the_same_engine(ui_server, tmp_path):
    from gradio_client import Client, handle_file

    red = tmp_path / "red.png"
    Image.new("RGB", (80, 48), (220, 30, 30)).save(red)
    client = Client(ui_server.url + "/ui/", headers=AUTH, verbose=False)
    gallery, info = client.predict([handle_file(str(red))], None, 0.8, "a red hat", "", "64x64", 3, 5, 4.0, 1,
                                   api_name="/edit")
    assert "img2img of 1 image(s), strength 0.8" in gallery[0]["caption"] and "seed 5" in gallery[0]["caption"]
    r = httpx.post(ui_server.url + "/v1/images/edits", headers=AUTH, timeout=60, files={"image": red.read_bytes()},
                   data={"prompt": "a red hat", "size": "64x64", "num_inference_steps": "3", "seed": "5",
                         "strength": "0.8"})
    want = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"]).convert("RGB")), want)  # the API's own result
    mask = tmp_path / "mask.png"
    Image.new("L", (80, 48), 255).save(mask)
    gallery, _ = client.predict([handle_file(str(red))], handle_file(str(mask)), 0.9, "a hat", "", "64x64", 3, 1,
                                4.0, 1, api_name="/edit")
    assert "inpaint of 1 image(s)" in gallery[0]["caption"]
    with pytest.raises(Exception, match="image: 1 image"):  # no image: the server's own check, field named
        client.predict([], None, 0.8, "a hat", "", "64x64", 3, 1, 4.0, 1, api_name="/edit")


def _open_ui(playwright, server, height: int):
    """The system chromium on the page, through the key link (it sets the cookie, then the page loads)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.goto(server.url + f"/ui?key={KEY}")
    return browser, page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt install chromium)")
def test_a_person_generates_an_image_in_a_real_browser(ui_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses the system chromium)")
    with sync_api.sync_playwright() as p:
        browser, page = _open_ui(p, ui_server, height=900)
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


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt install chromium)")
def test_a_person_edits_an_uploaded_image_in_a_real_browser(ui_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses the system chromium)")
    from qwen_image_trt.models.condition_images import condition_image

    upload = tmp_path / "photo.png"
    condition_image(3).save(upload)
    with sync_api.sync_playwright() as p:
        browser, page = _open_ui(p, ui_server, height=1100)
        page.get_by_role("tab", name="Edit").click()
        page.set_input_files("#qitrt-edit-images input[type=file]", str(upload))
        page.wait_for_selector("#qitrt-edit-images :text('photo.png')", timeout=30_000)
        page.fill("#qitrt-edit-prompt textarea", "the same scene in winter")
        page.click("#qitrt-edit-run")
        page.wait_for_selector("#qitrt-edit-gallery img", timeout=90_000)
        caption = page.inner_text("#qitrt-edit-gallery")
        assert "the same scene in winter" in caption and "img2img of 1 image(s)" in caption
        shot = tmp_path / "ui-edit.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    docs_shot = ROOT / "docs" / "ui-edit.png"
    if not docs_shot.exists():  # the committed screenshot is this test's; delete it to take a new one
        shutil.copy(shot, docs_shot)


@pytest.fixture(scope="module")
def lora_ui_server(tiny_checkpoint, tmp_path_factory):
    from qwen_image_trt.models.tiny import make_tiny_lora

    loras = tmp_path_factory.mktemp("loras")
    make_tiny_lora(tiny_checkpoint, loras / "style.safetensors", fmt="kohya", seed=3)
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("jobs"), "--ui", "--lora-dir", str(loras),
               "--default-size", "64x64", "--default-steps", "3", devices="cpu")
    yield s
    s.kill()


def test_the_lora_picker_sends_the_adapters_through_the_same_engine(lora_ui_server):
    """With --lora-dir the page offers the served adapters; a picked one runs as the API's `lora` field does."""
    from gradio_client import Client

    client = Client(lora_ui_server.url + "/ui/", headers=AUTH, verbose=False)
    gallery, _ = client.predict("a green ball", "", "64x64", 3, 11, 4.0, 1, ["style"], 0.8, api_name="/generate")
    assert "LoRA style:0.8" in gallery[0]["caption"]
    r = lora_ui_server.post({"prompt": "a green ball", "seed": 11, "size": "64x64", "num_inference_steps": 3,
                             "lora": "style:0.8"})
    want = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"]).convert("RGB")), want)
    plain, _ = client.predict("a green ball", "", "64x64", 3, 11, 4.0, 1, [], 0.8, api_name="/generate")
    assert "LoRA" not in plain[0]["caption"]
    assert not np.array_equal(np.asarray(Image.open(plain[0]["image"]).convert("RGB")), want)  # the adapter shows
