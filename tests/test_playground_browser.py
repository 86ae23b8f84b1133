"""The playground page in a real headless Chromium (Debian chromium + chromium-driver, selenium).

Against a live server behind an API key: the page loads the model, the key goes in its field, a
prompt is submitted, the canvas animates from the per-step stream, and the final answer equals the
API's answer for the same request. A screenshot is saved (to docs/playground.png when
LLADA_SAVE_SCREENSHOT=1, otherwise to the test's temporary directory).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from sampler.scheduler import EngineConfig
from server.app import create_app
import system_tools
from weights import default_model_path
from weights.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
KEY = "play-key"

@pytest.fixture(autouse=True, scope="module")
def _needs_chromium():
    """Skips the module without Chromium and its driver (fails under CI=true), saying how to install them."""
    system_tools.require("chromium", "chromium-browser", "google-chrome")
    system_tools.require("chromedriver")


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_model):
    default = default_model_path()
    return default if (default / "config.json").is_file() else tiny_tokenizer_model


@pytest.fixture(scope="module")
def server(model_dir, serve):
    bundle = load_checkpoint(model_dir, device="cpu", dtype="float32")
    return serve(bundle, "playground", max_batch_tokens=4096, api_key=KEY)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,860", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fill(driver, element_id: str, value):
    el = driver.find_element("id", element_id)
    el.clear()
    if value != "":
        el.send_keys(str(value))


def test_playground_unmasks_to_the_api_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert browser.title == "llada-serve playground"
    # Without the key the model list is refused; with it the page learns the model.
    fill(browser, "api-key", KEY)
    browser.find_element(By.ID, "prompt").click()  # blur the key field: the page reloads the model
    wait_for(lambda: browser.find_element(By.ID, "model-name").text.startswith("playground"), 15,
             "the model name")
    prompt = "Reverse the list: a b c d e"
    settings = {"max-tokens": 32, "steps": 32, "block-length": 8, "temperature": 0, "threshold": "",
                "seed": "", "delay": 60}
    fill(browser, "prompt", prompt)
    for k, v in settings.items():
        fill(browser, k, v)
    chat = browser.find_element(By.ID, "chat").is_selected()
    browser.find_element(By.ID, "generate").click()

    def step():
        try:
            return int(browser.find_element(By.ID, "step-counter").text)
        except ValueError:
            return 0
    # Mid-diffusion: some positions are still masked, the step's new tokens are highlighted.
    wait_for(lambda: step() >= 12, 30, "step 12")
    cells = browser.find_elements(By.CSS_SELECTOR, "#canvas .tok")
    assert len(cells) == 32
    # One atomic read of the canvas (it keeps changing while the steps arrive).
    masked, new = browser.execute_script(
        "const q = (s) => [...document.querySelectorAll(s)].map((e) => e.textContent);"
        "return [q('#canvas .tok.mask'), q('#canvas .tok.new')];")
    assert 0 < len(masked) < 32 and set(masked) == {"\u2591"}
    assert new
    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("LLADA_SAVE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "playground.png")

    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "running", 60,
             "the last step")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "error").text
    assert step() == 32
    assert not browser.find_elements(By.CSS_SELECTOR, "#canvas .tok.mask")
    # Confidence shows as opacity and in the tooltip.
    first = browser.find_elements(By.CSS_SELECTOR, "#canvas .tok")[0]
    assert "confidence" in first.get_attribute("title")
    assert 0.35 <= float(first.value_of_css_property("opacity")) <= 1.0
    shown = browser.find_element(By.ID, "answer").get_attribute("textContent")

    body = {"model": "playground", "max_tokens": 32, "steps": 32, "block_length": 8, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"})
        want = r.json()["choices"][0]["message"]["content"]
    else:
        body["prompt"] = prompt
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"})
        want = r.json()["choices"][0]["text"]
    assert r.status_code == 200
    assert shown == want


def test_playground_with_token_id_prompts(golden_dir, live_server, browser):
    from selenium.webdriver.common.by import By

    bundle = load_checkpoint(golden_dir, device="cpu", dtype="float32")
    srv = live_server(create_app(bundle, EngineConfig(max_batch_tokens=1024), served_model_name="golden"))
    browser.get(srv.url + "/playground")
    wait_for(lambda: "no tokenizer" in browser.find_element(By.ID, "model-name").text, 15, "the model info")
    assert not browser.find_element(By.ID, "chat").is_enabled()
    fill(browser, "api-key", "")
    fill(browser, "prompt", "5, 17, 42")
    for k, v in {"max-tokens": 16, "steps": 8, "block-length": 8, "temperature": 0, "threshold": "",
                 "seed": "", "delay": 0}.items():
        fill(browser, k, v)
    browser.find_element(By.ID, "generate").click()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") not in ("idle", "running"),
             60, "the last step")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
    assert browser.find_element(By.ID, "step-counter").text == "8"
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
        "prompt": [5, 17, 42], "max_tokens": 16, "steps": 8, "block_length": 8, "temperature": 0})
    assert browser.find_element(By.ID, "answer").get_attribute("textContent") == r.json()["choices"][0]["text"]
