"""The browser bench's DOM monitor (bench/browser.py MONITOR_JS) on a static page in Debian chromium.

The page imitates what Explore shows during one slider move, step by step: the previous result dimmed inside
"st-key-previous-*" containers, the heading "Computing: …", the first new chart, the other two, the final
heading, the generations, the end of the script run. Each mark must appear at its step and not before.
"""
import json

import pytest

from bench.browser import MONITOR_JS

pytestmark = pytest.mark.e2e

OLD, NEW = "4-bit, groups of 128, round-to-nearest", "5-bit, groups of 128, round-to-nearest"
TITLES = {"size": "Model size", "latency": "Latency<br><sup>kernel</sup>", "perplexity": "Perplexity"}

# Draws a chart the way Plotly leaves it: a .js-plotly-plot div whose .data and .layout hold the figure.
HELPERS = """
window.chart = (parent, role, y, previous) => {
  const box = document.createElement('div');
  if (previous) box.className = 'stElementContainer st-key-previous-' + role;
  const gd = document.createElement('div');
  gd.className = 'js-plotly-plot';
  gd.data = [{x: ['a', 'b'], y: y, text: y.map(String)}];
  gd.layout = {title: {text: TITLES[role]}};
  box.appendChild(gd);
  document.getElementById(parent).appendChild(box);
};
window.heading = (text) => { document.getElementById('heading').innerHTML = '<h3>' + text + '</h3>'; };
"""


@pytest.fixture(scope="module")
def page(chromium):
    return chromium.new_page()


def marks(page) -> dict:
    page.evaluate("() => window.__lmBench.check()")
    return page.evaluate("() => window.__lmBench.marks")


def test_marks_follow_the_page_through_one_move(page):
    page.set_content("<div id='heading'></div><div id='charts'></div><div id='after'></div>")
    page.add_script_tag(content=MONITOR_JS)
    page.add_script_tag(content=f"const TITLES = {json.dumps(TITLES)};" + HELPERS)
    page.evaluate("""old => { heading(old); for (const r of ['size', 'latency', 'perplexity'])
                     chart('charts', r, [1, 2], false); }""", OLD)
    page.evaluate("label => window.__lmBench.arm(label, true)", NEW)
    assert marks(page) == {}, "nothing before the change"
    page.keyboard.press("ArrowRight")   # the key press starts the clock
    assert page.evaluate("() => window.__lmBench.start") is not None

    # the previous result redrawn dimmed (even with other values) and the heading naming the new setting
    page.evaluate("""label => { heading('Computing: ' + label); document.getElementById('charts').innerHTML = '';
                     chart('charts', 'size', [1, 2], true); chart('charts', 'latency', [7, 7], true);
                     chart('charts', 'perplexity', [1, 2], true); }""", NEW)
    assert marks(page) == {}, "a dimmed previous chart is never an update"
    page.evaluate("() => chart('charts', 'latency', [1, 2], false)")
    assert marks(page) == {}, "a chart with the values shown before is not an update"

    page.evaluate("() => chart('charts', 'size', [3, 4], false)")
    first = marks(page)
    assert first.get("first") is not None and first["first_role"] == "size"
    assert first.get("all") is None

    page.evaluate("() => { chart('charts', 'latency', [5, 6], false); chart('charts', 'perplexity', [5, 6], false); }")
    assert marks(page).get("all") is None, "all charts only once the heading names the new setting alone"
    page.evaluate("label => heading(label)", NEW)
    done = marks(page)
    assert done.get("all") is not None and done.get("complete") is None, "generations not shown yet"

    page.evaluate("""() => { document.getElementById('after').innerHTML =
                     "<h3>Generations</h3><div data-testid='stStatusWidget'>Running...</div>"; }""")
    assert marks(page).get("complete") is None, "the script is still running"
    page.evaluate("() => document.querySelector('[data-testid=stStatusWidget]').remove()")
    final = marks(page)
    assert final["first"] <= final["all"] <= final["complete"]


def test_a_longer_heading_that_contains_the_label_does_not_count(page):
    page.set_content("<div id='heading'></div><div id='charts'></div>")
    page.add_script_tag(content=MONITOR_JS)
    page.add_script_tag(content=f"const TITLES = {json.dumps(TITLES)};" + HELPERS)
    page.evaluate("label => window.__lmBench.arm(label, false, 0)", OLD)   # armed as for a cold start
    page.evaluate("old => heading(old + ' · 5% of weights removed (magnitude)')", OLD)
    page.evaluate("() => { for (const r of ['size', 'latency', 'perplexity']) chart('charts', r, [1, 2], false); }")
    assert marks(page) == {}
    page.evaluate("old => heading(old)", OLD)
    got = marks(page)
    assert got.get("first") is not None and got.get("complete") is not None   # no generations asked for
