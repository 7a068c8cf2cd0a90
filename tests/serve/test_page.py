"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): type a prompt,
click Generate, see the images appear with their seeds and download links."""

from __future__ import annotations

import shutil

import pytest
from live_server import LiveServer

from t2i.serve import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver (Debian: apt-get install chromium "
    "chromium-driver; `make test` installs them when it runs as root)",
)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # the closed network refuses Chromium's background connections; these flags keep it from trying
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_type_a_prompt_click_and_see_images(browser, sd3_folder, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    # a batching window long enough to watch the page's progress indication while the request is queued
    cfg = ServeConfig(models=[sd3_folder], output_dir=tmp_path / "out", api_keys=["page-key"], batch_window_ms=1200)
    with LiveServer(create_app(cfg)) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 30)
        browser.find_element(By.ID, "apikey").send_keys("page-key")
        browser.find_element(By.ID, "prompt").send_keys("a red circle above a blue square")
        n = browser.find_element(By.ID, "n")
        n.clear()
        n.send_keys("2")
        browser.find_element(By.ID, "seed").send_keys("21")
        browser.find_element(By.ID, "go").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status-text"), "queued"))
        assert browser.find_element(By.ID, "bar").is_displayed() and not browser.find_element(By.ID, "go").is_enabled()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure img")) == 2)
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
                                 for im in d.find_elements(By.CSS_SELECTOR, "#gallery img")))  # fmt: skip
        imgs = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
        assert [browser.execute_script("return arguments[0].naturalWidth", im) for im in imgs] == [32, 32]
        captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        assert "seed 21" in captions[0] and "seed 22" in captions[1]
        links = browser.find_elements(By.LINK_TEXT, "download")
        assert [a.get_attribute("download") for a in links] == ["t2i-21.png", "t2i-22.png"]
        wait.until(EC.text_to_be_present_in_element((By.ID, "status-text"), "2 image(s)"))
        assert browser.find_element(By.ID, "go").is_enabled() and not browser.find_element(By.ID, "bar").is_displayed()
        assert browser.find_element(By.ID, "served").text == sd3_folder  # the model list loaded with the typed key
        options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#sampler option")]
        assert options[0] == "" and "heun" in options  # "default", then the server's samplers
        # an error is shown on the page, not swallowed
        browser.find_element(By.ID, "size").send_keys("30")
        browser.find_element(By.ID, "go").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status-text"), "400"))
        assert "square images" in browser.find_element(By.ID, "status-text").text
