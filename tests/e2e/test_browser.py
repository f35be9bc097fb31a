"""Real-browser end-to-end test: `streamlit run app.py` driven by Debian's chromium through playwright.

Opens Explore on the tiny model, moves the bit-width slider with the keyboard, waits for the charts and
the generations to change, visits every page (screenshots of each under a temp folder, or under
$LMCOMPRESS_E2E_SCREENSHOTS), downloads the HTML report. Never downloads a browser build.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

from bench.loadtest import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WAIT_MS = 180_000      # generous: 2 shared CPU cores, a cold server imports torch and loads the model
MODEL = os.environ.get("LMCOMPRESS_APP_TEST_MODEL", "tiny")
PAGES = ["Trade-offs", "Distillation", "Learn", "Report"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("streamlit did not become healthy")


@contextmanager
def running_server(tmp_path_factory):
    """`streamlit run app.py` on a free port of 127.0.0.1, stopped on exit; yields its URL."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make browser)")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1600, "height": 2400}, accept_downloads=True)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def wait_idle(page) -> None:
    """Streamlit shows a 'Running…' status widget while the script runs; wait until it is gone."""
    page.wait_for_timeout(500)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=WAIT_MS)


def chart_title(page, prefix: str) -> str:
    titles = page.locator(".js-plotly-plot .gtitle").all_text_contents()
    return next(t for t in titles if t.startswith(prefix))


def generations_text(page) -> str:
    return " | ".join(page.locator("[data-testid='stHtml']").all_inner_texts())


def assert_no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0


def run_sweep_and_sensitivity(page) -> None:
    set_chips(page, "Bit-widths", ["2", "4"])     # two configurations on the int4 kernel: the default grid is 8
    set_chips(page, "Sparsity (%)", ["0"])
    page.get_by_role("button", name="Run sweep").click()
    page.locator(".js-plotly-plot .gtitle", has_text="Size vs perplexity").wait_for(timeout=WAIT_MS)
    wait_idle(page)
    page.get_by_role("button", name="Compute sensitivity").click()
    page.locator(".js-plotly-plot .gtitle", has_text="Per-layer sensitivity").wait_for(timeout=WAIT_MS)
    wait_idle(page)


