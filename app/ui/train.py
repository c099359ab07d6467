"""The Train tab: the training form (one component per field, named as in ``app.forms``), estimates, Launch.

Every handler that needs the form gets it as {field name: value} (``Manager.values``); what the
form means is ``app.forms``' business, queueing is ``app.service``'s.
"""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from app import forms, present, service, timing
from app.permissions import Action, actor_from
from app.ui.manager import Manager
from app.ui.runs import TABLE_SECONDS
from heft_common.errors import HeftError
from heft_common.home import data_home
from heft_core.config import LORA_LOSSES, PRECISIONS, SCHEDULERS, SCORINGS, STAGE2_MODES, TRACKERS, WANDB_MODES
from heft_core.prompt import PROMPT_FORMATS

logger = logging.getLogger(__name__)

PRIVATE = {"api_visibility": "private"}
FORM = forms.FORM_FIELDS + (forms.UPLOAD_FIELD,)  # what a handler of the whole form reads
# Parts the method choice shows, hides or locks (see on_method).
# Where each field's validation message shows: right below the row or group that holds the field.
# ReFT layers and positions have their own live messages (train.layers_msg, train.positions_msg).
MESSAGE_AREAS = ("train.data_msg", "train.lora_msg", "train.reft_msg", "train.stage_msg", "train.training_msg")
STAGE_ROW = ("lora_stage.epochs", "reft_stage.epochs", "lora_stage.learning_rate", "reft_stage.learning_rate")
OWN_MESSAGES = ("reft.layers", "reft.positions")


def message_area(field: str) -> str | None:
    """The message component next to ``field`` (None: the field has its own live message)."""
    if field in OWN_MESSAGES:
        return None
    if field in ("data_kind", "data_local", forms.UPLOAD_FIELD):
        return "train.data_msg"
    if field.startswith("lora."):
        return "train.lora_msg"
    if field.startswith("reft."):
        return "train.reft_msg"
    return "train.stage_msg" if field in STAGE_ROW else "train.training_msg"


def field_messages(errors: dict[str, str]) -> dict[str, str]:
    """{message area: Markdown} for every area, empty where its fields are valid."""
    shown: dict[str, list[str]] = {area: [] for area in MESSAGE_AREAS}
    for field, message in errors.items():
        area = message_area(field)
        if area is not None:
            shown[area].append(present.error(message))
    return {area: "\n\n".join(lines) for area, lines in shown.items()}


def _elem_id(name: str) -> str:
    """"lora.rank" -> "heft-f-lora-rank", "*.batch_size" -> "heft-f-all-batch_size" (stable ids for tests)."""
    return "heft-f-" + name.replace("*", "all").replace(".", "-")


METHOD_DEPENDENT = ("train.lora_group", "train.reft_group", "include_base", "lora_stage.epochs", "reft_stage.epochs",
                    "lora_stage.learning_rate", "reft_stage.learning_rate", "heft_stage2_mode")


