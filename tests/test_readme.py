"""README.md is for a newcomer: short, the two commands early, a picture of the app, details in docs/."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_LINES, MAX_WORDS, MAX_LINE_CHARS = 160, 2200, 200


def test_readme_is_short():
    lines = README.splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines"
    assert len(README.split()) <= MAX_WORDS, f"{len(README.split())} words"
    assert max(map(len, lines)) <= MAX_LINE_CHARS


def test_the_two_commands_come_first():
    first = "\n".join(README.splitlines()[:60])
    assert "make run" in first and "make test" in first


@pytest.mark.parametrize("page", ["Explore", "Trade-offs", "Distillation", "Bit budget", "Learn", "Report",
                                  "Present"])   # app.py's page titles
def test_the_tour_names_every_page(page):
    assert f"- **{page}**" in README


PICTURE = "docs/explore.png"


def test_the_screenshot_of_the_real_app_is_there():
    """docs/explore.png is made from the running app (Explore on SmolLM2), not drawn: it fails until it is added."""
    assert f"![Explore on SmolLM2]({PICTURE})" in README
    assert (ROOT / PICTURE).is_file(), f"{PICTURE} is missing: take it from the real app"


def test_links_point_at_files():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    missing = [t for t in targets if not t.startswith(("http:", "https:")) and t != PICTURE and not (ROOT / t).exists()]
    assert not missing, f"missing: {missing}"