def foreign_hosts(urls: list[str], server: str) -> set[str]:
    own = urlparse(server).netloc
    return {urlparse(u).netloc for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")} - {own}


def truncated(page, selector: str) -> list[str]:
    """Texts of the elements matching ``selector`` that do not fit their box (scrollWidth > clientWidth)."""
    return page.eval_on_selector_all(
        selector, "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)")


def test_explore_slider_updates_charts_and_generations_then_every_page(server, page, shots):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server}/?model={MODEL}", timeout=WAIT_MS)
    page.get_by_text("Generations").first.wait_for(timeout=WAIT_MS)
    page.locator(".js-plotly-plot").nth(3).wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    before_title, before_text = chart_title(page, "Perplexity"), generations_text(page)
    page.screenshot(path=str(shots / "explore-4bit.png"), full_page=True)

    thumb = page.locator("[data-testid='stSlider']", has_text="Bit-width").get_by_role("slider")
    thumb.focus()
    thumb.press("ArrowLeft")
    thumb.press("ArrowLeft")     # 4 -> 3 -> 2 bits
    page.get_by_role("heading", name="2-bit").wait_for(timeout=WAIT_MS)
    page.wait_for_function(
        "t => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(e => e.textContent.startsWith("
        "'Perplexity') && e.textContent !== t)", arg=before_title, timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    assert chart_title(page, "Perplexity") != before_title
    assert generations_text(page) != before_text
    page.screenshot(path=str(shots / "explore-2bit.png"), full_page=True)
    assert not foreign_hosts(requested, server), "the page asked another host for something"
    assert "bits=2" in page.url

    page.reload()   # the URL carries the settings: a reload (or a shared link) restores them
    page.get_by_role("heading", name="2-bit").first.wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    thumb = page.locator("[data-testid='stSlider']", has_text="Bit-width").get_by_role("slider")
    assert thumb.get_attribute("aria-valuetext") == "2", thumb.evaluate("e => e.outerHTML")

    for name in PAGES:
        page.get_by_role("link", name=name).first.click()
        page.get_by_role("heading", name=name).first.wait_for(timeout=WAIT_MS)
        wait_idle(page)
        if name == "Trade-offs":
            run_sweep_and_sensitivity(page)
        assert_no_exception(page)
        page.screenshot(path=str(shots / f"{name.lower()}.png"), full_page=True)

    with page.expect_download(timeout=WAIT_MS) as download:
        page.get_by_role("button", name="Download the HTML report").click()
    report = Path(download.value.path()).read_text(encoding="utf-8")
    assert "<h2>Charts</h2>" in report and "2-bit" in report

    page.get_by_role("link", name="Presentation mode").click()
    page.locator("[data-testid='stMetric']").first.wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    assert page.locator("[data-testid='stSlider']").count() == 0
    page.screenshot(path=str(shots / "presentation.png"), full_page=True)
    for width, height in ((1024, 768), (1920, 1080)):   # projector sizes: nothing cut short
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(800)
        cut = truncated(page, "[data-testid='stMetricValue'] *, [data-testid='stMetricLabel'] *, "
                              "[data-testid='stMetricDelta'] *, h1")
        assert not cut, (width, cut)
        page.screenshot(path=str(shots / f"presentation-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1600, "height": 2400})
    assert not foreign_hosts(requested, server), "a page asked another host for something"
    print(f"screenshots in {shots}")


@pytest.mark.slow
def test_embedded_default_model_generates_in_the_browser(server, page, shots):
    """The front door's promise: offline, the embedded SmolLM2 serves a generation in a real browser."""
    page.goto(f"{server}/?model=default", timeout=WAIT_MS)
    page.get_by_text("SmolLM2").first.wait_for(timeout=WAIT_MS)
    page.get_by_text("Generations").first.wait_for(timeout=WAIT_MS)
    page.locator(".js-plotly-plot").nth(3).wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    original, compressed = page.locator("[data-testid='stHtml']").all_inner_texts()[-2:]  # the side-by-side boxes
    assert len(original.split()) >= 5 and len(compressed.split()) >= 5, (original, compressed)
    page.screenshot(path=str(shots / "explore-default.png"), full_page=True)


def subheading(page) -> str:
    """The first subheader of the page: on Explore, the plain-language name of what the charts show."""
    return page.locator("[data-testid='stHeading'] h3").first.inner_text().strip()


def test_app_stop_on_explore_keeps_the_heading_on_what_the_charts_show(server, page, shots):
    page.goto(f"{server}/?model={MODEL}&steps=500", timeout=WAIT_MS)
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)
    wait_idle(page)
    heading, title = subheading(page), chart_title(page, "Perplexity")
    assert heading.startswith("4-bit")
    page.get_by_text("Distil", exact=True).click()    # 500 distillation steps: a run slow enough to stop
    stop = page.get_by_role("button", name="Stop", exact=True)
    stop.wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(shots / "explore-running.png"), full_page=True)
    stop.click()
    page.get_by_text("Stopped").first.wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    page.screenshot(path=str(shots / "explore-stopped.png"), full_page=True)
    assert subheading(page) == heading                  # the heading names the previous result the charts show
    assert chart_title(page, "Perplexity") == title
    message = page.get_by_text("Stopped").first.inner_text()
    assert "previous result" in message, message        # and the message says what was kept
    assert not page.get_by_role("button", name="Stop", exact=True).is_visible()


def multiselect(page, label: str):
    return page.locator("[data-testid='stMultiSelect']").filter(
        has=page.get_by_text(label, exact=True))


def set_chips(page, label: str, wanted: list[str]) -> None:
    box = multiselect(page, label)
    box.locator("[data-tag]").first.wait_for(timeout=WAIT_MS)    # drawn (every multiselect here starts with chips)
    for chip in box.locator("[data-tag]").all_inner_texts():
        if chip.strip() not in wanted:
            box.get_by_role("button", name=f"Remove {chip.strip()}").click()
    for value in wanted:
        if value not in [c.strip() for c in box.locator("[data-tag]").all_inner_texts()]:
            box.get_by_role("combobox").click()
            page.get_by_role("option", name=value, exact=True).click()
    page.keyboard.press("Escape")


STREAMLIT_STOP = """() => {
  const stop = [...document.querySelectorAll('[data-testid="stStatusWidget"] button')]
    .find(b => b.innerText.trim() === 'Stop');
  if (stop) { stop.click(); }   // hidden by the app's CSS, still Streamlit's own stop when clicked
  return Boolean(stop);
}"""


def test_streamlits_own_stop_mid_sweep_leaves_a_usable_page(server, page, shots):
    page.goto(f"{server}/?model={MODEL}", timeout=WAIT_MS)
    page.get_by_role("link", name="Trade-offs").first.click()
    page.get_by_role("button", name="Run sweep").wait_for(timeout=WAIT_MS)
    wait_idle(page)
    chips = page.locator("[data-testid='stMultiSelect'] [data-tag] > span")
    assert not truncated(page, "[data-testid='stMultiSelect'] [data-tag] > span") and chips.count() >= 7
    set_chips(page, "Bit-widths", ["8"])
    set_chips(page, "Sparsity (%)", ["0"])
    page.get_by_role("button", name="Run sweep").click()
    page.get_by_text("1 configuration on").first.wait_for(timeout=WAIT_MS)
    wait_idle(page)
    page.screenshot(path=str(shots / "tradeoffs-first.png"), full_page=True)

    set_chips(page, "Bit-widths", ["2", "3", "8"])
    tokens = page.locator("[data-testid='stSlider']", has_text="Evaluation tokens").get_by_role("slider")
    tokens.focus()
    tokens.press("End")   # the longest protocol: the tiny model's sweep lasts long enough to be stopped mid-way
    wait_idle(page)
    page.get_by_role("button", name="Run sweep").click()
    page.get_by_text("previous result shown").first.wait_for(timeout=WAIT_MS)   # drawn before the sweep starts
    page.locator("[data-testid='stProgress']", has_text="done").wait_for(timeout=WAIT_MS)
    page.wait_for_function(STREAMLIT_STOP, timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    page.screenshot(path=str(shots / "tradeoffs-streamlit-stop.png"), full_page=True)
    assert page.locator(".js-plotly-plot .gtitle", has_text="Size vs perplexity").first.is_visible()
    assert not page.get_by_role("button", name="Stop", exact=True).is_visible()   # no dead Stop, no frozen bar
    assert not page.locator("[data-testid='stProgress']").first.is_visible()

    page.get_by_role("button", name="Run sweep").click()       # usable: a new sweep starts
    page.get_by_text("3 configurations on").first.wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    message = page.get_by_text("Sweep stopped after").first.inner_text()
    assert re.search(r"after \d of 3 configurations", message) and "previous complete table is unchanged" in message
    page.screenshot(path=str(shots / "tradeoffs-after.png"), full_page=True)


def test_a_fresh_server_opened_on_a_page_url_shows_that_page_through_the_app(tmp_path_factory, page):
    """The first session of a new server opened on a page's URL (a reload after a restart, a shared link): Streamlit's
    old pages/-folder mode would run the page file alone (no session defaults: a KeyError, and a sidebar listing
    the files of pages/); the page must come up through app.py, with the app's own navigation."""
    with running_server(tmp_path_factory) as url:
        page.goto(f"{url}/tradeoffs?model={MODEL}", timeout=WAIT_MS)
        page.get_by_role("button", name="Run sweep").wait_for(timeout=WAIT_MS)
        wait_idle(page)
        assert_no_exception(page)
        assert page.get_by_role("link", name="Bit budget").first.is_visible()     # app.py's st.navigation
        assert page.locator("[data-testid='stSidebarNav']").count() == 0           # not the pages/ file list