def layout(ui: Manager) -> None:
    """The Train tab's components, each registered in ``ui``; form fields open with ``forms.default_form()``."""
    form0 = forms.default_form()

    def field(name: str, kind: type, *args: Any, **kwargs: Any) -> Any:
        # No minimum=/maximum= on number boxes: Gradio's own range check fails before any handler, with a
        # pop-up that names no field; our validation (app.forms.field_errors) names the option and its range.
        return ui.add(name, kind(*args, value=form0[name], elem_id=_elem_id(name), **kwargs))

    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Group():
                    ui.add("train.preset", gr.Dropdown(list(forms.PRESETS), value=None,
                                                       label="Preset (fills the whole form; edit anything afterwards)"))
                    ui.add("train.preset_note", gr.Markdown("*Pick a preset, or set every option below yourself.*",
                                                            elem_classes="heft-note heft-pad"))
                with gr.Group():
                    with gr.Row():
                        field("model", gr.Dropdown, forms.MODEL_CHOICES, allow_custom_value=True, scale=3,
                              label="Base model",
                              info="Embedded SmolLM2 works offline; or type a hub id / local model directory")
                        field("method", gr.Radio, list(forms.METHOD_LABELS.values()), label="Method", scale=4)
                    ui.add("train.model_msg", gr.Markdown("", elem_classes="heft-note heft-pad"))
                _data_source(ui, field)
                with gr.Row():
                    field("name", gr.Textbox, label="Run name (optional)", scale=3)
                    field("include_base", gr.Checkbox, label="Also queue a zero-shot base run (batch only)", scale=2)
                _lora_options(ui, field)
                _reft_options(ui, field, form0)
                _training_options(ui, field, form0)
                _report_options(field)
            with gr.Column(scale=2, elem_classes="heft-side"):
                gr.Markdown("### Before you launch")
                ui.add("train.estimate", gr.Markdown("", elem_id="heft-estimate"))
                ui.add("train.launch_msg", gr.Markdown("", elem_id="heft-launch-msg"))
                ui.add("train.launch", gr.Button("Launch", variant="primary", elem_id="heft-launch"))
    missing = [name for name in FORM if name not in ui]
    if missing:  # a field of app.forms without its component would silently keep its default
        raise RuntimeError(f"the Train tab has no component for form field(s) {', '.join(missing)}")


def _data_source(ui: Manager, field: Any) -> None:
    with gr.Group():
        field("data_kind", gr.Radio, forms.DATA_KINDS, label="Data source")
        field("data_local", gr.Textbox, label="Local BoolQ directory or file", visible=False,
              info="train/validation .jsonl/.json/.csv/.parquet (google/boolq or SuperGLUE schema)")
        ui.add("train.data_msg", gr.Markdown("", elem_classes="heft-note heft-pad heft-msg", elem_id="heft-data-msg"))
        with gr.Row(visible=False) as upload_row:
            ui.add("train.upload", gr.File(label="Upload a data file (.jsonl/.json/.csv/.parquet; split 80/20)",
                                           file_types=list(forms.UPLOAD_EXTENSIONS), scale=2))
            ui.add(forms.UPLOAD_FIELD, gr.Textbox("", label="Uploaded file (stored in the data home)",
                                                  interactive=False, scale=3))
        ui.add("train.upload_row", upload_row)
        ui.add("train.upload_msg", gr.Markdown("", elem_classes="heft-note heft-pad heft-msg"))


def _lora_options(ui: Manager, field: Any) -> None:
    with gr.Group() as lora_group:
        gr.Markdown("**LoRA** (weight space; HEFT stage 1)")
        with gr.Row():
            field("lora.rank", gr.Number, label="rank r", precision=0)
            field("lora.alpha", gr.Number, label="alpha")
            field("lora.dropout", gr.Number, label="dropout", step=0.01)
            field("lora.layers", gr.Textbox, label="layers (empty = all)", placeholder="e.g. 0-11")
        field("lora.target_modules", gr.CheckboxGroup, forms.LORA_MODULES,
              label="target modules (the model's linear layers)")
        ui.add("train.lora_msg", gr.Markdown("", elem_classes="heft-note heft-pad heft-msg", elem_id="heft-lora-msg"))
    ui.add("train.lora_group", lora_group)


def _reft_options(ui: Manager, field: Any, form0: dict[str, Any]) -> None:
    with gr.Group() as reft_group:
        gr.Markdown("**ReFT** (LoReFT on the residual stream; HEFT stage 2)")
        with gr.Row():
            field("reft.rank", gr.Number, label="rank r", precision=0)
            field("reft.layers", gr.Textbox, label="layers", placeholder="all, or 0,2,4-7")
            field("reft.positions", gr.Textbox, label="positions", placeholder="f7+l7, l1, f3")
            field("reft.dropout", gr.Number, label="dropout", step=0.01)
        with gr.Row():
            field("reft.share_weights", gr.Checkbox, label="share weights between first and last positions")
            ui.add("train.layers_msg", gr.Markdown("", elem_classes="heft-note", elem_id="heft-layers-msg"))
            ui.add("train.positions_msg", gr.Markdown(forms.positions_message(form0["reft.positions"]),
                                                      elem_classes="heft-note", elem_id="heft-positions-msg"))
        ui.add("train.reft_msg", gr.Markdown("", elem_classes="heft-note heft-pad heft-msg", elem_id="heft-reft-msg"))
    ui.add("train.reft_group", reft_group)


