"""The Studies tab in a real browser: a preset shrunk to the tiny Llama, launched, its matrix and report.

Drives Debian's chromium through Playwright, as tests/test_browser.py does. Saves
``studies.png`` into HEFT_SHOTS when that is set.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from heft_core.study_presets import preset
from tests.servers import BROWSER_ARGS, BROWSER_MARKS, CHROMIUM

pytestmark = BROWSER_MARKS


def shrunk_equal_budget(model: str, data: str) -> str:
    """The "Equal budget" preset cut to three arms at 2 epochs (base, LoRA 2, HEFT 1+1), one seed, tiny sizes."""
    spec = preset("Equal budget").to_dict()
    spec["arms"] = [{"method": "base"}, {"method": "lora", "lora_epochs": 2},
                    {"method": "heft", "lora_epochs": 1, "reft_epochs": 1}]
    spec["seeds"] = [1]
    spec["base"].update({
        "model": model, "data": data, "train_size": 16, "eval_size": 16, "max_length": 48, "precision": "no",
        "lora.rank": 2, "lora.target_modules": ["q_proj", "v_proj"], "reft.rank": 2, "reft.layers": [1, 2],
        "reft.positions": "l1", "lora_stage.batch_size": 4, "reft_stage.batch_size": 4,
        "lora_stage.grad_accum": 1, "reft_stage.grad_accum": 1,
        # the tiny Llama's tokenizer has no chat template; logits alone keep the browser test short
        "template.format": "plain", "template.system": "", "scoring": "logits",
    })
    return yaml.safe_dump(spec, sort_keys=False)


def test_study_from_a_preset_launch_matrix_report(studio, tiny_model):
    from playwright.sync_api import expect, sync_playwright

    from storage import queries

    url, engine, data_dir = studio
    shots = os.environ.get("HEFT_SHOTS")
    spec_text = shrunk_equal_budget(tiny_model, data_dir)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Studies").click()
            plan = page.locator("#heft-study-plan")
            expect(plan).to_contain_text("runs", timeout=120_000)
            # Pick the preset: the editor fills with its spec and the plan follows.
            page.get_by_label("study preset", exact=True).click()
            page.get_by_role("option", name="Equal budget").click()
            expect(page.get_by_label("study preset", exact=True)).to_have_value("Equal budget", timeout=60_000)
            editor = page.locator("#heft-study-spec .cm-content")
            expect(editor).to_contain_text("Equal budget", timeout=60_000)
            expect(plan).to_contain_text("15 runs", timeout=60_000)
            expect(plan).to_contain_text("evaluation questions")
            # Shrink it to the tiny model: replace the editor's text.
            editor.click()
            page.keyboard.press("Control+A")
            page.keyboard.press("Delete")
            page.keyboard.insert_text(spec_text)
            expect(plan).to_contain_text("3 runs", timeout=60_000)
            expect(plan).to_contain_text("3 arms × 1 seed")
            expect(plan).to_contain_text("⚠️")  # 16 questions cannot separate anything
            page.get_by_label("study name (blank: the spec's name)").fill("tiny equal budget")
            page.get_by_role("button", name="Launch study").click()
            expect(page.locator("#heft-study-launch-msg")).to_contain_text("Queued study #1 (3 runs", timeout=120_000)
            matrix = page.locator("#heft-study-matrix")
            expect(matrix).to_contain_text("seed 1", timeout=60_000)
            expect(matrix).to_contain_text("LoRA 2")
            expect(page.locator("#heft-study-status")).to_contain_text("3 runs", timeout=60_000)
            report = page.locator("#heft-study-report")
            expect(report).to_contain_text("Majority", timeout=900_000, ignore_case=True)
            expect(matrix).to_contain_text("%")
            assert queries.study_status_counts(engine, 1) == {"completed": 3}
            expect(report).to_contain_text("HEFT 1+1")
            charts = page.locator("#heft-study-charts")
            expect(charts.locator("img").first).to_be_visible(timeout=60_000)
            charts.scroll_into_view_if_needed()
            # loaded, not a broken link: the browser decoded at least one chart's pixels
            page.wait_for_function("() => [...document.querySelectorAll('#heft-study-charts img')]"
                                   ".some(image => image.complete && image.naturalWidth > 0)", timeout=60_000)
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                charts.screenshot(path=str(Path(shots) / "studies_charts.png"))
            page.get_by_role("button", name="Download report (zip)").click()
            zip_box = page.locator("#heft-study-zip")
            expect(zip_box).to_contain_text("study-1-report", timeout=120_000)  # Gradio shows "study-1-report .zip"
            expect(zip_box).to_contain_text(".zip")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / "studies.png"), full_page=True)
        finally:
            browser.close()
