"""The page at ``/`` in headless Chromium (Debian's ``chromium`` and ``chromium-driver``), driven by Selenium.

Upload the portrait, wait for the results, check the three images and their
sizes, recompose over a colour and a blurred background in the browser (no
new request), use the keyboard, download the three results, show an API
error in words, clean the edge colours (``dc``) on request, and save a
screenshot in the test's temp folder.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import PORTRAIT, seed_synthetic_cache
from modnet_npu.service.child import ServerProcess

CHROMIUM = "/usr/bin/chromium"
REAL_MODEL = os.environ.get("MODNET_SCREENSHOT_MODEL")  # the README's screenshot: served with the real model
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1100"]
WAIT_S = 90.0  # every wait is bounded; generous for a busy 2-core machine


def _require_browser() -> None:
    """Skip, saying why, where no browser can be had (.ci/run installs Debian's)."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements-dev.txt)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"no browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")


def _start_chrome(options):
    """Chromium under chromedriver, or a skip with the first line of why it would not start."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    try:
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except (WebDriverException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split("; For documentation")[0]
        pytest.skip(f"no browser: chromium did not start ({first})")


@pytest.fixture(scope="module")
def page_server(flavour_files, tmp_path_factory):
    """serve.py as an offline machine runs it: the generated model, with its warning (or, for the README's
    screenshot, the real model file named by MODNET_SCREENSHOT_MODEL)."""
    _require_browser()
    models = tmp_path_factory.mktemp("models")
    seed_synthetic_cache(models, flavour_files)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    model = ["--model", REAL_MODEL] if REAL_MODEL else ["--offline", "--allow-synthetic"]
    args = ["--models-dir", str(models), *model, "--backend", "torch", "--device", "cpu", "--size", "256",
            "--threads", "1"]
    with ServerProcess(args, log_path=str(log)) as proc:
        yield proc


@pytest.fixture()
def browser(tmp_path):
    _require_browser()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    # canvas downloads finish after toBlob, outside the key press's activation window on a
    # busy machine, and Chromium then asks before a second such download: allow them, as
    # a user answering that prompt would
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              "profile.default_content_setting_values.automatic_downloads": 1})
    driver = _start_chrome(options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver, downloads
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message=f"waiting for {what}")


# the largest difference between the result canvas and alpha*photo + (1 - alpha)*colour, in 8-bit levels
BLEND_ERROR_JS = """
const [r, g, b] = arguments[0];
const photo = document.getElementById('original');
const matte = document.getElementById('matte');
const result = document.getElementById('result');
const w = result.width, h = result.height;
function pixels(img) {
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h).data;
}
const p = pixels(photo), m = pixels(matte);
const out = result.getContext('2d').getImageData(0, 0, w, h).data;
let worst = 0, mixed = 0;
for (let i = 0; i < out.length; i += 4) {
  const a = m[i] / 255;
  if (a > 0.05 && a < 0.95) mixed++;
  const want = [p[i] * a + r * (1 - a), p[i + 1] * a + g * (1 - a), p[i + 2] * a + b * (1 - a)];
  for (let k = 0; k < 3; k++) worst = Math.max(worst, Math.abs(out[i + k] - want[k]));
  worst = Math.max(worst, Math.abs(out[i + 3] - 255));
}
return [worst, mixed];
"""

SIZES_JS = """
const box = (el) => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
const o = document.getElementById('original'), m = document.getElementById('matte'),
      c = document.getElementById('result');
return {original: [o.naturalWidth, o.naturalHeight, ...box(o)], matte: [m.naturalWidth, m.naturalHeight, ...box(m)],
        result: [c.width, c.height, ...box(c)]};
