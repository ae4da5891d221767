"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Upload an image through the file input, wait for the PCA and attention maps and the neighbours to
render, take a screenshot and check the PCA region is a picture (several colours, pixel variance)
equal to what ``/v1/pca`` returns, and the attention region what ``/v1/attention`` returns; then
upload frames and wait for the PCA video. Chromium missing is a failure,
not a skip: ``scripts/setup.sh`` installs it.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from .conftest import Running, png_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 60


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                    "(scripts/setup.sh does it; or apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium manager must not fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,1400", "--force-device-scale-factor=1", "--force-color-profile=srgb"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _region(screenshot: Image.Image, element: object) -> np.ndarray:
    rect = element.rect  # CSS pixels; the device scale factor is forced to 1
    box = (round(rect["x"]), round(rect["y"]), round(rect["x"] + rect["width"]), round(rect["y"] + rect["height"]))
    return np.asarray(screenshot.convert("RGB").crop(box), dtype=np.int16)


def test_upload_shows_the_pca_and_attention_maps_and_the_neighbours(service: Running, browser: object,
                                                                    tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(service.url + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: "index 8 images" in d.find_element(By.ID, "model").text)
    upload = tmp_path / "query.png"
    shutil.copy(service.images[3], upload)
    driver.find_element(By.ID, "file").send_keys(str(upload))

    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "pca").get_attribute("data-ready"))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "attention").get_attribute("data-ready"))
    loaded = ("return Array.from(document.querySelectorAll('#neighbours img'))"
              ".filter(i => i.complete && i.naturalWidth > 0).length")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(loaded) == 5)
    assert driver.find_element(By.ID, "status").text == ""

    path = tmp_path / "page.png"
    assert driver.save_screenshot(str(path))
    screenshot = Image.open(path)
    pca = _region(screenshot, driver.find_element(By.ID, "pca"))  # (224 + border, 224 + border, 3)
    inner = pca[2:-2, 2:-2]
    colours = len(np.unique(inner.reshape(-1, 3), axis=0))
    assert colours >= 4 and inner.std() > 20, f"PCA region blank? {colours} colours, std {inner.std():.1f}; {path}"
    served = requests.post(service.url + "/v1/pca", files=[("images", ("q.png", upload.read_bytes(), "image/png"))],
                           timeout=30)
    expected = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"), dtype=np.int16)  # (224, 224, 3)
    shown = pca[1:-1, 1:-1]  # inside the 1 px border
    assert shown.shape == expected.shape
    assert np.abs(shown - expected).mean() < 3, f"the page does not show /v1/pca's picture; {path}"
    looked = requests.post(service.url + "/v1/attention", timeout=30,
                           files=[("images", ("q.png", upload.read_bytes(), "image/png"))])
    expected = np.asarray(Image.open(io.BytesIO(looked.content)).convert("RGB"), dtype=np.int16)
    shown = _region(screenshot, driver.find_element(By.ID, "attention"))[1:-1, 1:-1]
    assert shown.shape == expected.shape
    assert np.abs(shown - expected).mean() < 3, f"the page does not show /v1/attention's picture; {path}"
    caption = driver.find_element(By.ID, "attention-caption").text
    assert f"{looked.headers['X-High-Norm-Tokens']} high-norm patch tokens" in caption
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "attention-heads").get_attribute("data-ready"))
    width = driver.execute_script("return document.getElementById('attention-heads').naturalWidth")
    assert width == 224 * int(looked.headers["X-Attention-Heads"])  # /v1/attention?heads=true: a tile per head

    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#neighbours figcaption")]
    assert len(captions) == 5 and captions[0].startswith("#1") and "1.000" in captions[0]  # the image itself
    first = _region(screenshot, driver.find_elements(By.CSS_SELECTOR, "#neighbours img")[0])[2:-2, 2:-2]
    assert first.std() > 20  # a thumbnail, not an empty box


def test_frames_give_a_pca_video(service: Running, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(service.url + "/")
    frames = []
    for position in range(3):
        frame = tmp_path / f"frame{position}.png"
        frame.write_bytes(png_bytes(np.roll(np.asarray(Image.open(service.images[0])), 5 * position, axis=1)))
        frames.append(str(frame))
    driver.find_element(By.ID, "frames").send_keys("\n".join(frames))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "pca-video").get_attribute("data-ready"))
    assert "3 frames" in driver.find_element(By.ID, "pca-video-caption").text
    path = tmp_path / "video.png"
    driver.save_screenshot(str(path))
    region = _region(Image.open(path), driver.find_element(By.ID, "pca-video"))[2:-2, 2:-2]
    assert len(np.unique(region.reshape(-1, 3), axis=0)) >= 4 and region.std() > 20, path


def test_a_fine_tuned_model_lists_its_classes(finetuned: Path, image_folder: list[Path], browser: object,
                                             tmp_path: Path) -> None:
    """A fine-tuned model's page ranks the uploaded image's classes as ``/v1/classify`` does (k = 5
    asked, the model's 4 classes shown); no index: the neighbours say so, the classes are there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from serve.app import create_app
    from serve.model import load_served_model

    from .conftest import start_server

    server, thread, url = start_server(create_app(load_served_model(str(finetuned))))
    try:
        driver = browser
        driver.get(url + "/")
        WebDriverWait(driver, WAIT_S).until(lambda d: "4 classes" in d.find_element(By.ID, "model").text)
        upload = tmp_path / "query.png"
        shutil.copy(image_folder[2], upload)
        driver.find_element(By.ID, "file").send_keys(str(upload))
        WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classes li")) == 4)
        shown = [" ".join(item.text.split()) for item in driver.find_elements(By.CSS_SELECTOR, "#classes li")]
        ranked = requests.post(url + "/v1/classify", params={"k": 4}, timeout=10,
                               files=[("images", (upload.name, upload.read_bytes(), "image/png"))]).json()
        assert shown == [f"{hit['class']} {100 * hit['probability']:.1f} %" for hit in ranked["results"][0]]
        WebDriverWait(driver, WAIT_S).until(lambda d: "no index loaded" in d.find_element(By.ID, "status").text)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
