"""Public mode in a real browser (Debian's Chromium): the Train tab's Launch is refused with the message, and the
Duplicate button is there to get a copy where training is allowed."""
from __future__ import annotations

from tests.servers import BROWSER_ARGS, BROWSER_MARKS, CHROMIUM, served_app

pytestmark = BROWSER_MARKS


def test_a_visitor_cannot_launch_and_is_offered_the_duplicate_button(home, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from storage import queries
    from storage.db import open_db

    monkeypatch.setenv("HEFT_PUBLIC", "1")
    engine = open_db(home / "heft.db")
    with served_app(engine) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#heft-launch")).to_be_visible(timeout=120_000)
            expect(page.locator("#heft-duplicate")).to_be_visible()
            expect(page.locator("#heft-public-notice")).to_contain_text("This deployment is public")
            page.locator("#heft-launch").click()
            expect(page.get_by_text("Visitors of this public deployment can read every run")).to_be_visible(
                timeout=60_000)
            expect(page.get_by_text("queueing runs is for its owners")).to_be_visible()
        finally:
            browser.close()
    assert queries.list_runs(engine) == []
