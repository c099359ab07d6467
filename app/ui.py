"""HEFT Studio's Gradio app: declarative layout and thin handlers over app.views / app.service.

``build_demo(engine)`` returns the Blocks; everything a page shows comes from the database
(runs, metrics, evaluations) or from run directories, so a reload or a second browser tab
shows the same state. Timers poll only while something is active and stop when runs end.
Named API endpoints (gradio_client): start_run, cancel_run, list_runs, run_detail, ask.
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import service, views
from app.ask import AskError, AskService, normalise_model, parse_run_ids
from app.worker import LOG_FILE, log_tail
from heft_core.config import PRECISIONS, SCHEDULERS, STAGE2_MODES, ConfigError
from heft_common.home import data_home
from storage import queries
from storage.db import open_db

logger = logging.getLogger(__name__)

TABLE_SECONDS = 2.0
# Stage colours, the same in every run (views.loss_frame/eval_frame name every stage in the data
# from the start; see views._with_stage_placeholders).
STAGE_COLORS = {"base": "#7f7f7f", "lora": "#1f77b4", "reft": "#ff7f0e"}
IDLE_TABLE_SECONDS = 10.0  # nothing queued or running here: still notice runs queued elsewhere (API, CLI, bench)
LIVE_SECONDS = 1.5
LOG_LINES = 14
PRIVATE = {"api_visibility": "private"}

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate")
CSS = """
.heft-header h1 { margin-bottom: 0; }
.heft-note { font-size: 0.9em; opacity: 0.85; }
.heft-pad { padding: 6px 10px; }
.heft-side { position: sticky; top: 8px; align-self: flex-start; }
.heft-msg-error { border-left: 4px solid #dc2626; padding-left: 8px; }
.heft-cards { display: flex; gap: 12px; flex-wrap: wrap; }
.heft-card { flex: 1 1 180px; border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 12px 14px;
             background: var(--background-fill-secondary); min-width: 170px; }
.heft-card.heft-right { border-color: #16a34a; box-shadow: inset 0 3px 0 #16a34a; }
.heft-card.heft-wrong { border-color: #dc2626; box-shadow: inset 0 3px 0 #dc2626; }
.heft-card-title { font-weight: 700; font-size: 1.05em; }
.heft-card-sub { font-size: 0.8em; opacity: 0.7; min-height: 1.2em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.heft-answer { font-size: 1.8em; font-weight: 700; margin: 6px 0 4px; text-transform: uppercase; }
.heft-mark { font-size: 0.8em; }
.heft-right .heft-mark { color: #16a34a; } .heft-wrong .heft-mark { color: #dc2626; }
.heft-bar { height: 6px; background: var(--border-color-primary); border-radius: 3px; overflow: hidden; }
.heft-bar > div { height: 100%; background: var(--color-accent); }
.heft-meta { font-size: 0.85em; margin-top: 6px; opacity: 0.85; }
.heft-card-error { color: #b45309; font-size: 0.9em; }
.heft-gold { margin-top: 10px; }
.heft-cards-empty { opacity: 0.6; padding: 12px; }
#heft-estimate table { font-size: 0.9em; }
#heft-estimate th, #heft-estimate td { padding: 4px 6px; white-space: nowrap; }
.heft-log textarea { font-family: var(--font-mono); font-size: 12px !important; }
"""


def launch_kwargs() -> dict[str, Any]:
    """theme and css go to launch() in Gradio 6."""
    return {"theme": THEME, "css": CSS}


def _msg(text: str, error: bool = False) -> str:
    return f"⚠️ {text}" if error else text


def build_demo(engine: Any = None) -> gr.Blocks:
    engine = engine if engine is not None else open_db()
    asker = AskService(engine)
    # Reading the embedded model's shape takes ~10 s the first time; do it before anyone asks.
    threading.Thread(target=_warm, args=("embedded",), daemon=True, name="heft-warm").start()
    form0 = views.default_form()
    base_ok = views.base_runs_supported()

    # ------------------------------------------------------------------ plain handlers
    def all_runs(**filters: Any) -> list[Any]:
        return queries.list_runs(engine, limit=500, **filters)

    def any_active() -> bool:
        return any(queries.list_runs(engine, status=s, limit=1) for s in views.ACTIVE_STATUSES)

    def get_run(run_id: Any) -> Any:
        try:
            return queries.get_run(engine, run_id)
        except ValueError:
            return None

    with gr.Blocks(title="HEFT Studio", analytics_enabled=False) as demo:
        gr.Markdown(
            "# HEFT Studio\nTrain **LoRA**, **ReFT** (LoReFT) and **HEFT** (LoRA for E1 epochs, then ReFT on the frozen "
            "LoRA model for E2 epochs; arXiv 2509.09801) on BoolQ yes/no questions, compare runs with proper statistics, "
            "and ask all variants the same question. Training runs in a background worker: closing this page does not stop it.",
            elem_classes="heft-header",
        )
        with gr.Tabs(selected="train") as tabs:
            # ============================================================== Train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Group():
                            preset = gr.Dropdown(list(views.PRESETS), value=None, label="Preset (fills the whole form; edit anything afterwards)")
                            preset_note = gr.Markdown("*Pick a preset, or set every option below yourself.*", elem_classes="heft-note heft-pad")
                        with gr.Group():
                            with gr.Row():
                                model = gr.Dropdown(views.MODEL_CHOICES, value=form0["model"], allow_custom_value=True, scale=3,
                                                    label="Base model", info="Embedded SmolLM2 works offline; or type a hub id / local model directory")
                                method = gr.Radio(list(views.METHOD_LABELS.values()), value=form0["method"], label="Method", scale=4)
                            model_msg = gr.Markdown("", elem_classes="heft-note heft-pad")
                        with gr.Group():
                            data_kind = gr.Radio(views.DATA_KINDS, value=form0["data_kind"], label="Data source")
                            data_local = gr.Textbox(form0["data_local"], label="Local BoolQ directory or file", visible=False,
                                                    info="train/validation .jsonl/.json/.csv/.parquet (google/boolq or SuperGLUE schema)")
                            with gr.Row(visible=False) as upload_row:
                                upload = gr.File(label="Upload a data file (.jsonl/.json/.csv/.parquet; split 80/20)", file_types=list(views.UPLOAD_EXTENSIONS), scale=2)
                                upload_path = gr.Textbox("", label="Uploaded file (stored in the data home)", interactive=False, scale=3)
                            upload_msg = gr.Markdown("", elem_classes="heft-note heft-pad")
                        with gr.Row():
                            name = gr.Textbox(form0["name"], label="Run name (optional)", scale=3)
                            include_base = gr.Checkbox(form0["include_base"], label="Also queue a zero-shot base run (batch only)", visible=base_ok, scale=2)
                        with gr.Group() as lora_group:
                            gr.Markdown("**LoRA** (weight space; HEFT stage 1)")
                            with gr.Row():
                                lora_rank = gr.Number(form0["lora_rank"], label="rank r", precision=0, minimum=1)
                                lora_alpha = gr.Number(form0["lora_alpha"], label="alpha")
                                lora_dropout = gr.Number(form0["lora_dropout"], label="dropout", step=0.01)
                                lora_layers = gr.Textbox(form0["lora_layers"], label="layers (empty = all)", placeholder="e.g. 0-11")
                            lora_targets = gr.CheckboxGroup(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                                            value=form0["lora_targets"], label="target modules (the model's linear layers)")
                        with gr.Group() as reft_group:
                            gr.Markdown("**ReFT** (LoReFT on the residual stream; HEFT stage 2)")
                            with gr.Row():
                                reft_rank = gr.Number(form0["reft_rank"], label="rank r", precision=0, minimum=1)
                                reft_layers = gr.Textbox(form0["reft_layers"], label="layers", placeholder="all, or 0,2,4-7")
                                reft_positions = gr.Textbox(form0["reft_positions"], label="positions", placeholder="f7+l7, l1, f3")
                                reft_dropout = gr.Number(form0["reft_dropout"], label="dropout", step=0.01)
                            with gr.Row():
                                reft_share = gr.Checkbox(form0["reft_share"], label="share weights between first and last positions")
                                layers_msg = gr.Markdown("", elem_classes="heft-note")
                                positions_msg = gr.Markdown(views.positions_message(form0["reft_positions"]), elem_classes="heft-note")
                        with gr.Group():
                            gr.Markdown("**Training** (HEFT runs E1 LoRA epochs, then E2 ReFT epochs)", elem_classes="heft-pad")
                            with gr.Row():
                                lora_epochs = gr.Number(form0["lora_epochs"], label="LoRA epochs (E1)", precision=0, minimum=0)
                                reft_epochs = gr.Number(form0["reft_epochs"], label="ReFT epochs (E2)", precision=0, minimum=0)
                                lora_lr = gr.Number(form0["lora_lr"], label="LoRA learning rate")
                                reft_lr = gr.Number(form0["reft_lr"], label="ReFT learning rate")
                            epochs_md = gr.Markdown(views.epochs_message(form0), elem_classes="heft-note heft-pad", elem_id="heft-epochs")
                            with gr.Row():
                                batch_size = gr.Number(form0["batch_size"], label="batch size", precision=0, minimum=1)
                                grad_accum = gr.Number(form0["grad_accum"], label="grad accumulation", precision=0, minimum=1)
                                warmup_ratio = gr.Number(form0["warmup_ratio"], label="warmup ratio", step=0.01)
                                weight_decay = gr.Number(form0["weight_decay"], label="weight decay", step=0.01)
                            with gr.Row():
                                scheduler = gr.Dropdown(list(SCHEDULERS), value=form0["scheduler"], label="scheduler")
                                max_length = gr.Number(form0["max_length"], label="max length (tokens)", precision=0, minimum=16)
                                train_size = gr.Number(form0["train_size"], label="train subset (0 = all)", precision=0, minimum=0)
                                eval_size = gr.Number(form0["eval_size"], label="eval subset (0 = all)", precision=0, minimum=0)
                            with gr.Row():
                                seed = gr.Number(form0["seed"], label="seed", precision=0, minimum=0)
                                stage2_mode = gr.Dropdown(list(STAGE2_MODES), value=form0["stage2_mode"], label="HEFT stage-2 mode",
                                                          info="adapter: LoRA stays a frozen adapter; merged: merged into the weights")
                                precision = gr.Dropdown(list(PRECISIONS), value=form0["precision"], label="precision",
                                                        info="auto: bf16 on a GPU that has it, else fp32")
                    with gr.Column(scale=2, elem_classes="heft-side"):
                        gr.Markdown("### Before you launch")
                        estimate = gr.Markdown("", elem_id="heft-estimate")
                        launch_msg = gr.Markdown("", elem_id="heft-launch-msg")
                        launch = gr.Button("Launch", variant="primary", elem_id="heft-launch")

            # ============================================================== Runs
            with gr.Tab("Runs", id="runs") as runs_tab:
                with gr.Row():
                    status_filter = gr.Dropdown(views.STATUS_FILTERS, value="all", label="status", scale=1)
                    method_filter = gr.Dropdown(views.METHOD_FILTERS, value="all", label="method", scale=1)
                    text_filter = gr.Textbox("", label="search name / model / data", scale=2)
                    refresh = gr.Button("Refresh", scale=0, min_width=90)
                runs_table = gr.Dataframe(views.runs_frame([]), label="Runs (click a row to open it)", interactive=False,
                                          max_height=320, elem_id="heft-runs-table", wrap=True,
                                          column_widths=["5%", "24%", "8%", "6%", "13%", "8%", "5%", "13%", "8%", "10%"])
                with gr.Row(elem_classes="heft-actions"):
                    run_id = gr.Number(None, label="Selected run id", precision=0, minimum=0, scale=1, min_width=140, elem_id="heft-run-id")
                    with gr.Column(scale=4):
                        with gr.Row():
                            cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, size="md")
                            requeue_btn = gr.Button("Re-queue", interactive=False, size="md")
                            delete_btn = gr.Button("Delete", interactive=False, size="md")
                            zip_btn = gr.Button("Download artifacts (zip)", interactive=False, size="md")
                        action_msg = gr.Markdown("")
                zip_file = gr.File(label="Artifacts zip", interactive=False, visible=False, height=80)
                progress_md = gr.Markdown(views.progress_markdown(None), elem_id="heft-progress")
                with gr.Row():
                    loss_plot = gr.LinePlot(None, x="step", y="loss", color="stage", color_map=STAGE_COLORS, title="Training loss per step",
                                            height=280, elem_id="heft-loss-plot", x_title="optimizer step")
                    eval_plot = gr.ScatterPlot(None, x="cumulative_epoch", y="accuracy", color="stage", color_map=STAGE_COLORS,
                                               title="Validation accuracy (%) per epoch", height=280, elem_id="heft-eval-plot",
                                               x_title="cumulative epoch", y_title="accuracy (%)", tooltip="all",
                                               x_axis_format="~g", y_axis_format=".1f")
                log_box = gr.Textbox("", label=f"Log ({LOG_FILE}, last {LOG_LINES} lines)", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False,
                                     elem_classes="heft-log", autoscroll=True)
                with gr.Accordion("Run configuration (stored with the run)", open=False):
                    config_json = gr.JSON({}, label="config")
                table_timer = gr.Timer(TABLE_SECONDS, active=True)
                table_shown = gr.State(None)
                live_timer = gr.Timer(LIVE_SECONDS, active=False)
                live_state = gr.State({"run": None, "last_metric": 0, "n_evals": 0, "status": None})

            # ============================================================== Compare
            with gr.Tab("Compare", id="compare") as compare_tab:
                gr.Markdown(views.paper_context(), elem_classes="heft-note")
                with gr.Row():
                    compare_pick = gr.Dropdown([], value=[], multiselect=True, label="Finished runs to compare (two or more)", scale=4,
                                               elem_id="heft-compare-pick")
                    latest_batch = gr.Button("Latest batch", scale=0, min_width=120)
                    compare_btn = gr.Button("Compare", variant="primary", scale=0, min_width=120, elem_id="heft-compare-btn")
                verdict_md = gr.Markdown("", elem_id="heft-verdict")
                compare_table = gr.Dataframe(pd.DataFrame(columns=views.COMPARE_COLUMNS), label="Runs", interactive=False)
                pairs_table = gr.Dataframe(pd.DataFrame(columns=views.PAIR_COLUMNS), label="Pairwise McNemar exact tests (same questions)",
                                           interactive=False, wrap=True)
                with gr.Row():
                    compare_loss = gr.LinePlot(None, x="step", y="loss", color="run",
                                               title="Training loss", height=300, elem_id="heft-compare-loss")
                    compare_acc = gr.Plot(label="Accuracy vs cumulative epochs (95% Wilson intervals)", elem_id="heft-compare-acc")

            # ============================================================== Ask
            with gr.Tab("Ask", id="ask") as ask_tab:
                with gr.Row():
                    with gr.Column(scale=3):
                        passage = gr.Textbox("", label="Passage", lines=6, max_lines=12, elem_id="heft-passage")
                        question = gr.Textbox("", label="Question (yes/no)", elem_id="heft-question")
                        with gr.Row():
                            example_source = gr.Dropdown(_example_sources(), value="synthetic", allow_custom_value=True,
                                                         label="Example data", scale=2)
                            example_btn = gr.Button("Random validation example", scale=1)
                        gold_md = gr.Markdown("")
                    with gr.Column(scale=2):
                        pick_lora = gr.Dropdown([("(none)", 0)], value=0, label="LoRA run", elem_id="heft-pick-lora")
                        pick_reft = gr.Dropdown([("(none)", 0)], value=0, label="ReFT run", elem_id="heft-pick-reft")
                        pick_heft = gr.Dropdown([("(none)", 0)], value=0, label="HEFT run", elem_id="heft-pick-heft")
                        ask_model = gr.Textbox("embedded", label="Base model when no run is picked")
                        with gr.Row():
                            reload_picks = gr.Button("Reload runs")
                            release = gr.Button("Release model memory")
                            ask_btn = gr.Button("Answer", variant="primary", elem_id="heft-ask-btn")
                ask_msg = gr.Markdown("")
                cards = gr.HTML(views.answer_cards_html([]), elem_id="heft-cards")
                gold_state = gr.State(None)

        form_inputs = [model, data_kind, data_local, method, include_base, name, lora_rank, lora_alpha, lora_dropout, lora_targets,
                       lora_layers, reft_rank, reft_layers, reft_positions, reft_share, reft_dropout, lora_epochs, reft_epochs, lora_lr,
                       reft_lr, batch_size, grad_accum, warmup_ratio, weight_decay, scheduler, max_length, train_size, eval_size,
                       seed, stage2_mode, precision]
        assert len(form_inputs) == len(views.FORM_FIELDS)

        def read_form(values: tuple) -> tuple[dict[str, Any], str]:
            *fields, upload_value = values
            return dict(zip(views.FORM_FIELDS, fields)), upload_value

        # ------------------------------------------------------------------ Train handlers
        def on_preset(choice: str | None):
            if not choice:
                return [gr.skip()] * len(form_inputs) + [""]
            form = views.preset_form(choice)
            return [form[key] for key in views.FORM_FIELDS] + [views.PRESET_NOTES[choice]]

        def on_model(model_ref: str, current: list[str], layers_text: str):
            ref = (model_ref or "").strip()
            if not ref:
                return gr.skip(), "⚠️ choose a model", ""
            try:
                shape = views.model_shape(ref)
            except Exception as exc:  # ModelLoadError and friends: shown, never raised
                return gr.skip(), f"⚠️ {views.error_message(exc)}", ""
            modules = sorted(shape["linear"])
            kept = [m for m in (current or []) if m in modules] or [m for m in ("q_proj", "v_proj") if m in modules] or modules[:1]
            info = (f"{views.model_label(ref)}: {shape['num_layers']} layers (valid indices 0..{shape['num_layers'] - 1}), "
                    f"hidden size {shape['hidden_size']}, linear layers: {', '.join(modules)}")
            return gr.CheckboxGroup(choices=modules, value=kept), info, views.layers_message(layers_text, shape["num_layers"])

        def on_layers(model_ref: str, layers_text: str):
            try:
                depth = views.model_shape((model_ref or "").strip())["num_layers"]
            except Exception:
                depth = None
            return views.layers_message(layers_text, depth)

        def on_method(label: str):
            codes = views.method_codes(label) if label else ["heft"]
            uses_lora = any(c in ("lora", "heft") for c in codes)
            uses_reft = any(c in ("reft", "heft") for c in codes)
            return (gr.Group(visible=uses_lora), gr.Group(visible=uses_reft), gr.Checkbox(interactive=len(codes) > 1),
                    gr.Number(interactive=uses_lora), gr.Number(interactive=uses_reft), gr.Number(interactive=uses_lora),
                    gr.Number(interactive=uses_reft), gr.Dropdown(interactive="heft" in codes))

        def on_upload(file_value: Any):
            if not file_value:
                return gr.skip(), gr.skip(), ""
            path = file_value if isinstance(file_value, str) else getattr(file_value, "name", None) or file_value.get("path")
            try:
                stored = views.save_upload(path, data_home() / "uploads")
            except (ValueError, OSError) as exc:
                return gr.skip(), gr.skip(), f"⚠️ {exc}"
            return str(stored), views.DATA_UPLOAD, f"Stored as `{stored}`; the run reads it from there (split 80/20 into train/validation)."

        def on_estimate(*values):
            form, upload_value = read_form(values)
            return views.estimate_markdown(form, upload_value or None), views.epochs_message(form)

        def on_data_kind(kind: str):
            return gr.Textbox(visible=kind == views.DATA_LOCAL), gr.Row(visible=kind == views.DATA_UPLOAD)

        def on_launch(*values):
            form, upload_value = read_form(values)
            try:
                configs = views.form_to_configs(form, upload_value or None)
                runs = service.submit_runs(engine, configs)
            except Exception as exc:  # ConfigError, DataError, ModelLoadError, ValueError: a message, no traceback
                if not isinstance(exc, (ConfigError, ValueError, RuntimeError, OSError)):
                    logger.exception("launch failed")
                return _msg(views.error_message(exc), error=True), gr.skip(), gr.skip(), gr.skip()
            ids = ", ".join(f"#{run.id}" for run in runs)
            text = f"✅ Queued {len(runs)} run{'s' if len(runs) > 1 else ''}: {ids}. Opening the Runs tab…"
            return text, gr.Tabs(selected="runs"), runs[0].id, gr.Timer(TABLE_SECONDS, active=True)

        preset.change(on_preset, preset, form_inputs + [preset_note], **PRIVATE)
        model.change(on_model, [model, lora_targets, reft_layers], [lora_targets, model_msg, layers_msg], trigger_mode="always_last", **PRIVATE)
        reft_layers.change(on_layers, [model, reft_layers], layers_msg, show_progress="hidden", **PRIVATE)
        reft_positions.change(views.positions_message, reft_positions, positions_msg, show_progress="hidden", **PRIVATE)
        method.change(on_method, method, [lora_group, reft_group, include_base, lora_epochs, reft_epochs, lora_lr, reft_lr, stage2_mode], **PRIVATE)
        upload.upload(on_upload, upload, [upload_path, data_kind, upload_msg], **PRIVATE)
        gr.on([c.change for c in form_inputs] + [upload_path.change], on_estimate, form_inputs + [upload_path], [estimate, epochs_md],
              trigger_mode="always_last", show_progress="hidden", **PRIVATE)
        data_kind.change(on_data_kind, data_kind, [data_local, upload_row], show_progress="hidden", **PRIVATE)
        launch.click(on_launch, form_inputs + [upload_path], [launch_msg, tabs, run_id, table_timer], **PRIVATE)

        # ------------------------------------------------------------------ Runs handlers
        def refresh_table(status: str, method_name: str, text: str, shown: str | None):
            frame = views.runs_frame(all_runs(**views.filter_args(status, method_name, text)))
            timer = gr.Timer(TABLE_SECONDS if any_active() else IDLE_TABLE_SECONDS, active=True)
            signature = frame.to_json()
            if signature == shown:  # unchanged: leave the table (and the user's scroll position) alone
                return gr.skip(), timer, shown
            return frame, timer, signature

        def on_row(evt: gr.SelectData):
            row = evt.row_value or []
            try:
                return int(row[0]), ""
            except (IndexError, TypeError, ValueError):
                return gr.skip(), gr.skip()

        def run_view(value: Any, state: dict | None, full: bool):
            """Outputs of the live view; plots and config only when something changed (or full)."""
            run = get_run(value) if value else None
            state = dict(state or {})
            buttons = [gr.Button(interactive=False)] * 4
            if run is None:
                message = views.progress_markdown(None) if not value else f"⚠️ Run {value!r} does not exist (it may have been deleted)."
                new_state = {"run": None, "last_metric": 0, "n_evals": 0, "status": None}
                return [message, None, None, "", {}, *buttons, new_state, gr.Timer(active=False)]
            metrics = queries.metrics_since(engine, run.id, 0)
            evals = queries.evaluations(engine, run.id)
            last_metric = metrics[-1]["id"] if metrics else 0
            same_run = state.get("run") == run.id
            changed = full or not same_run or last_metric != state.get("last_metric") or len(evals) != state.get("n_evals")
            status_changed = full or not same_run or run.status != state.get("status")
            active = run.status in views.ACTIVE_STATUSES
            log_path = Path(run.artifact_dir) / LOG_FILE if run.artifact_dir else None
            log_text = log_tail(log_path, LOG_LINES) if log_path else ""
            if not log_text and not active and log_path and log_path.parent.is_dir() and not log_path.exists():
                log_text = f"(no {LOG_FILE} in this run's directory: it was trained outside the app's worker, e.g. by bench/reproduce.py)"
            if status_changed:
                has_dir = bool(run.artifact_dir) and Path(run.artifact_dir).is_dir()
                buttons = [gr.Button(interactive=active), gr.Button(interactive=run.status in ("failed", "interrupted", "cancelled")),
                           gr.Button(interactive=run.status != "running"), gr.Button(interactive=has_dir and not active)]
            else:
                buttons = [gr.skip()] * 4
            # Gradio applies new data and new axis limits together only when the limits stay the same:
            # after the limits change, the same accuracy chart is sent once more on the next tick.
            eval_frame = views.eval_frame(evals)
            limits = _eval_limits(eval_frame)
            send_eval = changed or bool(state.get("resend_eval"))
            resend_eval = send_eval and limits != state.get("eval_limits") and limits is not None
            new_state = {"run": run.id, "last_metric": last_metric, "n_evals": len(evals), "status": run.status,
                         "eval_limits": limits if send_eval else state.get("eval_limits"), "resend_eval": resend_eval}
            return [views.progress_markdown(run), _plot(views.loss_frame(metrics)) if changed else gr.skip(),
                    _eval_plot(eval_frame, limits) if send_eval else gr.skip(), log_text if (changed or status_changed or active) else gr.skip(),
                    run.config if (full or not same_run) else gr.skip(), *buttons, new_state, gr.Timer(active=active or resend_eval)]

        live_outputs = [progress_md, loss_plot, eval_plot, log_box, config_json, cancel_btn, requeue_btn, delete_btn, zip_btn, live_state, live_timer]

        def on_select_run(value: Any, state: dict | None):
            return run_view(value, state, full=True) + [gr.File(value=None, visible=False)]

        def on_tick(value: Any, state: dict | None):
            return run_view(value, state, full=False)

        def on_cancel(value: Any):
            try:
                outcome = service.cancel_run(engine, value)
            except ValueError as exc:
                return _msg(str(exc), error=True)
            return {"cancelled": f"Run #{int(value)} cancelled.", "cancel_requested": f"Cancel requested for run #{int(value)}; it stops at the next step."}.get(
                outcome, f"Run #{int(value)} is already {outcome}.")

        def on_requeue(value: Any):
            try:
                new = service.requeue_run(engine, value)
            except ValueError as exc:
                return _msg(str(exc), error=True), gr.skip(), gr.skip()
            return f"Re-queued run #{int(value)} as run #{new.id}.", new.id, gr.Timer(TABLE_SECONDS, active=True)

        def on_delete(value: Any):
            try:
                deleted = service.delete_run(engine, value)
            except ValueError as exc:
                return _msg(str(exc), error=True), gr.skip()
            return (f"Deleted run #{int(value)} and its files." if deleted else f"Run {value} did not exist."), None

        def on_zip(value: Any):
            run = get_run(value) if value else None
            if run is None or not run.artifact_dir or not Path(run.artifact_dir).is_dir():
                return gr.File(value=None, visible=False), _msg("this run has no artifact directory to download", error=True)
            path = views.zip_run_dir(run.artifact_dir, run.id, tempfile.mkdtemp(prefix="heft-zip-"))
            return gr.File(value=str(path), visible=True), f"Zipped run #{run.id} ({path.stat().st_size / 1e6:.1f} MB): download it below."

        filters = [status_filter, method_filter, text_filter, table_shown]
        table_outputs = [runs_table, table_timer, table_shown]
        table_timer.tick(refresh_table, filters, table_outputs, show_progress="hidden", **PRIVATE)
        gr.on([refresh.click, status_filter.change, method_filter.change, text_filter.submit, runs_tab.select],
              refresh_table, filters, table_outputs, show_progress="hidden", **PRIVATE)
        runs_table.select(on_row, None, [run_id, action_msg], **PRIVATE)
        run_id.change(on_select_run, [run_id, live_state], live_outputs + [zip_file], show_progress="hidden", **PRIVATE)
        live_timer.tick(on_tick, [run_id, live_state], live_outputs, show_progress="hidden", **PRIVATE)
        cancel_btn.click(on_cancel, run_id, action_msg, **PRIVATE).then(on_tick, [run_id, live_state], live_outputs, **PRIVATE)
        requeue_btn.click(on_requeue, run_id, [action_msg, run_id, table_timer], **PRIVATE)
        delete_btn.click(on_delete, run_id, [action_msg, run_id], **PRIVATE).then(refresh_table, filters, table_outputs, **PRIVATE)
        zip_btn.click(on_zip, run_id, [zip_file, action_msg], **PRIVATE)

        # ------------------------------------------------------------------ Compare handlers
        def compare_choices():
            runs = all_runs(status="completed")
            return [(views.run_choice_label(r), r.id) for r in runs], runs

        def on_compare_tab(current: list):
            choices, runs = compare_choices()
            ids = {value for _, value in choices}
            value = [v for v in (current or []) if v in ids]
            if not value:
                value = _latest_batch(runs)
            return gr.Dropdown(choices=choices, value=value)

        def on_latest_batch():
            choices, runs = compare_choices()
            return gr.Dropdown(choices=choices, value=_latest_batch(runs))

        def on_compare(selected: list):
            from heft_core.artifacts import RunLoadError, load_run

            ids = []
            for value in selected or []:
                try:
                    ids.append(queries.validate_run_id(value))
                except ValueError:
                    continue
            runs = [r for r in (get_run(i) for i in ids) if r is not None and r.status == "completed"]
            if len(runs) < 2:
                empty = views.compare_runs([], {}, {}, {})
                return ("Pick two or more completed runs.", empty["table"], empty["pairs"], None, None)
            metrics = {r.id: queries.metrics_since(engine, r.id, 0) for r in runs}
            evals = {r.id: queries.evaluations(engine, r.id) for r in runs}
            correctness: dict[int, Any] = {}
            for r in runs:
                try:
                    correctness[r.id] = load_run(r.artifact_dir).correctness() if r.artifact_dir else "no artifact directory"
                except (RunLoadError, OSError, ValueError) as exc:
                    correctness[r.id] = f"run #{r.id}'s predictions cannot be read ({exc})"
            result = views.compare_runs(runs, metrics, evals, correctness)
            text = "\n".join(f"- {line}" for line in result["verdicts"])
            loss = gr.LinePlot(value=_plot(result["loss"]), color_map=result["colors"])
            return text, result["table"], result["pairs"], loss, views.accuracy_figure(result["accuracy"], result["colors"])

        compare_tab.select(on_compare_tab, compare_pick, compare_pick, **PRIVATE)
        latest_batch.click(on_latest_batch, None, compare_pick, **PRIVATE)
        compare_btn.click(on_compare, compare_pick, [verdict_md, compare_table, pairs_table, compare_loss, compare_acc], **PRIVATE)

        # ------------------------------------------------------------------ Ask handlers
        def on_ask_tab(cur_lora: Any, cur_reft: Any, cur_heft: Any):
            runs = all_runs(status="completed")
            defaults = _ask_defaults(runs)
            outputs = []
            for slot, current in (("lora", cur_lora), ("reft", cur_reft), ("heft", cur_heft)):
                mine = [r for r in runs if r.method == slot]
                choices = [("(none)", 0)] + [(views.run_choice_label(r), r.id) for r in mine]
                keep = current if current and any(r.id == current for r in mine) else defaults.get(slot, 0)
                outputs.append(gr.Dropdown(choices=choices, value=keep))
            sources = _example_sources() + sorted({r.data_source for r in runs} - set(_example_sources()))
            return [*outputs, gr.Dropdown(choices=sources)]

        def on_example(source: str):
            try:
                example = asker.random_example(source)
            except AskError as exc:
                return gr.skip(), gr.skip(), _msg(str(exc), error=True), None
            gold = {"passage": example.passage, "question": example.question, "answer": bool(example.answer)}
            return example.passage, example.question, f"Gold answer: **{'yes' if example.answer else 'no'}** (from {source})", gold

        def on_ask(passage_text: str, question_text: str, lora_id: Any, reft_id: Any, heft_id: Any, base_model: str, gold: dict | None):
            try:
                result = asker.answer(passage_text, question_text, {"lora": lora_id, "reft": reft_id, "heft": heft_id}, base_model)
            except AskError as exc:
                return _msg(str(exc), error=True), views.answer_cards_html([])
            except Exception as exc:  # a model that fails to load or run: say so, keep the page alive
                logger.exception("ask failed")
                return _msg(f"could not answer: {type(exc).__name__}: {exc}", error=True), views.answer_cards_html([])
            known = gold if gold and gold.get("passage") == passage_text and gold.get("question") == question_text else None
            answers = result["answers"]
            # Always four cards: a slot without a run says so.
            shown = {a["slot"]: a for a in answers}
            cards_data = [shown.get(slot, {"slot": slot, "title": views.SHORT_METHOD[slot], "subtitle": "",
                                          "error": f"no {views.SHORT_METHOD[slot]} run picked"}) for slot in views.ASK_SLOTS]
            return f"Answered with base model **{views.model_label(result['model'])}**.", views.answer_cards_html(cards_data, known["answer"] if known else None)

        ask_tab.select(on_ask_tab, [pick_lora, pick_reft, pick_heft], [pick_lora, pick_reft, pick_heft, example_source], **PRIVATE)
        reload_picks.click(on_ask_tab, [pick_lora, pick_reft, pick_heft], [pick_lora, pick_reft, pick_heft, example_source], **PRIVATE)
        def on_release():
            asker.close()
            return "Released the loaded model; the next answer loads it again."

        release.click(on_release, None, ask_msg, **PRIVATE)
        example_btn.click(on_example, example_source, [passage, question, gold_md, gold_state], **PRIVATE)
        ask_btn.click(on_ask, [passage, question, pick_lora, pick_reft, pick_heft, ask_model, gold_state], [ask_msg, cards], **PRIVATE)

        # ------------------------------------------------------------------ page load
        def on_load(request: gr.Request):
            """Re-attach: the run named in ?run=N (and open the Runs tab), else the running or newest run."""
            wanted, tab = None, gr.skip()
            asked = request.query_params.get("run") if request is not None and request.query_params else None
            if asked:
                try:
                    wanted, tab = queries.validate_run_id(asked), gr.Tabs(selected="runs")
                except ValueError:
                    wanted = None
            if wanted is None:
                running = queries.list_runs(engine, status="running", limit=1)
                latest = running or queries.list_runs(engine, limit=1)
                wanted = latest[0].id if latest else None
            frame, timer, shown = refresh_table("all", "all", "", None)
            return frame, timer, shown, wanted, tab

        demo.load(on_load, None, [runs_table, table_timer, table_shown, run_id, tabs], **PRIVATE)
        demo.load(on_model, [model, lora_targets, reft_layers], [lora_targets, model_msg, layers_msg], **PRIVATE)
        demo.load(on_estimate, form_inputs + [upload_path], [estimate, epochs_md], show_progress="hidden", **PRIVATE)

        # ------------------------------------------------------------------ API (gradio_client)
        def start_run(config_json: str) -> dict:
            """Queue runs. config_json: a RunConfig as JSON, or {"configs": [...]} for a comparison batch.
            Returns {"run_ids": [...]} or {"error": "..."}."""
            try:
                configs = views.parse_config_payload(config_json)
                runs = service.submit_runs(engine, configs)
            except Exception as exc:
                return {"error": views.plain(views.error_message(exc))}
            return {"run_ids": [run.id for run in runs]}

        def cancel_run(run_id: int) -> dict:
            """Cancel a queued or running run. Returns {"run_id", "status"} or {"error"}."""
            try:
                rid = queries.validate_run_id(run_id)
                return {"run_id": rid, "status": service.cancel_run(engine, rid)}
            except ValueError as exc:
                return {"error": str(exc)}

        def list_runs(status: str = "") -> list[dict]:
            """Runs newest first, optionally only those with a status (queued, running, completed, failed, cancelled, interrupted)."""
            wanted = (status or "").strip().lower() or None
            if wanted and wanted not in views.STATUS_FILTERS[1:]:
                return [{"error": f"unknown status {status!r}; use one of {', '.join(views.STATUS_FILTERS[1:])} or ''"}]
            return [views.run_summary(run) for run in all_runs(status=wanted)]

        def run_detail(run_id: int) -> dict:
            """One run: fields, progress, config, step metrics and per-epoch evaluations; or {"error"}."""
            try:
                rid = queries.validate_run_id(run_id)
            except ValueError as exc:
                return {"error": str(exc)}
            run = queries.get_run(engine, rid)
            if run is None:
                return {"error": f"run {rid} does not exist"}
            return views.run_detail(run, queries.metrics_since(engine, rid, 0), queries.evaluations(engine, rid))

        def ask(passage: str, question: str, run_ids_json: str) -> dict:
            """Answer with the base model and runs: run_ids_json is [3, 4, 5] or {"lora": 3, "reft": 4, "heft": 5}.
            Returns {"model", "answers": [{slot, title, run_id, answer, p_yes, latency_seconds}]} or {"error"}."""
            try:
                return asker.answer(passage, question, parse_run_ids(run_ids_json))
            except AskError as exc:
                return {"error": str(exc)}
            except Exception as exc:
                logger.exception("ask API failed")
                return {"error": f"{type(exc).__name__}: {exc}"}

        for fn in (start_run, cancel_run, list_runs, run_detail, ask):
            gr.api(fn, api_name=fn.__name__)

    demo.heft_ask_service = asker  # so callers can release the model (demo.heft_ask_service.close())
    return demo


# ---------------------------------------------------------------------- small helpers


def _plot(frame: pd.DataFrame) -> pd.DataFrame | None:
    """An empty frame draws bare axes with a stray legend; None shows the plot's empty state."""
    return None if frame.empty else frame


def _eval_limits(frame: pd.DataFrame) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Axis limits with room around the points (Vega would put them on the plot's edges)."""
    if frame.empty:
        return None
    low, high = float(frame["low"].min()), float(frame["high"].max())
    return (0.0, float(frame["cumulative_epoch"].max()) + 0.5), (max(0.0, low - 5), min(100.0, high + 5))


def _eval_plot(frame: pd.DataFrame, limits: tuple[tuple[float, float], tuple[float, float]] | None) -> Any:
    if frame.empty or limits is None:
        return None
    return gr.ScatterPlot(value=frame, x_lim=list(limits[0]), y_lim=list(limits[1]))


def _warm(model_ref: str) -> None:
    from heft_core.models import model_info

    try:
        model_info(model_ref)  # cached; launching a run checks the model with it
    except Exception as exc:  # only a cache warm-up
        logger.info("could not read %s's shape in advance: %s", model_ref, exc)


def _example_sources() -> list[str]:
    sources = ["synthetic"]
    local = views.default_local_dir()
    if local:
        sources.append(local)
    sources.append("hub")
    return sources


def _latest_batch(runs: list[Any]) -> list[int]:
    """A sensible default selection (runs newest first): the newest run's batch, else the newest
    runs evaluated on the same questions as the newest run, else the newest batch."""
    if not runs:
        return []
    newest = runs[0]
    if newest.batch_id:
        batch = [r.id for r in runs if r.batch_id == newest.batch_id]
        if len(batch) >= 2:
            return sorted(batch)
    same = [r.id for r in runs if newest.eval_signature and r.eval_signature == newest.eval_signature][:4]
    if len(same) >= 2:
        return sorted(same)
    for run in runs:
        if run.batch_id:
            batch = [r.id for r in runs if r.batch_id == run.batch_id]
            if len(batch) >= 2:
                return sorted(batch)
    return []


def _ask_defaults(runs: list[Any]) -> dict[str, int]:
    """Latest completed LoRA/ReFT/HEFT run, all on the base model of the newest of them."""
    trained = [r for r in runs if r.method in ("lora", "reft", "heft")]
    if not trained:
        return {}
    model_ref = trained[0].base_model
    defaults: dict[str, int] = {}
    for run in trained:
        if run.method not in defaults and normalise_model(run.base_model) == normalise_model(model_ref):
            defaults[run.method] = run.id
    return defaults