def _training_options(ui: Manager, field: Any, form0: dict[str, Any]) -> None:
    with gr.Group():
        gr.Markdown("**Training** (HEFT runs E1 LoRA epochs, then E2 ReFT epochs)", elem_classes="heft-pad")
        with gr.Row():
            field("lora_stage.epochs", gr.Number, label="LoRA epochs (E1)", precision=0)
            field("reft_stage.epochs", gr.Number, label="ReFT epochs (E2)", precision=0)
            field("lora_stage.learning_rate", gr.Number, label="LoRA learning rate")
            field("reft_stage.learning_rate", gr.Number, label="ReFT learning rate")
        ui.add("train.stage_msg", gr.Markdown("", elem_classes="heft-note heft-pad heft-msg", elem_id="heft-stage-msg"))
        ui.add("train.epochs_msg", gr.Markdown(forms.epochs_message(form0), elem_classes="heft-note heft-pad",
                                               elem_id="heft-epochs"))
        with gr.Row():
            field("*.batch_size", gr.Number, label="batch size", precision=0)
            field("*.grad_accum", gr.Number, label="grad accumulation", precision=0)
            field("*.warmup_ratio", gr.Number, label="warmup ratio", step=0.01)
            field("*.weight_decay", gr.Number, label="weight decay", step=0.01)
        with gr.Row():
            field("*.scheduler", gr.Dropdown, list(SCHEDULERS), label="scheduler")
            field("max_length", gr.Number, label="max length (tokens)", precision=0)
            field("train_size", gr.Number, label="train subset (0 = all)", precision=0)
            field("eval_size", gr.Number, label="eval subset (0 = all)", precision=0)
        with gr.Row():
            field("seed", gr.Number, label="seed", precision=0)
            field("heft_stage2_mode", gr.Dropdown, list(STAGE2_MODES), label="HEFT stage-2 mode",
                  info="adapter: LoRA stays a frozen adapter; merged: merged into the weights")
            field("precision", gr.Dropdown, list(PRECISIONS), label="precision",
                  info="auto: bf16 on a GPU that has it, else fp32")
            ui.add("train.precision_msg", gr.Markdown(forms.precision_message(form0["precision"]),
                                                      elem_classes="heft-note", elem_id="heft-precision-msg"))
            field("processes", gr.Number, label="processes (GPUs) per run", precision=0,
                  info="data-parallel on one machine; batch size is per process")
        with gr.Row():
            field("checkpoint_minutes", gr.Number, label="checkpoint every (minutes)",
                  info="inside an epoch, for Resume after a crash; 0: only at epoch ends (always written)")
            field("keep_epoch_checkpoints", gr.Checkbox, label="keep every epoch's checkpoint",
                  info="else only the latest (a completed run keeps none)")
        with gr.Row():  # the paper's recipe (arXiv 2509.09801): its loss, scoring and batch for the LoRA stage
            field("lora_stage.batch_size", gr.Textbox, label="LoRA batch size", placeholder="as above",
                  info="empty: the batch size above")  # a text box: a number box cannot be empty
            field("lora_stage.grad_accum", gr.Textbox, label="LoRA grad accumulation", placeholder="as above",
                  info="empty: the accumulation above")  # a text box: a number box cannot be empty
            field("lora_loss", gr.Dropdown, list(LORA_LOSSES), label="LoRA loss",
                  info="answer: the answer token; sequence: causal LM over prompt + answer (the paper's)")
            field("scoring", gr.Dropdown, list(SCORINGS), label="scoring",
                  info="logits: the two answer tokens; generation: the paper's rule; both: logits headline")
            field("generation_max_new_tokens", gr.Number, label="max new tokens (generation)", precision=0)
        with gr.Row():
            field("template.format", gr.Dropdown, list(PROMPT_FORMATS), label="prompt format",
                  info="chat: the model's own chat template")
            field("template.system", gr.Textbox, label="system line (chat)")
            field("template.after_question", gr.Textbox, label="answer cue (after the question)")
            field("template.yes", gr.Textbox, label="yes word")
            field("template.no", gr.Textbox, label="no word")
        ui.add("train.training_msg", gr.Markdown("", elem_classes="heft-note heft-pad heft-msg",
                                                 elem_id="heft-training-msg"))


