"""The chat page in a real browser: Debian's chromium + chromium-driver, headless, driven by
Selenium (`make test-browser` installs them). Type a question, wait for the streamed answer,
check it equals the API's answer at temperature 0, start a new chat, save a screenshot.

Skipped where no browser is installed. TINYLLM_SCREENSHOT=PATH also saves the screenshot
there (how docs/chat_page.png was made, with TINYLLM_CHAT_CKPT=a Q&A checkpoint)."""

from __future__ import annotations

import os
import shutil

import pytest
from serve_utils import CHAT_TEMPLATE, LiveServer, tiny_model, tiny_tokenizer

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # ~20 s: a browser starts

webdriver = pytest.importorskip("selenium.webdriver")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip(
        "needs chromium and chromedriver (apt-get install chromium chromium-driver, or "
        "`make test-browser`)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tinyllm.serve import Engine, Limits, create_app  # noqa: E402


def browser(profile) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=900,600",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)


def served():
    """A Q&A checkpoint when TINYLLM_CHAT_CKPT names one (for the README's screenshot), else
    the tests' tiny random model."""
    ckpt = os.environ.get("TINYLLM_CHAT_CKPT")
    if ckpt:
        from tinyllm.generate import load_for_generation

        return load_for_generation(ckpt, "cpu")
    tok = tiny_tokenizer()
    return tiny_model(tok.vocab_size), tok, CHAT_TEMPLATE


def test_page_streams_the_api_answer(tmp_path) -> None:
    model, tok, template = served()
    engine = Engine(model, tok, template, Limits())
    question = os.environ.get("TINYLLM_CHAT_QUESTION", "Who are you?")
    with LiveServer(create_app(engine, "tinyllm")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        expected = client.chat.completions.create(
            model="tinyllm",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=40,
        )
        expected = expected.choices[0].message.content
        driver = browser(tmp_path / "profile")
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "tinyllm" in d.find_element(By.ID, "model").text)
            for field, value in (("temperature", "0"), ("max_tokens", "40")):
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            driver.find_element(By.ID, "input").send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done=true]"))
            answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
            assert "error" not in answer.get_attribute("class")
            assert answer.get_property("textContent") == expected
            user = driver.find_element(By.CSS_SELECTOR, ".msg.user")
            assert user.get_property("textContent") == question
            shot = tmp_path / "chat_page.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
            if os.environ.get("TINYLLM_SCREENSHOT"):
                shutil.copy(shot, os.environ["TINYLLM_SCREENSHOT"])
            driver.find_element(By.ID, "new-chat").click()  # "new chat" empties the page
            assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        finally:
            driver.quit()