"""


def _served(url: str) -> int:
    return httpx.get(url + "/api/info", timeout=30).json()["requests_served"]


def _downloaded(folder: Path, names: list[str]) -> dict[str, Image.Image]:
    deadline = time.monotonic() + WAIT_S
    while not all((folder / n).exists() for n in names) or list(folder.glob("*.crdownload")):
        assert time.monotonic() < deadline, f"downloads missing: {sorted(os.listdir(folder))}"
        time.sleep(0.1)
    return {n: Image.open(folder / n) for n in names}


def _check_downloads(driver, folder: Path) -> None:
    """The three download buttons, pressed from the keyboard, save the matte, the cutout and the composite."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    for button in ("dl-matte", "dl-cutout", "dl-composite"):
        driver.find_element(By.ID, button).send_keys(Keys.ENTER)
    files = _downloaded(folder, ["portrait_astronaut_matte.png", "portrait_astronaut_cutout.png",
                                 "portrait_astronaut_composite.png"])
    assert files["portrait_astronaut_matte.png"].size == (512, 512)
    assert files["portrait_astronaut_cutout.png"].mode == "RGBA"
    cutout = np.asarray(files["portrait_astronaut_cutout.png"])
    matte = np.asarray(files["portrait_astronaut_matte.png"].convert("L"))
    assert np.abs(cutout[..., 3].astype(int) - matte).max() <= 1  # the cutout's alpha is the matte
    assert files["portrait_astronaut_composite.png"].size == (512, 512)