def _report_options(field: Any) -> None:
    """Trackers the run reports to (heft_core.trackers); credentials come from their own login, never from here."""
    with gr.Group():
        gr.Markdown("**Report to** experiment trackers (besides this app's registry; logins and API keys come from "
                    "each tracker's own environment variables or login, never from this form)", elem_classes="heft-pad")
        with gr.Row():
            field("report.report_to", gr.Dropdown, list(TRACKERS), multiselect=True, label="report to", scale=2)
            field("report.project", gr.Textbox, label="project / experiment")
            field("report.wandb_mode", gr.Dropdown, list(WANDB_MODES), label="W&B mode")
        with gr.Row():
            field("report.trackio_space_id", gr.Textbox, label="Trackio Space (empty = local)",
                  placeholder="user/space")
            field("report.tensorboard_dir", gr.Textbox, label="TensorBoard log dir (empty = the run's directory)")
            field("report.mlflow_tracking_uri", gr.Textbox, label="MLflow tracking URI",
                  placeholder="empty = MLFLOW_TRACKING_URI or a file store in the data home")


def _upload_path(file_value: Any) -> str | None:
    """The temporary path of an uploaded file, whichever form Gradio hands it in."""
    if isinstance(file_value, str):
        return file_value
    return getattr(file_value, "name", None) or file_value.get("path")


