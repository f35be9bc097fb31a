"""Shared by the browser tests: one headless Debian chromium per module (never a downloaded browser build), and
the folder their screenshots go to ($LMCOMPRESS_E2E_SCREENSHOTS, else a temporary one)."""
import os
from pathlib import Path

import pytest

from bench.loadtest import CHROMIUM, CHROMIUM_ARGS



@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("LMCOMPRESS_E2E_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
