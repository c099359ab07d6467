"""Resume in a real browser: a cancelled run's Resume button continues it from its checkpoint.

Same fixture and chromium as tests/test_browser.py; HEFT_SHOTS=<dir> also saves a screenshot of the
resumed run's view there.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.servers import CHROMIUM
from tests.test_resume import STEPS_PER_EPOCH, steps_of, wait_for, worker_config

pytestmark = pytest.mark.browser


def test_resume_button_continues_a_cancelled_run(studio, tiny_model, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from app import service
    from storage import queries

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker's training children inherit it
    url, engine, data_dir = studio
    (run,) = service.submit_runs(engine, [worker_config(tiny_model, data_dir)])
    wait_for(lambda: len(steps_of(engine, run.id)) >= STEPS_PER_EPOCH + 2)
    service.cancel_run(engine, run.id)  # stops at the next step and writes a checkpoint there
    cancelled = wait_for(lambda: (r := queries.get_run(engine, run.id)).status == "cancelled" and r)
    kept = service.resume_point(cancelled)
    assert kept is not None and kept["step"] > STEPS_PER_EPOCH

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}?run={run.id}")
            progress = page.locator("#heft-progress")
            expect(progress).to_contain_text("cancelled", timeout=120_000)
            resume = page.locator("#heft-resume")
            expect(resume).to_be_enabled(timeout=60_000)
            resume.click()
            expect(page.get_by_text(re.compile(rf"queued again to resume from step {kept['step']} "))).to_be_visible(
                timeout=60_000)
            expect(progress).to_contain_text("completed", timeout=180_000)
            expect(progress).to_contain_text(f"Resumed from step {kept['step']}", timeout=60_000)
            expect(progress).to_contain_text("of training")
            expect(page.locator("#heft-loss-plot").locator("canvas, svg").first).to_be_visible(timeout=60_000)
            expect(resume).to_be_disabled(timeout=60_000)  # a completed run has nothing to resume
            if os.environ.get("HEFT_SHOTS"):
                Path(os.environ["HEFT_SHOTS"]).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(os.environ["HEFT_SHOTS"]) / "browser_resumed.png"), full_page=True)
        finally:
            browser.close()
    done = queries.get_run(engine, run.id)
    assert done.status == "completed" and [entry["by"] for entry in done.resumes] == ["user"]
    total = 10 * STEPS_PER_EPOCH
    deadline = time.monotonic() + 60
    while steps_of(engine, run.id) != list(range(1, total + 1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps_of(engine, run.id) == list(range(1, total + 1))
