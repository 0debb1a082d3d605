"""The explorer page in a real headless browser (Debian's chromium through selenium and
chromedriver; .ci/run installs them). What the page shows is held to the library: the
kept set of the top-p column to process_logits at the slider's setting, the generated
text to the API's own answer for the same request."""

from __future__ import annotations

import shutil

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

from live_server import LiveServer
from model.checkpoint import load_for_generation
from model.decoding import process_logits
from model.strategy import parse_strategy
from model.serve import ServeSettings, create_app

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a closed network, as root: no sandbox, and none of Chromium's own background
# connections (each would be refused, slowly).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1250")
PROMPT = "The "


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def settled(driver, timeout: float = 20) -> None:
    """Wait until the page has no request in flight."""
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.pending") == "0")


def shown_percent(p: float) -> str:
    """The page's rounding of a probability (percent() in explorer.html)."""
    return f"{100 * p:.1f}%" if p >= 0.1 else f"{100 * p:.2f}%"


def test_explorer_page_shows_what_the_library_computes(browser, tiny_checkpoint, tmp_path, monkeypatch):
    model, tokenizer, _ = load_for_generation(tiny_checkpoint, torch.device("cpu"))
    # Tokens shown in brackets: what the page shows of a token must be the server's display
    # string as it is, not one the page makes up (for most tokens the two would agree).
    display = tokenizer.display
    monkeypatch.setattr(tokenizer, "display", lambda token: f"[{display(token)}]")
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live:
        browser.get(live.url + "/")
        settled(browser)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys(PROMPT)
        WebDriverWait(browser, 10).until(lambda d: "context 4 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)

        # The model's candidates, most likely first.
        ids = tokenizer.encode(PROMPT)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1:].float()
        bars = [int(row.get_attribute("data-id")) for row in browser.find_elements(By.CSS_SELECTOR, "#candidates .row")]
        assert bars == torch.softmax(logits, -1)[0].argsort(descending=True)[:20].tolist()

        # Move the top-p slider with the keyboard: 0.9 -> 0.6 in steps of 0.01.
        slider = browser.find_element(By.ID, "knob-top-p")
        slider.send_keys(*[Keys.ARROW_LEFT] * 30)
        settled(browser)
        p = float(slider.get_attribute("value"))
        assert p == pytest.approx(0.6)
        kept_probs = torch.softmax(process_logits(logits, parse_strategy(f"top-p:p={p}"))[0].double(), -1)
        expected = [int(t) for t in kept_probs.argsort(descending=True) if kept_probs[t] > 0]
        assert len(expected) >= 2  # a setting that truncates something and keeps a choice
        column = browser.find_element(By.ID, "col-top-p")
        assert column.find_element(By.CLASS_NAME, "label").text == f"top-p:p={p:g}"
        rows = column.find_elements(By.CSS_SELECTOR, ".kept-list .row")
        assert [int(r.get_attribute("data-id")) for r in rows] == expected
        assert [r.find_element(By.CLASS_NAME, "pct").text for r in rows] == [
            shown_percent(kept_probs[t].item()) for t in expected]
        assert f"keeps {len(expected)} tokens" in column.find_element(By.CLASS_NAME, "summary").text

        # Click the second most likely candidate: it is appended to the context.
        second = browser.find_elements(By.CSS_SELECTOR, "#candidates .row")[1]
        token = int(second.get_attribute("data-id"))
        second.click()
        WebDriverWait(browser, 10).until(lambda d: "context 5 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        assert prompt.get_attribute("value") == PROMPT + tokenizer.decode([token])

        # Generate with the checked columns (greedy and top-p), side by side, streaming.
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs .run[data-done='1']")) == 2)
        settled(browser)
        context = PROMPT + tokenizer.decode([token])
        for strategy, fields in (("greedy", {"temperature": 0}), ("top-p", {"top_p": p})):
            run = browser.find_element(By.CSS_SELECTOR, f"#runs .run[data-strategy='{strategy}']")
            spans = run.find_elements(By.CSS_SELECTOR, ".out .tok")
            assert spans and all(s.get_attribute("data-alt") and s.get_attribute("data-p") for s in spans)
            answer = live.client().completions.create(model="tiny", prompt=context, max_tokens=60, seed=1,
                                                      logprobs=5, **fields)
            shown = run.find_element(By.CLASS_NAME, "out").get_attribute("textContent")
            assert shown == context + answer.choices[0].text
            # each token's tooltip: the token and its alternatives as the server displays them
            logprobs = answer.choices[0].logprobs
            tooltips = [s.get_attribute("data-alt").split("\n") for s in spans]
            assert [lines[0].rpartition("  p=")[0] for lines in tooltips] == logprobs.display_tokens
            assert [[line.strip().rpartition("  ")[0] for line in lines[1:]] for lines in tooltips] == [
                [c["display"] for c in top] for top in logprobs.top_display]
            assert any(lines[0].startswith("[\u2423]") for lines in tooltips)  # a space, as the server shows it
        screenshot = tmp_path / "explorer.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")
