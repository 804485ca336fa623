"""The web page at GET / in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
which `./dev setup` installs) driven by selenium, against a real gateway, a worker with the demo model
and a real Redis. Without chromium the browser tests are skipped, except under CI (CI=true), where a
missing browser is a broken setup and fails.

LDM_PAGE_SCREENSHOTS=docs also refreshes the README's screenshots (docs/page-desktop.png, page-phone.png).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from service.ldm.request import GenerationRequest
from service.paths import bundled_model
from service.queue import keys

from .gateway_env import GatewayProcess
from .redis_server import RedisServer
from .workers import WorkerProcess

pytestmark = pytest.mark.slow
MODEL = "shapes"
KEY = "page-test-key"
LONG_STEPS = 500  # at 128x128: a job that runs long enough (~50 s) to be seen running, and cancelled


def _chromium() -> tuple[str, str]:
    """The browser and its driver from Debian's packages, or skip (fail under CI) saying what is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if browser and driver:
        return browser, driver
    reason = "chromium and chromium-driver are not installed (./dev setup installs them with apt-get)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}: CI must run the browser tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chrome() -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = _chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--hide-scrollbars", "--no-first-run"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for script errors
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


class Stack:
    def __init__(self, redis_server: RedisServer, gateway: GatewayProcess, keyed: GatewayProcess) -> None:
        self.redis = redis_server.client()
        self.gateway = gateway
        self.keyed = keyed  # the same queue behind a gateway with LDM_API_KEYS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model = bundled_model()
    if not model.is_dir():
        pytest.skip("the demo model is not in models/")
    folder = tmp_path_factory.mktemp("page")
    server = RedisServer(folder / "redis")
    server.start()
    # One job at a time, so that a second job waits in the queue behind a long one.
    worker = WorkerProcess("w1", server.url, {MODEL: model}, folder, max_batch=1, max_wait_ms=0).start()
    limits = {"LDM_MAX_STEPS": str(LONG_STEPS), "LDM_MAX_BACKLOG": "2"}
    gateway = GatewayProcess(server.url, {MODEL: model}, folder, env=limits)
    keyed = GatewayProcess(server.url, {MODEL: model}, folder, env={"LDM_API_KEYS": KEY})
    try:
        gateway.start()
        keyed.start()
        worker.wait_ready(server.client())
        yield Stack(server, gateway, keyed)
    finally:
        worker.stop()
        gateway.stop()
        keyed.stop()
        server.kill()
        print(gateway.log()[-3000:], worker.log()[-3000:])  # shown when a test fails


@pytest.fixture
def browser(chrome: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The browser, checked after the test for script errors in the console (an API's 4xx answers are
    logged by the browser itself, and expected)."""
    chrome.get_log("browser")
    yield chrome
    errors = [
        entry["message"]
        for entry in chrome.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    assert not errors, errors


# --- helpers -------------------------------------------------------------------------------------


def until(driver: WebDriver, condition: Callable[[], Any], timeout_s: float = 20, what: str = "") -> Any:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(lambda _: condition(), what)


def css(driver: WebDriver, selector: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver: WebDriver, selector: str) -> list[WebElement]:
    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def open_page(driver: WebDriver, url: str, *, ready: bool = True) -> None:
    """A fresh page: nothing stored from an earlier test (key, jobs of the session)."""
    driver.get(f"{url}/healthz")
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.get(f"{url}/")
    if ready:
        until(driver, lambda: css(driver, "#generate-button").is_enabled(), what="the models to load")


def fill(driver: WebDriver, **fields: str | int) -> None:
    for name, value in fields.items():
        box = css(driver, f"#{name}")
        box.clear()
        box.send_keys(str(value))


def runs(driver: WebDriver) -> list[WebElement]:
    return all_css(driver, "#runs > li.run")


def figure_status(run: WebElement) -> tuple[str, str]:
    figure = run.find_element(By.CSS_SELECTOR, "figure.job")
    return str(figure.get_attribute("data-status")), str(figure.find_element(By.CSS_SELECTOR, ".status").text)


def paint_stroke(driver: WebDriver, canvas: WebElement, start: float, end: float) -> None:
    """A mouse drag along the canvas's middle, from `start` to `end` (fractions of its width from the
    centre); scrolled into view first, since actions aim at the visible part of an element."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    width = canvas.rect["width"]
    chain = ActionChains(driver).move_to_element_with_offset(canvas, int(start * width), 0).click_and_hold()
    step = int((end - start) * width / 2)
    chain.move_by_offset(step, 2).move_by_offset(step, -2).release().perform()


