"""The explorer page in a real headless browser (Debian's chromium through selenium and
chromedriver; .ci/run installs them). What the page shows is held to the library: the
kept set of the top-p column to process_logits at the slider's setting, the cuts on the
distribution chart to process_logits, the generated text and the sampled token to the
API's own answer for the same request; and its layout to geometry: the painted text of
a token stays inside its box.

Each test saves a screenshot of every state it checks into $EXPLORER_SCREENSHOTS (a
folder; default: the test's tmp dir), so that a person can look at what was tested."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


def screenshot(driver, tmp_path: Path, name: str, element=None) -> Path:
    """Save the page (or one element of it) as NAME.png in $EXPLORER_SCREENSHOTS or tmp_path."""
    folder = Path(os.environ.get("EXPLORER_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if element is not None:  # the browser only captures what is inside the window
        driver.execute_script("arguments[0].scrollIntoView()", element)
    saved = element.screenshot(str(path)) if element is not None else driver.save_screenshot(str(path))
    assert saved, path
    return path


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
        print(f"screenshot: {screenshot(browser, tmp_path, 'explorer')}")


# The part of each element's text that is painted outside the element's own box, or the
# element's box outside its row: the text's layout rectangle (a Range over it), cut by
# every ancestor that clips its overflow. [] when every text stays inside its box.
SPILLS = """
const spills = [];
for (const element of document.querySelectorAll(arguments[0])) {
  const range = document.createRange();
  range.selectNodeContents(element);
  const text = range.getBoundingClientRect();
  let left = text.left, right = text.right;
  for (let a = element; a; a = a.parentElement) {
    if (getComputedStyle(a).overflowX !== "visible") {
      const clip = a.getBoundingClientRect();
      left = Math.max(left, clip.left);
      right = Math.min(right, clip.right);
    }
  }
  const box = element.getBoundingClientRect(), row = element.closest(arguments[1]).getBoundingClientRect();
  if (left < box.left - 0.5 || right > box.right + 0.5 || box.left < row.left - 0.5 || box.right > row.right + 0.5)
    spills.push(element.textContent);
}
return spills;
"""


def spills(driver, selector: str, row: str) -> list[str]:
    return driver.execute_script(SPILLS, selector, row)


def long_display(display):
    """Token glyphs as long as GPT-2's: a space becomes a run of 24 (GPT-2 has tokens of
    many spaces), every other token a BPE-like `␣-----...` run after its own glyph."""
    return lambda token: "\u2423" * 24 if display(token) == "\u2423" else f"\u2423{display(token)}" + "-" * 30


def test_long_tokens_and_space_runs_stay_in_their_boxes(browser, loaded, tmp_path, monkeypatch):
    model, tokenizer = loaded
    glyph = long_display(tokenizer.display)
    monkeypatch.setattr(tokenizer, "display", glyph)
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live:
        browser.get(live.url + "/")
        settled(browser)
        browser.find_element(By.ID, "prompt").send_keys("The quick brown fox ")
        WebDriverWait(browser, 10).until(lambda d: "context 20 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        texts = browser.find_elements(By.CSS_SELECTOR, ".row .tok-text")
        assert len(texts) >= 20 + 12  # the chart's rows and the strategy cards' rows
        assert any(t.get_attribute("textContent") == "\u2423" * 24 for t in texts)  # a run of spaces is shown
        assert spills(browser, ".row .tok-text", ".row") == []
        assert spills(browser, "#context-tail .chip", "#context-tail") == []
        # the full glyphs are a hover away: each box's tooltip is the server's display of its token
        for text in texts:
            row = text.find_element(By.XPATH, "./ancestor::div[contains(@class, 'row')]")
            token = int(row.get_attribute("data-id"))
            assert text.get_attribute("title") == glyph(token)
        screenshot(browser, tmp_path, "long-tokens", browser.find_element(By.TAG_NAME, "main"))


def test_appending_shows_what_was_appended(browser, loaded, tmp_path):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live:
        browser.get(live.url + "/")
        settled(browser)
        browser.find_element(By.ID, "prompt").send_keys("The quick")
        WebDriverWait(browser, 10).until(lambda d: "context 9 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        appended = browser.find_element(By.ID, "appended")
        assert not appended.text  # typing appends nothing by token

        # Click the space: the text box only gains an invisible trailing space, so the page
        # must say what it appended, with the server's glyph, and mark it as new.
        space = tokenizer.encode(" ")[0]
        browser.find_element(By.CSS_SELECTOR, f"#candidates .row[data-id='{space}']").click()
        WebDriverWait(browser, 10).until(lambda d: "context 10 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "The quick "
        assert appended.is_displayed() and appended.get_attribute("data-id") == str(space)
        assert "\u2423" in appended.text and "flash" in appended.get_attribute("class")
        last = browser.find_elements(By.CSS_SELECTOR, "#context-tail .chip")[-1]
        assert last.text == "\u2423" and "new" in last.get_attribute("class")
        screenshot(browser, tmp_path, "appended-space", browser.find_element(By.ID, "context"))

        # Sample one token with top-p at seed 1: the page appends and shows the token that
        # the API samples for the same request.
        status, _, body = live.post("/v1/completions", {"prompt": "The quick ", "max_tokens": 1, "seed": 1,
                                                        "strategy": "top-p:p=0.9", "return_token_ids": True})
        assert status == 200, body
        token = json.loads(body)["choices"][0]["token_ids"][0]
        browser.find_element(By.ID, "sample").click()
        WebDriverWait(browser, 10).until(lambda d: "context 11 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        assert appended.get_attribute("data-id") == str(token)
        assert tokenizer.display(token) in appended.text and "top-p:p=0.9" in appended.text
        last = browser.find_elements(By.CSS_SELECTOR, "#context-tail .chip")[-1]
        assert last.text == tokenizer.display(token) and "new" in last.get_attribute("class")
        screenshot(browser, tmp_path, "sampled-token", browser.find_element(By.ID, "context"))


def test_an_invalid_prompt_clears_the_distribution_and_says_why_in_place(browser, loaded, tmp_path):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live:
        browser.get(live.url + "/")
        settled(browser)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys("The ")
        WebDriverWait(browser, 10).until(lambda d: "context 4 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        assert browser.find_elements(By.CSS_SELECTOR, "#candidates .row")
        assert tokenizer.unknown_characters("~")  # not in the tiny corpus
        status, _, body = live.post("/v1/distribution", {"prompt": "The ~"})
        assert status == 400
        message = json.loads(body)["error"]["message"]
        prompt.send_keys("~")
        WebDriverWait(browser, 10).until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
        settled(browser)
        assert browser.find_elements(By.CSS_SELECTOR, ".row") == []  # no stale candidates anywhere
        assert message in browser.find_element(By.ID, "distribution").text  # said where they were
        assert browser.find_element(By.ID, "entropy").text == ""
        for column in browser.find_elements(By.CSS_SELECTOR, "#columns .column"):
            assert "keeps" not in column.find_element(By.CLASS_NAME, "summary").text
        screenshot(browser, tmp_path, "invalid-prompt")
        # fixing the prompt brings the distribution back and the message goes
        prompt.send_keys(Keys.BACKSPACE)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#candidates .row"))
        settled(browser)
        assert message not in browser.find_element(By.ID, "distribution").text


def test_every_checked_strategy_runs(browser, loaded, tmp_path):
    model, tokenizer = loaded
    # two generations at a time, none waiting on the server: the page must queue the rest itself
    settings = ServeSettings("tiny", max_tokens=64, max_concurrent=2, max_waiting=0)
    with LiveServer(create_app(model, tokenizer, settings)) as live:
        browser.get(live.url + "/")
        settled(browser)
        browser.find_element(By.ID, "prompt").send_keys("The ")
        WebDriverWait(browser, 10).until(lambda d: "context 4 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("30")
        boxes = browser.find_elements(By.CSS_SELECTOR, "#columns .run-check")
        assert len(boxes) >= 6
        for box in boxes:
            if not box.is_selected():
                box.click()
        settled(browser)
        columns = browser.find_elements(By.CSS_SELECTOR, "#columns .column")
        labels = [c.find_element(By.CLASS_NAME, "label").text for c in columns]
        browser.find_element(By.ID, "generate").click()
        settled(browser, 60)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#runs .run[data-done='1']")) == len(boxes)
        runs = browser.find_elements(By.CSS_SELECTOR, "#runs .run")
        assert len(runs) == len(boxes)
        for run, label in zip(runs, labels):
            answer = live.client().completions.create(model="tiny", prompt="The ", max_tokens=30, seed=1,
                                                      extra_body={"strategy": label})
            shown = run.find_element(By.CLASS_NAME, "out").get_attribute("textContent")
            assert shown == "The " + answer.choices[0].text
            assert "error" not in run.find_element(By.CLASS_NAME, "finish").text
        screenshot(browser, tmp_path, "six-runs", browser.find_element(By.ID, "runs"))


def test_the_chart_marks_where_each_strategy_cuts(browser, loaded, tmp_path):
    model, tokenizer = loaded
    with LiveServer(create_app(model, tokenizer, ServeSettings("tiny", max_tokens=64))) as live:
        browser.get(live.url + "/")
        settled(browser)
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        WebDriverWait(browser, 10).until(lambda d: "context 4 tokens" in d.find_element(By.ID, "entropy").text)
        settled(browser)
        top_k = browser.find_element(By.ID, "knob-top-k")
        top_k.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * 2)  # k = 3
        settled(browser)
        browser.find_element(By.CSS_SELECTOR, "#col-typical .chart-check").click()  # a set, not always a prefix
        ids = tokenizer.encode(PROMPT)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1:].float()
        rows = browser.find_elements(By.CSS_SELECTOR, "#candidates .row")
        chart_ids = [int(r.get_attribute("data-id")) for r in rows]
        legend = browser.find_elements(By.CSS_SELECTOR, "#chart-legend .entry")
        charted = [entry.get_attribute("data-strategy") for entry in legend]
        assert {"top-k", "top-p", "min-p", "typical"} <= set(charted)  # three on by default, one clicked
        for kind in charted:
            label = browser.find_element(By.CSS_SELECTOR, f"#col-{kind} .label").text
            kept = torch.softmax(process_logits(logits, parse_strategy(label))[0].double(), -1) > 0
            if parse_strategy(label).is_greedy:
                kept = torch.zeros_like(kept).index_fill_(0, logits[0].argmax().view(1), True)
            lanes = [r.find_element(By.CSS_SELECTOR, f".lane[data-strategy='{kind}']") for r in rows]
            assert ["in" in lane.get_attribute("class") for lane in lanes] == [bool(kept[t]) for t in chart_ids], kind
            # a strategy that keeps the first n and drops the rest of the chart: a labelled line after row n
            n = int(kept[chart_ids].sum())
            if kept[chart_ids[:n]].all() and n < len(chart_ids):
                cut = browser.find_element(By.CSS_SELECTOR, f"#candidates .cut[data-strategy='{kind}']")
                assert rows[n - 1].rect["y"] < cut.rect["y"] < rows[n].rect["y"], kind
                assert f"{label} keeps the {n} above" in cut.text
            else:
                assert browser.find_elements(By.CSS_SELECTOR, f"#candidates .cut[data-strategy='{kind}']") == []
        assert parse_strategy(browser.find_element(By.CSS_SELECTOR, "#col-top-k .label").text).top_k == 3
        # top-k at k=3 keeps a prefix shorter than the chart: the line check above ran for it
        cuts = browser.find_elements(By.CSS_SELECTOR, "#candidates .cut")
        assert "top-k" in {cut.get_attribute("data-strategy") for cut in cuts}
        # each strategy card says in one sentence what its knob does, and no two say the same
        sentences = [w.text for w in browser.find_elements(By.CSS_SELECTOR, "#columns .column .what")]
        assert len(sentences) == len(browser.find_elements(By.CSS_SELECTOR, "#columns .column"))
        assert all(s.endswith(".") for s in sentences) and len(set(sentences)) == len(sentences)
        assert browser.find_element(By.ID, "rep-what").text.endswith(".")
        screenshot(browser, tmp_path, "chart", browser.find_element(By.ID, "distribution"))
        screenshot(browser, tmp_path, "explorer-chart")