def wire(ui: Manager, engine: Any, demo: gr.Blocks) -> None:
    """The Train tab's events, and what its form shows when a page opens (the model's shape, the estimate)."""

    def on_preset(choice: str | None) -> dict[Any, Any]:
        if not choice:
            return ui.updates({"train.preset_note": ""})
        form = forms.preset_form(choice)
        return ui.updates({**{name: form[name] for name in forms.FORM_FIELDS},
                           "train.preset_note": forms.PRESET_NOTES[choice]})

    def on_model(model_ref: str, current: list[str], layers_text: str) -> tuple[Any, str, str]:
        ref = (model_ref or "").strip()
        if not ref:
            return gr.skip(), present.warning("choose a model"), ""
        try:
            found = forms.model_fields(ref, current, layers_text)
        except HeftError as exc:  # a model that cannot be read: say so next to the field
            return gr.skip(), present.warning(forms.error_message(exc)), ""
        return gr.CheckboxGroup(choices=found.modules, value=found.targets), found.summary, found.layers_message

    def on_layers(model_ref: str, layers_text: str) -> str:
        return forms.layers_message(layers_text, forms.model_depth(model_ref))

    def on_method(label: str) -> dict[Any, Any]:
        parts = forms.method_parts(label)
        return ui.updates({
            "train.lora_group": gr.Group(visible=parts.lora), "train.reft_group": gr.Group(visible=parts.reft),
            "include_base": gr.Checkbox(interactive=parts.batch),
            "lora_stage.epochs": gr.Number(interactive=parts.lora),
            "reft_stage.epochs": gr.Number(interactive=parts.reft),
            "lora_stage.learning_rate": gr.Number(interactive=parts.lora),
            "reft_stage.learning_rate": gr.Number(interactive=parts.reft),
            "heft_stage2_mode": gr.Dropdown(interactive=parts.heft),
        })

    def on_upload(file_value: Any) -> tuple[Any, Any, str]:
        if not file_value:
            return gr.skip(), gr.skip(), ""
        try:
            stored = service.save_upload(_upload_path(file_value), data_home() / "uploads")
        except (HeftError, OSError) as exc:  # wrong extension, unreadable upload
            return gr.skip(), gr.skip(), present.error(str(exc))
        return str(stored), forms.DATA_UPLOAD, present.upload_message(stored)

    def on_estimate(data: dict[Any, Any]) -> list[str]:
        """The estimate (from this machine's measured speeds), the epoch count and every field's message."""
        form = ui.values(data)
        try:
            speeds = timing.measured_speeds(engine, str(form.get("model") or ""))
        except HeftError:  # an unreadable model reference: the model message says why
            speeds = {}
        messages = field_messages(forms.field_errors(form))
        return [forms.estimate_markdown(form, speeds=speeds), forms.epochs_message(form),
                *(messages[area] for area in MESSAGE_AREAS)]

    def on_data_kind(kind: str) -> tuple[Any, Any]:
        return gr.Textbox(visible=kind == forms.DATA_LOCAL), gr.Row(visible=kind == forms.DATA_UPLOAD)

    def on_launch(data: dict[Any, Any], request: gr.Request,
                  profile: gr.OAuthProfile | None) -> tuple[Any, Any, Any, Any]:
        try:
            actor = actor_from(profile, request)
            service.authorize(actor, Action.TRAIN)  # a visitor hears why first, not about the form's options
            runs = service.submit_runs(engine, forms.form_to_configs(ui.values(data)), actor=actor)
        except HeftError as exc:  # bad option, data or model: a message, no traceback
            return present.warning(forms.error_message(exc)), gr.skip(), gr.skip(), gr.skip()
        except Exception as exc:  # a bug: logged with its traceback; the page stays usable
            logger.exception("launch failed")
            return present.warning(forms.error_message(exc)), gr.skip(), gr.skip(), gr.skip()
        return (present.queued_message([run.id for run in runs]), gr.Tabs(selected="runs"), runs[0].id,
                gr.Timer(TABLE_SECONDS, active=True))

    form_inputs = ui.inputs(FORM)
    model_inputs = ui.get("model", "lora.target_modules", "reft.layers")
    model_outputs = ui.get("lora.target_modules", "train.model_msg", "train.layers_msg")
    estimate_outputs = ui.get("train.estimate", "train.epochs_msg", *MESSAGE_AREAS)
    ui["train.preset"].change(on_preset, ui["train.preset"], ui.get(*forms.FORM_FIELDS, "train.preset_note"), **PRIVATE)
    ui["model"].change(on_model, model_inputs, model_outputs, trigger_mode="always_last", **PRIVATE)
    ui["reft.layers"].change(on_layers, ui.get("model", "reft.layers"), ui["train.layers_msg"], show_progress="hidden",
                             **PRIVATE)
    ui["precision"].change(forms.precision_message, ui["precision"], ui["train.precision_msg"],
                           show_progress="hidden", **PRIVATE)
    ui["reft.positions"].change(forms.positions_message, ui["reft.positions"], ui["train.positions_msg"],
                                show_progress="hidden", **PRIVATE)
    ui["method"].change(on_method, ui["method"], ui.get(*METHOD_DEPENDENT), **PRIVATE)
    upload_outputs = ui.get(forms.UPLOAD_FIELD, "data_kind", "train.upload_msg")
    ui["train.upload"].upload(on_upload, ui["train.upload"], upload_outputs, **PRIVATE)
    gr.on([component.change for component in ui.get(*FORM)], on_estimate, form_inputs, estimate_outputs,
          trigger_mode="always_last", show_progress="hidden", **PRIVATE)
    ui["data_kind"].change(on_data_kind, ui["data_kind"], ui.get("data_local", "train.upload_row"),
                           show_progress="hidden", **PRIVATE)
    launch_outputs = ui.get("train.launch_msg", "tabs", "runs.run_id", "runs.table_timer")
    ui["train.launch"].click(on_launch, form_inputs, launch_outputs, **PRIVATE)
    demo.load(on_model, model_inputs, model_outputs, **PRIVATE)
    demo.load(on_estimate, form_inputs, estimate_outputs, show_progress="hidden", **PRIVATE)