def shown_png(driver: WebDriver, figure: WebElement) -> bytes:
    """The bytes behind the image the page shows (its blob: URL), as the page fetched them."""
    script = """
        const [img, done] = arguments;
        fetch(img.src).then(r => r.arrayBuffer()).then(buffer => {
            let binary = ""; for (const b of new Uint8Array(buffer)) binary += String.fromCharCode(b);
            done(btoa(binary));
        }).catch(error => done("error: " + error));
    """
    data = driver.execute_async_script(script, figure.find_element(By.CSS_SELECTOR, "img"))
    assert not data.startswith("error"), data
    return base64.b64decode(data)


def wait_shown(driver: WebDriver, run: WebElement, timeout_s: float = 30) -> WebElement:
    figure = run.find_element(By.CSS_SELECTOR, "figure.job")
    until(driver, lambda: figure.get_attribute("data-shown") == "true", timeout_s, "the image to show")
    return figure


def model_info(stack: Stack) -> dict[str, Any]:
    models = httpx.get(f"{stack.gateway.url}/v1/models", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == MODEL)


# --- tests ---------------------------------------------------------------------------------------


def test_the_page_is_served_self_contained(stack: Stack) -> None:
    page = httpx.get(f"{stack.gateway.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert {"/static/page.js", "/static/page.css"} <= set(assets)
    for asset in ["/static/api.js", "/static/jobs.js", "/static/mask.js", *assets]:
        reply = httpx.get(f"{stack.gateway.url}{asset}", timeout=10)
        assert reply.status_code == 200, asset
        assert not re.search(r"https?://", reply.text), f"{asset} refers to another origin"
    assert "/" not in httpx.get(f"{stack.gateway.url}/openapi.json", timeout=10).json()["paths"]


def test_generate_shows_the_apis_image_for_its_seed(browser: WebDriver, stack: Stack) -> None:
    open_page(browser, stack.gateway.url)
    model = model_info(stack)
    assert css(browser, "#model").get_attribute("value") == MODEL
    assert css(browser, "#width").get_attribute("value") == str(model["width"])
    assert css(browser, "#steps").get_attribute("value") == str(model["default_steps"])
    # A 422 is shown next to the field it names, and nothing is enqueued.
    fill(browser, prompt="a large red circle on the left", width=model["width"] + 1)
    css(browser, "#generate-button").click()
    width_error = css(browser, '[data-error-for="width"]')
    until(browser, lambda: "multiple" in width_error.text, what="the width's error")
    assert not runs(browser)

    fill(browser, width=model["width"], seed=7)
    assert not css(browser, "#random-seed").is_selected()
    css(browser, "#generate-button").click()
    until(browser, lambda: runs(browser), what="the job's card")
    assert width_error.text == ""
    figure = wait_shown(browser, runs(browser)[0])
    assert figure.get_attribute("data-seed") == "7" and "seed 7" in figure.text
    page_png = shown_png(browser, figure)
    link = figure.find_element(By.CSS_SELECTOR, "a.download")
    assert link.get_attribute("download") == "ldm-7.png"
    assert link.get_attribute("href") == figure.find_element(By.CSS_SELECTOR, "img").get_attribute("src")

    body = {
        "prompt": "a large red circle on the left",
        "negative_prompt": "",
        "model": MODEL,
        "width": model["width"],
        "height": model["height"],
        "steps": model["default_steps"],
        "sampler": model["default_sampler"],
        "guidance_scale": model["default_guidance_scale"],
        "seed": 7,
    }
    api = httpx.post(
        f"{stack.gateway.url}/v1/txt2img", json=body, headers={"Accept": "image/png"}, timeout=30
    )
    assert api.status_code == 200, api.text
    assert page_png == api.content

    # The session's jobs survive a reload: followed again from their replayed events.
    browser.refresh()
    until(browser, lambda: runs(browser), what="the restored card")
    assert shown_png(browser, wait_shown(browser, runs(browser)[0])) == page_png


def test_queue_position_progress_429_and_cancel(browser: WebDriver, stack: Stack) -> None:
    open_page(browser, stack.gateway.url)
    native = {name: css(browser, f"#{name}").get_attribute("value") for name in ("width", "height", "steps")}
    fill(browser, prompt="a small blue square at the top", steps=LONG_STEPS, width=128, height=128, seed=1)
    css(browser, "#generate-button").click()
    until(browser, lambda: runs(browser), what="the long job's card")
    long_run = runs(browser)[0]
    pattern = rf"step \d+ of {LONG_STEPS}"
    until(browser, lambda: re.fullmatch(pattern, figure_status(long_run)[1]), what="progress of the long job")

    fill(browser, **native)
    css(browser, "#generate-button").click()
    until(browser, lambda: len(runs(browser)) == 2, what="the second job's card")
    waiting = runs(browser)[0]  # newest first
    until(browser, lambda: figure_status(waiting)[1] == "queued · next in line", what="the queue position")

    # The backlog bound (LDM_MAX_BACKLOG=2) is full: a 429, shown as a notice with its Retry-After.
    css(browser, "#generate-button").click()
    notice = css(browser, "#notice")
    until(browser, lambda: notice.is_displayed(), what="the queue-full notice")
    assert "is full" in notice.text and re.search(r"(again in \d+ s|try again now)\.$", notice.text)
    assert len(runs(browser)) == 2

    long_run.find_element(By.CSS_SELECTOR, "button.cancel").click()
    until(browser, lambda: figure_status(long_run) == ("cancelled", "cancelled"), what="the cancellation")
    assert not long_run.find_element(By.CSS_SELECTOR, "button.cancel").is_displayed()
    assert 0 < int(long_run.find_element(By.CSS_SELECTOR, "progress").get_attribute("value")) < LONG_STEPS
    wait_shown(browser, waiting)
    assert figure_status(waiting)[0] == "succeeded"


def test_inpainting_with_a_painted_mask(browser: WebDriver, stack: Stack, tmp_path: Path) -> None:
    init = Image.new("RGB", (64, 48), (40, 90, 200))
    init.paste((230, 230, 230), (20, 12, 44, 36))
    init.save(tmp_path / "init.png")
    open_page(browser, stack.gateway.url)
    css(browser, "#image-panel summary").click()
    css(browser, "#init-file").send_keys(str(tmp_path / "init.png"))
    canvas = css(browser, "#mask-canvas")
    until(browser, lambda: canvas.is_displayed(), what="the image editor")
    width = int(css(browser, "#width").get_attribute("value"))
    height = int(css(browser, "#height").get_attribute("value"))
    assert width % model_info(stack)["size_multiple"] == 0 and abs(width / height - 64 / 48) < 0.2

    paint_stroke(browser, canvas, -0.25, 0.25)  # across the middle of the image, left to right
    fill(browser, prompt="a small green triangle at the top", seed=3)
    css(browser, "#generate-button").click()
    until(browser, lambda: runs(browser), what="the inpainting job's card")
    run = runs(browser)[0]
    assert "inpainting" in run.text
    figure = wait_shown(browser, run)
    assert Image.open(io.BytesIO(shown_png(browser, figure))).size == (width, height)

    # What the page sent, as the queue holds it: the mask is white along the stroke, black elsewhere.
    raw = stack.redis.hget(keys.job(str(figure.get_attribute("data-job-id"))), "spec")
    assert isinstance(raw, bytes)
    spec = GenerationRequest.from_json(raw)
    assert spec.init_image is not None and spec.mask is not None and spec.seed == 3
    assert Image.open(io.BytesIO(spec.init_image)).size == (width, height)
    mask = Image.open(io.BytesIO(spec.mask)).convert("L")
    assert mask.size == (width, height)
    assert mask.getpixel((width // 2, height // 2)) > 200  # painted
    assert max(mask.getpixel((x, y)) for x in (0, width - 1) for y in (0, height - 1)) < 50  # corners kept


def test_api_keys_a_wrong_key_shows_the_message(browser: WebDriver, stack: Stack) -> None:
    open_page(browser, stack.keyed.url, ready=False)
    message = css(browser, "#key-message")
    until(browser, lambda: "API key is required" in message.text, what="the key's message")
    assert css(browser, "#key-form").is_displayed() and not css(browser, "#generate-button").is_enabled()
    fill(browser, **{"api-key": "wrong"})
    css(browser, "#key-form button").click()
    until(browser, lambda: "invalid API key" in message.text, what="the wrong key's message")
    fill(browser, **{"api-key": KEY})
    css(browser, "#key-form button").click()
    until(browser, lambda: css(browser, "#generate-button").is_enabled(), what="the models with the key")
    assert browser.execute_script("return localStorage.getItem('ldm.apiKey')") == KEY
    browser.refresh()  # the key is kept
    until(browser, lambda: css(browser, "#generate-button").is_enabled(), what="the models after a reload")
    assert css(browser, "#model").get_attribute("value") == MODEL


@pytest.mark.skipif(not os.environ.get("LDM_PAGE_SCREENSHOTS"), reason="set LDM_PAGE_SCREENSHOTS=docs")
def test_screenshots_for_the_readme(browser: webdriver.Chrome, stack: Stack, tmp_path: Path) -> None:
    """The README's screenshots: the page at desktop and phone width after generating images."""
    folder = Path(os.environ["LDM_PAGE_SCREENSHOTS"])
    folder.mkdir(parents=True, exist_ok=True)
    # Its own gateway on the same queue, without the small backlog bound of the other tests.
    gateway = GatewayProcess(stack.gateway.redis_url, stack.gateway.models, tmp_path).start()
    try:
        emulate(browser, 1280, 900, scale=1, mobile=False)
        open_page(browser, gateway.url)
        total = 0
        for prompt, seed, n in [
            ("a small green triangle at the top on a gray background", 11, 2),
            ("a large red circle on the left", 1, 4),
        ]:
            fill(browser, prompt=prompt, seed=seed, n=n)
            total += n
            css(browser, "#generate-button").click()
            until(browser, lambda want=total: len(all_css(browser, SHOWN)) == want, 60, "the images")
        # Inpainting: the newest circle as the init image, a stroke over the circle, another prompt.
        all_css(browser, "button.reuse")[0].click()
        canvas = css(browser, "#mask-canvas")
        until(browser, lambda: canvas.is_displayed(), what="the image editor")
        browser.execute_script("document.getElementById('brush').value = 60")
        paint_stroke(browser, canvas, -0.3, -0.05)
        fill(browser, prompt="a large blue circle on the left", seed=5, n=1)
        css(browser, "#generate-button").click()
        until(browser, lambda: len(all_css(browser, SHOWN)) == total + 1, 60, "the inpainted image")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        emulate(browser, 1280, int(height), scale=1, mobile=False)  # the whole page
        browser.save_screenshot(str(folder / "page-desktop.png"))
        emulate(browser, 390, 844, scale=2, mobile=True)  # a phone: the Generate button, then the jobs
        browser.execute_script("document.getElementById('generate-button').scrollIntoView()")
        browser.save_screenshot(str(folder / "page-phone.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        gateway.stop()


SHOWN = "figure.job[data-shown='true']"


def emulate(driver: webdriver.Chrome, width: int, height: int, *, scale: float, mobile: bool) -> None:
    metrics = {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
