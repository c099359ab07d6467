"""What the pages show: labels, formatting, messages, chart helpers and answer cards (no browser, no database)."""
from __future__ import annotations

import html
from types import SimpleNamespace

import pandas as pd

from app import present


def test_format_p_is_one_format_everywhere():
    assert present.format_p(0.6612) == "0.66"
    assert present.format_p(0.001) == "0.001"
    assert present.format_p(0.000123) == "1.2e-04"
    comparison = SimpleNamespace(accuracy_a=0.8, accuracy_b=0.75, a_only=5, b_only=3, p_value=0.000123)
    line = present.verdict("#1 HEFT", "#2 LoRA", comparison)
    assert line == ("#1 HEFT vs #2 LoRA: +5.0 points, 5 vs 3 discordant questions, McNemar p = 1.2e-04 "
                    "— significant at 0.05")


def test_labels():
    assert present.data_label("synthetic") == "synthetic"
    assert {present.data_label(s) for s in ("hub", "google/boolq", "hub:google/boolq")} == {"BoolQ (hub)"}
    assert present.data_label("hub:me/mine") == "hub:me/mine" and present.data_label("/data/boolq/") == "boolq"
    assert present.model_label(" Embedded ") == "SmolLM2-135M (embedded)"
    assert present.model_label("/tmp/a/b/tiny-llama") == "…/tiny-llama"
    assert present.short_paths_in("HEFT 1 ep · /tmp/x/y/model · /d/e/data") == "HEFT 1 ep · …/model · …/data"
    run = SimpleNamespace(id=4, method="heft", config={"lora_stage": {"epochs": 1}, "reft_stage": {"epochs": 2}})
    assert present.run_label(run) == "#4 HEFT (1+2 ep)"
    assert present.epochs_label(SimpleNamespace(method="base", config={})) == "0"
    assert present.format_duration(3725) == "1 h 02 min" and present.format_duration(None) == ""


def test_messages_escape_what_they_quote():
    shown = present.error("<script>")
    assert shown.startswith("⚠️ ") and "<" not in shown and html.unescape(shown) == "⚠️ <script>"
    assert present.warning("**bold**") == "⚠️ **bold**"
    assert present.queued_message([3]) == "✅ Queued 1 run: #3. Opening the Runs tab…"
    assert present.queued_message([3, 4]).startswith("✅ Queued 2 runs: #3, #4.")
    assert present.cancel_message(3, "cancelled") == "Run #3 cancelled."
    assert present.cancel_message(3, "cancel_requested").startswith("Cancel requested for run #3")
    assert present.cancel_message(3, "completed") == "Run #3 is already completed."
    assert present.delete_message(3, True) == "Deleted run #3 and its files."
    assert present.delete_message(3, False) == "Run 3 did not exist."
    assert present.missing_run_message(7) == "⚠️ Run 7 does not exist (it may have been deleted)."
    assert present.verdicts_markdown(["a <b> c", "d"]) == "- a &#60;b&#62; c\n- d"
    assert present.gold_message(False, "<src>") == "Gold answer: **no** (from &#60;src&#62;)"
    run = SimpleNamespace(id=1, name="<img src=x>", status="queued", cancel_requested=False, progress={},
                          started_at=None, finished_at=None, accuracy=None, trainable_params_by_stage={}, error=None)
    text = present.progress_markdown(run)
    assert "&#60;img src=x&#62;" in text and "<img" not in text and "Waiting for the worker" in text


def test_chart_helpers():
    empty = pd.DataFrame(columns=present.EVAL_COLUMNS)
    assert present.plot_frame(empty) is None and present.eval_limits(empty) is None
    frame = present.eval_frame([{"stage": "lora", "epoch": 1, "cumulative_epoch": 2.0, "accuracy": 0.5,
                                 "accuracy_low": 0.02, "accuracy_high": 0.98}])
    assert present.plot_frame(frame) is frame
    assert present.eval_limits(frame) == ((0.0, 2.5), (0.0, 100.0))  # room around the points, within 0..100


def test_slot_cards_always_show_four_answers():
    answers = [{"slot": "base", "title": "Base", "subtitle": "", "answer": "yes", "p_yes": 0.6, "latency_seconds": 0.1},
               {"slot": "heft", "title": "HEFT · run #3", "subtitle": "", "answer": "no", "p_yes": 0.2,
                "latency_seconds": 0.1}]
    cards = present.slot_cards(answers)
    assert [c["slot"] for c in cards] == ["base", "lora", "reft", "heft"]
    assert cards[1]["error"] == "no LoRA run picked" and cards[2]["error"] == "no ReFT run picked"
    page = present.answer_cards_html(cards, gold=False)
    assert page.count("heft-card-error") == 2 and page.count("✓") == 1 and page.count("✗") == 1
    assert present.answered_message("embedded") == "Answered with base model **SmolLM2-135M (embedded)**."
