"""HEFT Studio in a real browser: fill a quick config, launch, watch it finish, compare, ask.

Drives Debian's chromium through Playwright (never a downloaded browser). Set HEFT_SHOTS to a
directory to also save a screenshot of every step there.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tests.servers import BROWSER_ARGS, BROWSER_MARKS, CHROMIUM

pytestmark = BROWSER_MARKS


def test_train_watch_compare_ask(studio, tiny_model):
    from playwright.sync_api import expect, sync_playwright

    from storage import queries

    url, engine, data_dir = studio
    shots = os.environ.get("HEFT_SHOTS")

    def shot(page, name):
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"browser_{name}.png"), full_page=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#heft-launch")).to_be_visible(timeout=120_000)

            # --- Train: a tiny model, tiny local data, all three methods in one batch
            model_box = page.get_by_label("Base model")
            model_box.fill(tiny_model)
            model_box.press("Enter")
            expect(page.get_by_text("4 layers (valid indices 0..3)")).to_be_visible(timeout=120_000)
            page.get_by_label("Local BoolQ directory", exact=True).check()
            local = page.get_by_label("Local BoolQ directory or file")
            local.fill(data_dir)
            page.get_by_label("Compare all three (one batch)").check()
            for label, value in (("train subset (0 = all)", "16"), ("eval subset (0 = all)", "16"),
                                 ("max length (tokens)", "64"),
                                 ("batch size", "4"), ("LoRA learning rate", "0.01"), ("ReFT learning rate", "0.01")):
                box = page.get_by_label(label, exact=True)
                box.fill(value)
                box.press("Tab")
            reft_layers = page.get_by_label("layers", exact=True)
            reft_layers.fill("1,2")
            reft_layers.press("Tab")
            positions = page.get_by_label("positions", exact=True)
            positions.fill("l1")
            positions.press("Tab")
            expect(page.locator("#heft-estimate")).to_contain_text("optimizer steps", timeout=120_000)
            expect(page.locator("#heft-estimate")).to_contain_text("16 × 1")
            shot(page, "train")
            page.get_by_role("button", name="Launch", exact=True).click()
            expect(page.locator("#heft-launch-msg")).to_contain_text("Queued 3 runs", timeout=120_000)

            # --- Runs: the live view of the first run until it completes, with its loss chart
            expect(page.get_by_role("tab", name="Runs", selected=True)).to_be_visible(timeout=60_000)
            progress = page.locator("#heft-progress")
            expect(progress).to_contain_text("Run #1", timeout=60_000)
            expect(progress).to_contain_text("completed", timeout=120_000)
            plot = page.locator("#heft-loss-plot")
            expect(plot.locator("canvas, svg").first).to_be_visible(timeout=60_000)
            expect(page.locator("#heft-eval-plot").locator("canvas, svg").first).to_be_visible(timeout=60_000)
            shot(page, "runs_finished")

            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                statuses = [run.status for run in queries.list_runs(engine)]
                if len(statuses) == 3 and all(s == "completed" for s in statuses):
                    break
                time.sleep(0.5)
            assert statuses == ["completed"] * 3
            expect(page.locator("#heft-runs-table")).to_contain_text("completed", timeout=60_000)

            # --- Compare: the launched batch is preselected
            page.get_by_role("tab", name="Compare").click()
            expect(page.locator("#heft-compare-pick")).to_contain_text("#3 HEFT", timeout=60_000)
            page.locator("#heft-compare-btn").click()
            verdict = page.locator("#heft-verdict")
            expect(verdict).to_contain_text("McNemar p =", timeout=120_000)
            expect(verdict).to_contain_text("#1 LoRA (1 ep) vs #2 ReFT (1 ep)")
            expect(page.locator("#heft-compare-loss").locator("img").first).to_be_visible(timeout=60_000)
            shot(page, "compare")

            # --- Ask: the latest run of each method is preselected; four answers side by side
            page.get_by_role("tab", name="Ask").click()
            expect(page.get_by_label("HEFT run")).to_have_value(re.compile(r"^#3 HEFT"), timeout=60_000)
            expect(page.get_by_label("LoRA run")).to_have_value(re.compile(r"^#1 LoRA"))
            page.get_by_label("Passage").fill("the river town bird stone")
            page.get_by_label("Question (yes/no)").fill("is the bird red")
            page.locator("#heft-ask-btn").click()
            cards = page.locator("#heft-cards .heft-card")
            expect(cards).to_have_count(4, timeout=60_000)
            expect(page.locator("#heft-cards .heft-card-error")).to_have_count(0)
            for title in ("Base", "LoRA · run #1", "ReFT · run #2", "HEFT · run #3"):
                expect(page.locator("#heft-cards")).to_contain_text(title)
            expect(page.locator("#heft-cards .heft-answer")).to_have_count(4)
            shot(page, "ask")

            # --- A run recorded by another process (CLI, bench, API) shows up without Refresh
            page.get_by_role("tab", name="Runs").click()
            outside = queries.start_external_run(
                engine, worker_pid=os.getpid(), name="recorded elsewhere", method="base", config={}, base_model="m",
                data_source="d",
            )
            queries.set_artifact_dir(engine, outside.id, Path(data_dir).parent)  # a directory without train.log
            queries.finish_run(engine, outside.id, "completed")
            expect(page.locator("#heft-runs-table")).to_contain_text("recorded elsewhere", timeout=120_000)
            run_box = page.locator("#heft-run-id input")
            run_box.fill(str(outside.id))
            run_box.press("Enter")
            expect(page.locator(".heft-log textarea")).to_have_value(re.compile("trained outside the app's worker"),
                                                                     timeout=60_000)

            # --- A second tab (or a reload) re-attaches to a run from the database alone
            other = browser.new_page(viewport={"width": 1400, "height": 1000})
            other.goto(url + "?run=2")
            expect(other.get_by_role("tab", name="Runs", selected=True)).to_be_visible(timeout=60_000)
            expect(other.locator("#heft-progress")).to_contain_text("Run #2", timeout=60_000)
            expect(other.locator("#heft-progress")).to_contain_text("completed")
            expect(other.locator("#heft-loss-plot").locator("canvas, svg").first).to_be_visible(timeout=60_000)
        finally:
            browser.close()


# --------------------------------------------------------------------------- a first-time user's trip (issue 12)

def _shooter():
    """shot(page, name): a full-page screenshot under $HEFT_SHOTS (nothing when it is unset)."""
    shots = os.environ.get("HEFT_SHOTS")

    def shot(page, name):
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"browser_{name}.png"), full_page=True)

    return shot


def _record_batch(engine, tiny_model: str, data_dir: str) -> dict[str, int]:
    """A LoRA, a ReFT (l1) and a HEFT run trained here and recorded as finished runs, as the worker would.

    Same seed, data and LoRA settings: the HEFT run's stage 1 is the LoRA run, step for step.
    """
    from app.recording import DatabaseCallback, run_results
    from heft_core.artifacts import load_run
    from heft_core.config import RunConfig
    from heft_core.train import train
    from storage import queries

    ids = {}
    for method in ("lora", "reft", "heft"):
        config = RunConfig.from_dict({
            "method": method, "model": tiny_model, "data": data_dir, "train_size": 16, "eval_size": 16,
            "max_length": 64, "seed": 1, "lora": {"rank": 2, "target_modules": ["q_proj", "v_proj"]},
            "reft": {"rank": 2, "layers": [1, 2], "positions": "l1"},
            "lora_stage": {"epochs": 1, "learning_rate": 0.01, "batch_size": 4},
            "reft_stage": {"epochs": 1, "learning_rate": 0.01, "batch_size": 4},
        })
        run = queries.start_external_run(engine, worker_pid=os.getpid(), name=f"first-user {method}", method=method,
                                         config=config.to_dict(), base_model=tiny_model, data_source=data_dir)
        out = Path(data_dir).parent / f"run-{method}"
        recorder = DatabaseCallback(engine, run.id)
        train(config, out, callbacks=[recorder])
        recorder.flush()
        saved = load_run(out)
        queries.finish_run(engine, run.id, "completed",
                           results=run_results(saved.meta["result"], out, saved.eval_signature))
        ids[method] = run.id
    return ids


def test_form_messages_are_whole_and_every_invalid_value_is_named(studio, tiny_model, capfd):
    """Items 1 and 2: messages keep their angle brackets; invalid values are named next to their field,
    the estimate says it is invalid, Gradio shows no pop-up, nothing is queued, no traceback is logged."""
    from playwright.sync_api import expect, sync_playwright

    from storage import queries

    url, engine, _ = studio
    shot = _shooter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#heft-launch")).to_be_visible(timeout=120_000)
            model_box = page.get_by_label("Base model")
            model_box.fill(tiny_model)
            model_box.press("Enter")
            expect(page.get_by_text("4 layers (valid indices 0..3)")).to_be_visible(timeout=120_000)

            positions = page.get_by_label("positions", exact=True)
            positions.fill("x7")
            positions.press("Tab")
            expect(page.locator("#heft-positions-msg")).to_contain_text(
                "'x7' is not a position string; write f<n>, l<m> or f<n>+l<m>", timeout=60_000)
            shot(page, "first_user_positions_x7")
            positions.fill("l1")
            positions.press("Tab")

            rank = page.locator("#heft-f-lora-rank input")
            rank.fill("0")
            rank.press("Tab")
            expect(page.locator("#heft-lora-msg")).to_contain_text("lora.rank: must be an integer in 1..1024, got 0",
                                                                   timeout=60_000)
            estimate = page.locator("#heft-estimate")
            expect(estimate).to_contain_text("invalid value")
            expect(estimate).not_to_contain_text("optimizer steps")
            expect(page.locator(".toast-body")).to_have_count(0)
            shot(page, "first_user_rank_0")
            rank.fill("")
            rank.press("Tab")
            expect(page.locator("#heft-lora-msg")).to_contain_text("lora.rank: must be an integer in 1..1024, "
                                                                   "got empty", timeout=60_000)
            learning_rate = page.get_by_label("LoRA learning rate", exact=True)
            learning_rate.fill("")
            learning_rate.press("Tab")
            expect(page.locator("#heft-stage-msg")).to_contain_text(
                "lora_stage.learning_rate: must be in (0, 1], got empty", timeout=60_000)
            shot(page, "first_user_empty_fields")
            page.get_by_role("button", name="Launch", exact=True).click()
            expect(page.locator("#heft-launch-msg")).to_contain_text("lora.rank", timeout=60_000)
            expect(page.locator(".toast-body")).to_have_count(0)

            page.get_by_label("Local BoolQ directory", exact=True).check()
            local = page.get_by_label("Local BoolQ directory or file")
            local.fill("/no/such/boolq")
            local.press("Tab")
            data_msg = page.locator("#heft-data-msg")
            expect(data_msg).to_contain_text("no file or directory exists at that path", timeout=60_000)
            expect(data_msg).to_contain_text("'hub:<dataset id>'")
            rank.fill("8")
            rank.press("Tab")
            learning_rate.fill("0.01")
            learning_rate.press("Tab")
            expect(page.locator("#heft-lora-msg")).to_have_text("", timeout=60_000)
            page.get_by_role("button", name="Launch", exact=True).click()
            expect(page.locator("#heft-launch-msg")).to_contain_text("no file or directory exists at that path",
                                                                     timeout=60_000)
            shot(page, "first_user_missing_path")
            assert queries.list_runs(engine) == []  # nothing was queued
        finally:
            browser.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "less than minimum" not in out + err


def test_phase_estimate_charts_and_ask_as_a_first_user_sees_them(studio, tiny_model):
    """Items 3-6: the live view names the phase; the estimate rests on a finished run's speed; the compare
    charts keep their data visible and tell coinciding curves apart; Ask clears a stale gold answer."""
    from playwright.sync_api import expect, sync_playwright

    from heft_core.config import RunConfig
    from storage import queries

    url, engine, data_dir = studio
    shot = _shooter()
    ids = _record_batch(engine, tiny_model, data_dir)
    live = queries.start_external_run(engine, worker_pid=os.getpid(), name="evaluating now", method="lora",
                                      config=RunConfig(method="lora").to_dict(), base_model=tiny_model,
                                      data_source=data_dir)
    queries.update_progress(engine, live.id, {
        "phase": "evaluating lora epoch 1", "phase_done": 8, "phase_total": 16, "stage": "lora", "epoch": 1.0,
        "step": 4, "total_steps": 8, "eta_seconds": 75, "eta_basis": "training and evaluation",
    })
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}?run={live.id}")
            progress = page.locator("#heft-progress")
            expect(progress).to_contain_text("evaluating lora epoch 1: 8 of 16 questions", timeout=120_000)
            expect(progress).to_contain_text("ETA 1 min 15 s (training and evaluation)")
            shot(page, "first_user_live_phase")
            queries.finish_run(engine, live.id, "cancelled")

            page.get_by_role("tab", name="Train").click()
            model_box = page.get_by_label("Base model")
            model_box.fill(tiny_model)
            model_box.press("Enter")
            expect(page.locator("#heft-estimate")).to_contain_text(f"based on run #{ids['heft']}'s", timeout=120_000)
            expect(page.locator("#heft-estimate")).to_contain_text("evaluation ~")
            shot(page, "first_user_estimate")

            page.get_by_role("tab", name="Compare").click()
            expect(page.locator("#heft-compare-pick")).to_contain_text(f"#{ids['heft']} HEFT", timeout=60_000)
            page.locator("#heft-compare-btn").click()
            expect(page.locator("#heft-verdict")).to_contain_text("McNemar p =", timeout=120_000)
            for chart in ("#heft-compare-acc", "#heft-compare-loss"):
                expect(page.locator(chart).locator("img").first).to_be_visible(timeout=60_000)
                # no label badge laid over the top of the plot (the title is inside the figure)
                expect(page.locator(chart).locator("[data-testid='block-label']")).to_be_hidden()
            page.locator("#heft-compare-acc").scroll_into_view_if_needed()
            shot(page, "first_user_compare")

            page.get_by_role("tab", name="Ask").click()
            expect(page.get_by_label("HEFT run")).to_have_value(re.compile(f"^#{ids['heft']} HEFT"), timeout=60_000)
            source = page.get_by_label("Example data")
            source.fill(data_dir)
            source.press("Enter")
            page.get_by_role("button", name="Random validation example").click()
            gold = page.locator("#heft-gold-msg")
            expect(gold).to_contain_text("Gold answer", timeout=120_000)
            question = page.get_by_label("Question (yes/no)")
            question.fill("my own question: is the lake older than the town")  # no synthetic example asks this
            expect(gold).not_to_contain_text("Gold answer", timeout=60_000)
            page.locator("#heft-ask-btn").click()
            cards = page.locator("#heft-cards .heft-card")
            expect(page.locator("#heft-cards .heft-answer")).to_have_count(4, timeout=60_000)
            expect(cards).to_have_count(4)
            expect(page.locator("#heft-cards .heft-pending")).to_have_count(0)
            expect(page.locator("#heft-cards")).not_to_contain_text("Gold answer")
            shot(page, "first_user_ask")
        finally:
            browser.close()