def _tab_stops(driver, presses: int = 20) -> list[str]:
    """The id (or value) of each element Tab lands on, from the top of the page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    reached = []
    for _ in range(presses):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        reached.append(driver.execute_script("const e = document.activeElement; return e.id || e.value;"))
    return reached


def test_page_uploads_shows_recomposes_downloads(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, downloads = browser
    driver.get(page_server.url + "/")
    _wait(driver, lambda d: "torch on cpu" in d.find_element(By.ID, "server-info").text, "the server's engine")
    warning = driver.find_element(By.ID, "warning")
    if REAL_MODEL:
        assert not warning.is_displayed()  # a real model file: nothing to announce
    else:
        assert warning.is_displayed() and "GENERATED" in warning.text  # the synthetic model is announced

    driver.find_element(By.ID, "file").send_keys(str(PORTRAIT))
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", "the results")
    status = driver.find_element(By.ID, "status").text
    assert "Done in" in status and "model input 256x256" in status and "torch / cpu" in status

    sizes = driver.execute_script(SIZES_JS)
    for name, (w, h, shown_w, shown_h) in sizes.items():
        assert (w, h) == (512, 512), name  # each at the photo's own size
        assert shown_w > 150 and abs(shown_w - shown_h) <= 1, (name, shown_w, shown_h)  # on screen, square
    served = _served(page_server.url)

    # a colour: the result is the blend of photo and colour by the matte
    driver.execute_script("const c = document.getElementById('bg-colour'); c.value = '#00ff00';"
                          "c.dispatchEvent(new Event('input', {bubbles: true}));")
    assert driver.find_element(By.ID, "result").get_attribute("data-background") == "colour"
    worst, mixed = driver.execute_script(BLEND_ERROR_JS, [0, 255, 0])
    assert mixed > 100 and worst <= 3, (worst, mixed)
    colour_shot = driver.execute_script("return document.getElementById('result').toDataURL()")

    # by keyboard: focus the "Blurred photo" radio and press space
    driver.find_element(By.CSS_SELECTOR, 'input[name="bg"][value="blur"]').send_keys(Keys.SPACE)
    _wait(driver, lambda d: d.find_element(By.ID, "result").get_attribute("data-background") == "blur", "blur")
    assert driver.execute_script("return document.getElementById('result').toDataURL()") != colour_shot
    assert "blurred" in driver.find_element(By.ID, "result-caption").text.lower()
    assert _served(page_server.url) == served  # recomposed in the browser, no request

    _check_downloads(driver, downloads)
    reached = _tab_stops(driver)  # the page is usable by keyboard: Tab reaches every control
    assert {"file", "dc", "bg-colour", "bg-file", "dl-matte", "dl-cutout", "dl-composite"} <= set(reached), reached

    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
    if os.environ.get("MODNET_SCREENSHOT"):  # how the README's screenshot is made
        shutil.copy(shot, os.environ["MODNET_SCREENSHOT"])


def test_page_shows_api_errors_in_words(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver, _ = browser
    driver.get(page_server.url + "/")
    fake = tmp_path / "holiday.png"  # an image by its name, text inside: only the server can tell
    fake.write_text("this is not a picture\n" * 20)
    driver.find_element(By.ID, "file").send_keys(str(fake))
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error", "the error")
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert "not an image the server can read (HTTP 415)" in error.text
    assert driver.find_element(By.ID, "results").get_attribute("hidden") is not None


# the cutout shown (the result canvas over no background) and the matte shown, as PNG data URLs
SHOWN_JS = """
const matte = document.getElementById('matte');
const c = document.createElement('canvas'); c.width = matte.naturalWidth; c.height = matte.naturalHeight;
c.getContext('2d').drawImage(matte, 0, 0);
return [document.getElementById('result').toDataURL('image/png'), c.toDataURL('image/png')];
"""


def _shown(driver) -> tuple[np.ndarray, np.ndarray]:
    """(the cutout on the page as RGBA, the matte on the page as grey levels)."""
    _wait(driver, lambda d: d.execute_script("return document.getElementById('matte').complete"), "the matte")
    urls = driver.execute_script(SHOWN_JS)
    cutout, matte = (Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls)
    return np.asarray(cutout.convert("RGBA")).astype(int), np.asarray(matte.convert("L")).astype(int)


def test_page_cleans_edge_colours_when_asked(page_server, browser):
    """The "Clean edge colours" box asks the server for its dc cutout (one request, the same photo again):
    the page then shows the server's decontaminated colours, with the same matte."""
    # the server runs in this Python: without pymatting it answers dc with 501, which the page says in words
    pytest.importorskip("pymatting", reason="dc needs pymatting (requirements-bench.txt); the server would answer 501")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, _ = browser
    driver.get(page_server.url + "/")
    _wait(driver, lambda d: "torch on cpu" in d.find_element(By.ID, "server-info").text, "the server's engine")
    driver.find_element(By.ID, "file").send_keys(str(PORTRAIT))
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", "the results")
    plain, matte = _shown(driver)
    served = _served(page_server.url)

    driver.find_element(By.ID, "dc").send_keys(Keys.SPACE)  # by keyboard
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-clean") == "yes"
          and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", "the cleaned results")
    assert _served(page_server.url) == served + 1 and "edge colours cleaned" in driver.find_element(By.ID, "status").text
    clean, clean_matte = _shown(driver)
    ours = httpx.post(page_server.url + "/api/matte", params={"mode": "cutout", "dc": "true"},
                      files={"file": ("p.jpg", PORTRAIT.read_bytes())}, timeout=WAIT_S)
    server = np.asarray(Image.open(io.BytesIO(ours.content))).astype(int)
    assert np.array_equal(clean_matte, matte) and np.array_equal(clean[..., 3], server[..., 3])  # the same matte
    # the page shows the server's cleaned colours (a canvas keeps them premultiplied: within a level or two
    # where alpha >= 128), which differ from the photo's at the soft edges
    visible = server[..., 3] >= 128
    assert np.abs(clean[visible, :3] - server[visible, :3]).max() <= 2
    soft = visible & (server[..., 3] < 250)
    moved = np.abs(server[..., :3] - plain[..., :3]).max(axis=2) > 8
    assert (soft & moved).sum() > 50, (soft.sum(), (soft & moved).sum())
    assert np.abs(clean[soft & moved, :3] - plain[soft & moved, :3]).max(axis=1).min() > 4

    driver.find_element(By.ID, "dc").send_keys(Keys.SPACE)  # and back: the plain cutout again
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-clean") == "no"
          and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", "the plain results")
    again, _ = _shown(driver)
    assert np.array_equal(again, plain)
