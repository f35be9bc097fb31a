"""What a newcomer sees, in Debian's chromium: every page opened fresh (a first visit, no earlier state) and after a
slider move shows no internal text; Explore's three charts sit in the first view at 1440×900 and 1024×768; chart
titles never run into each other at 2, 4 and 8 bits; Bit budget shows its controls without starting minutes of work.

With LMCOMPRESS_WRITE_DOCS=1 the Explore screenshot on the embedded SmolLM2 is written to docs/explore.png (the
README's picture); otherwise it goes to the screenshots folder like the others.
"""
import os

import pytest

from test_browser import MODEL, ROOT, WAIT_MS, assert_no_exception, server, wait_idle  # noqa: F401 (server: its fixture)

pytestmark = pytest.mark.e2e

# Text that only Streamlit's internals or a Python error put on a page: a bare expression in a page script is
# written by Streamlit's magic (an object's repr, a DeltaGenerator's docs), an exception's traceback.
INTERNAL = ("DeltaGenerator", "object at 0x", "Traceback (most recent call last)", "st.write_stream", "<function ",
            "NoneType")
PAGES = {"Explore": "", "Trade-offs": "tradeoffs", "Distillation": "distillation", "Bit budget": "budget",
         "Learn": "learn", "Report": "report", "Present": "present"}
SIZES = ((1440, 900), (1024, 768))


@pytest.fixture(scope="module")
def browser(chromium):
    return chromium


def fresh_page(browser, width: int = 1440, height: int = 900):
    """A new browser context: a first visit, with no session, cookies or earlier results."""
    return browser.new_context(viewport={"width": width, "height": height}).new_page()


def internal_text(page) -> list[str]:
    body = page.inner_text("body")
    return [marker for marker in INTERNAL if marker in body]


def open_page(page, server: str, path: str, model: str = MODEL, query: str = "") -> None:
    page.goto(f"{server}/{path}?model={model}{query}", timeout=WAIT_MS)
    # something of the page drawn (Presentation hides the navigation), then the script run over
    page.locator("[data-testid='stMain'] [data-testid='stElementContainer']").first.wait_for(timeout=WAIT_MS)
    page.wait_for_timeout(1500)   # the script's run has begun (its status widget shows) before waiting it out
    wait_idle(page)


def move_bits(page, steps: int) -> None:
    thumb = page.locator("[data-testid='stSlider']", has_text="Bit-width").get_by_role("slider")
    thumb.focus()
    for _ in range(abs(steps)):
        thumb.press("ArrowRight" if steps > 0 else "ArrowLeft")
    page.wait_for_timeout(500)
    wait_idle(page)


@pytest.mark.parametrize("name", list(PAGES))
def test_a_first_visit_of_every_page_shows_no_internal_text(server, browser, shots, name):
    page = fresh_page(browser)
    open_page(page, server, PAGES[name])
    assert_no_exception(page)
    assert not internal_text(page), internal_text(page)
    page.screenshot(path=str(shots / f"fresh-{PAGES[name] or 'explore'}.png"), full_page=True)
    if name == "Explore":   # and after a slider move
        page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)
        move_bits(page, -1)
        page.get_by_role("heading", name="3-bit").first.wait_for(timeout=WAIT_MS)
        wait_idle(page)
        assert not internal_text(page), internal_text(page)
    page.context.close()


def chart_boxes(page) -> list[dict]:
    return [box.bounding_box() for box in page.locator(".js-plotly-plot").all()[:3]]


@pytest.mark.parametrize("width, height", SIZES)
def test_explores_three_charts_are_in_the_first_view(server, browser, shots, width, height):
    page = fresh_page(browser, width, height)
    open_page(page, server, "")
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert page.evaluate("() => window.scrollY") == 0
    boxes = chart_boxes(page)
    assert len(boxes) == 3
    for box in boxes:   # whole, inside the window, side by side
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, (width, height, boxes)
        assert box["x"] >= 0 and box["x"] + box["width"] <= width and box["width"] >= 200, boxes
    nav = page.locator("header").inner_text()
    assert all(title in nav for title in PAGES) and "more" not in nav, nav   # no page hidden behind "N more"
    page.screenshot(path=str(shots / f"explore-first-view-{width}.png"))
    page.context.close()


OVERLAPS = """() => [...document.querySelectorAll('.js-plotly-plot')].slice(0, 3).flatMap(plot => {
  const boxes = [...plot.querySelectorAll('.gtitle, .annotation-text, .xtick text, .ytitle, .bartext')]
    .map(e => ({text: e.textContent, r: e.getBoundingClientRect()})).filter(b => b.r.width > 0);
  const hits = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i].r, b = boxes[j].r;
    if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1)
      hits.push(boxes[i].text + ' / ' + boxes[j].text);
  }
  return hits;
})"""


@pytest.mark.parametrize("width, height", SIZES)
def test_chart_titles_and_labels_never_overlap_at_2_4_and_8_bits(server, browser, shots, width, height):
    page = fresh_page(browser, width, height)
    open_page(page, server, "", query="&bits=2")
    for bits, steps in ((2, 0), (4, 2), (8, 3)):   # widths 2 3 4 5 6 8
        if steps:
            move_bits(page, steps)
        page.get_by_role("heading", name=f"{bits}-bit").first.wait_for(timeout=WAIT_MS)
        page.locator(".js-plotly-plot").nth(2).wait_for(timeout=WAIT_MS)
        wait_idle(page)
        assert not page.evaluate(OVERLAPS), (bits, width, page.evaluate(OVERLAPS))
        page.screenshot(path=str(shots / f"explore-{bits}bit-{width}.png"))
    page.context.close()


def test_bit_budget_shows_its_controls_and_measures_only_on_request(server, browser, shots):
    page = fresh_page(browser)
    open_page(page, server, "budget")
    button = page.get_by_role("button", name="Measure sensitivity")
    button.wait_for(timeout=WAIT_MS)   # drawn once the page's script reaches it (nothing computed before)
    wait_idle(page)
    assert button.is_visible() and page.get_by_text("Target bits per weight").is_visible()
    assert page.locator("[data-testid='stProgress']").count() == 0          # nothing runs before asked
    assert "about" in page.get_by_text("First the autopilot measures").inner_text()
    button.click()
    page.locator(".js-plotly-plot .gtitle", has_text="Bits per layer").wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    page.screenshot(path=str(shots / "budget-measured.png"), full_page=True)
    page.context.close()


@pytest.mark.slow
def test_the_readme_picture_is_the_real_app_on_smollm2(server, browser, shots):
    page = fresh_page(browser)
    open_page(page, server, "", model="default")
    page.get_by_text("Generations").first.wait_for(timeout=WAIT_MS)
    wait_idle(page)
    assert_no_exception(page)
    assert not internal_text(page)
    target = ROOT / "docs" / "explore.png" if os.environ.get("LMCOMPRESS_WRITE_DOCS") else shots / "readme.png"
    page.screenshot(path=str(target))
    page.context.close()
