"""The first page in headless Chromium: the Train tab's speed is measured once the page has
loaded, and the hint that quotes it is for the settings the page has by then."""
from __future__ import annotations

import pytest

from tests.live_server import running_server
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, set_value, tab

sync_api = pytest.importorskip("playwright.sync_api")

CHANGED_STEPS = 123  # not the default preset's


@pytest.mark.browser
@pytest.mark.slow(seconds=30)
def test_the_measured_hint_is_for_the_settings_the_page_has_then(tmp_path):
    with running_server(tmp_path / "ws") as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url + "/")
        page.locator("#ds-stats", has_text="training image").wait_for()
        # within the 3 s before the measurement starts, a person changes a setting
        tab(page, "2 · Train")
        set_value(page, "train-training-max-steps", CHANGED_STEPS)
        hint = page.locator("#train-hint")
        hint.filter(has_text="measured on this machine").wait_for(timeout=120_000)
        assert f"for {CHANGED_STEPS} steps" in hint.inner_text()
        # and no later hint puts the preset's steps back (the page's load chain has ended)
        page.wait_for_timeout(2_000)
        assert f"for {CHANGED_STEPS} steps" in hint.inner_text()
        browser.close()
