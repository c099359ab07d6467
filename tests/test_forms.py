"""The training form by name: every field sets its RunConfig option, and the UI registers one component per field."""
from __future__ import annotations

import pytest

from app import forms
from heft_common.errors import ConfigError, HeftError
from heft_core.config import RunConfig

# A value for every option the form sets, each different from RunConfig's default and from the
# other fields of its type, so two fields wired to each other's option cannot pass.
DISTINCT = {
    "lora.rank": (3, 3), "lora.alpha": (7.5, 7.5), "lora.dropout": (0.11, 0.11),
    "lora.target_modules": (["k_proj", "o_proj"], ["k_proj", "o_proj"]), "lora.layers": ("0-2", [0, 1, 2]),
    "reft.rank": (5, 5), "reft.layers": ("1,3", [1, 3]), "reft.positions": ("f2+l3", "f2+l3"),
    "reft.share_weights": (False, False), "reft.dropout": (0.12, 0.12),
    "lora_stage.epochs": (2, 2), "reft_stage.epochs": (4, 4),
    "lora_stage.learning_rate": (3e-4, 3e-4), "reft_stage.learning_rate": (4e-3, 4e-3),
    "*.batch_size": (6, 6), "*.grad_accum": (3, 3), "*.warmup_ratio": (0.2, 0.2), "*.weight_decay": (0.01, 0.01),
    "*.scheduler": ("cosine", "cosine"),
    "max_length": (96, 96), "train_size": (50, 50), "eval_size": (20, 20), "seed": (9, 9),
    "heft_stage2_mode": ("merged", "merged"), "precision": ("no", "no"),
    "checkpoint_minutes": (2.5, 2.5), "keep_epoch_checkpoints": (True, True), "processes": (2, 2),
    # empty: the LoRA stage takes "*.batch_size" / "*.grad_accum" (tests/test_app.py sets them)
    "lora_stage.batch_size": ("", 6), "lora_stage.grad_accum": ("", 3),
    "lora_loss": ("sequence", "sequence"), "scoring": ("both", "both"), "generation_max_new_tokens": (7, 7),
    "template.format": ("chat", "chat"), "template.system": ("Be brief.", "Be brief."),
    "template.after_question": ("?\nAnswer:", "?\nAnswer:"), "template.yes": (" Yes", " Yes"),
    "template.no": (" No", " No"),
    "report.report_to": (["tensorboard", "mlflow"], ["tensorboard", "mlflow"]), "report.project": ("mine", "mine"),
    "report.trackio_space_id": ("me/space", "me/space"), "report.tensorboard_dir": ("/tmp/tb", "/tmp/tb"),
    "report.wandb_mode": ("offline", "offline"), "report.mlflow_tracking_uri": ("file:/tmp/ml", "file:/tmp/ml"),
}


def test_every_form_field_sets_its_option_by_name():
    assert set(DISTINCT) == set(forms.CONFIG_FIELDS)
    form = dict(forms.default_form(), **{name: entered for name, (entered, _) in DISTINCT.items()})
    [config] = forms.form_to_configs(form)
    for name, (_, expected) in DISTINCT.items():
        assert forms.get_option(config, name) == expected, name
    # "*." fields are one widget for both stages
    assert (config.lora_stage.batch_size, config.reft_stage.batch_size) == (6, 6)
    assert (config.lora_stage.scheduler, config.reft_stage.scheduler) == ("cosine", "cosine")


def test_the_default_form_is_run_configs_defaults():
    [config] = forms.form_to_configs(forms.default_form())
    defaults = RunConfig()
    for name in forms.CONFIG_FIELDS:
        assert forms.get_option(config, name) == forms.get_option(defaults, name), name
    assert set(forms.default_form()) == set(forms.FORM_FIELDS)


def test_option_names_and_subset_sizes():
    tree: dict = {}
    forms.set_option(tree, "*.batch_size", 4)
    forms.set_option(tree, "lora.rank", 2)
    assert tree == {"lora_stage": {"batch_size": 4}, "reft_stage": {"batch_size": 4}, "lora": {"rank": 2}}
    # 0 or an empty box means every row
    [config] = forms.form_to_configs(dict(forms.default_form(), train_size=0, eval_size=None))
    assert (config.train_size, config.eval_size) == (None, None)
    # a ReFT-only run needs no LoRA targets; a LoRA run does
    [reft] = forms.form_to_configs(dict(forms.default_form(), method="ReFT", **{"lora.target_modules": []}))
    assert reft.method == "reft"
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(dict(forms.default_form(), method="LoRA", **{"lora.target_modules": []}))
    assert info.value.option == "lora.target_modules"
    with pytest.raises(ConfigError) as info:
        forms.form_to_configs(dict(forms.default_form(), **{"*.batch_size": None}))
    assert info.value.option.endswith("batch_size") and "empty" in str(info.value)


def test_uploaded_file_is_read_from_its_field():
    form = dict(forms.default_form(), data_kind=forms.DATA_UPLOAD, **{forms.UPLOAD_FIELD: "/up/mine.csv"})
    assert [c.data for c in forms.form_to_configs(form)] == ["/up/mine.csv"]
    assert forms.UPLOAD_FIELD not in forms.preset_form(forms.PRESET_QUICK)  # a preset keeps the uploaded file
    with pytest.raises(ConfigError):
        forms.preset_form("no such preset")


def test_method_parts():
    assert forms.method_parts("LoRA") == forms.MethodParts(lora=True, reft=False, heft=False, batch=False)
    assert forms.method_parts(forms.METHOD_LABELS["heft"]) == forms.MethodParts(True, True, True, False)
    assert forms.method_parts(forms.METHOD_LABELS[forms.BATCH]) == forms.MethodParts(True, True, True, True)
    assert forms.method_codes(forms.METHOD_LABELS[forms.BATCH]) == ["lora", "reft", "heft"]
    with pytest.raises(ConfigError):
        forms.method_codes("base")


def test_error_messages_escape_markdown_but_not_api_text():
    exc = ConfigError("reft.layers", "<b>7</b> is outside 0..3")
    assert forms.error_message(exc) == "**Invalid option `reft.layers`** — &#60;b&#62;7&#60;/b&#62; is outside 0..3"
    assert forms.error_text(exc) == "Invalid option reft.layers — <b>7</b> is outside 0..3"
    assert forms.error_message(RuntimeError("")) == "**Error** — RuntimeError"
    message = forms.positions_message("<x>")
    assert message.startswith("⚠️ &#39;&#60;x&#62;&#39; is not a position string") and "<x>" not in message


def test_model_fields(tiny_model, tmp_path):
    found = forms.model_fields(tiny_model, ["k_proj", "not_a_module"], "0,9")
    assert found.targets == ["k_proj"] and {"q_proj", "v_proj", "k_proj"} <= set(found.modules)
    assert "4 layers (valid indices 0..3)" in found.summary and "hidden size 64" in found.summary
    assert found.layers_message.startswith("⚠️") and "0..3" in found.layers_message
    assert forms.model_fields(tiny_model, [], "all").targets == ["q_proj", "v_proj"]  # nothing kept: q and v
    with pytest.raises(HeftError):
        forms.model_fields(str(tmp_path / "missing"), [], "all")
    assert forms.model_depth(tiny_model) == 4 and forms.model_depth(str(tmp_path / "missing")) is None


def test_data_counts(tmp_path, data_dir):
    assert forms.data_counts("synthetic") == forms.SYNTHETIC_SIZES
    assert forms.data_counts("hub:google/boolq") == forms.data_counts("hub") == forms.HUB_BOOLQ_SIZES
    assert forms.data_counts("hub:someone/else") is None
    assert forms.data_counts(data_dir) == (160, 64)
    assert forms.data_counts(str(tmp_path / "missing")) is None


def test_the_train_tab_registers_one_component_per_field(home):
    from app.ui import build_demo
    from storage.db import open_db

    demo = build_demo(open_db(home / "heft.db"))
    try:
        ui = demo.heft_components
        form = forms.default_form()
        for name in forms.FORM_FIELDS:
            assert ui[name].value == form[name], name
        assert forms.UPLOAD_FIELD in ui
        # Gradio hands a handler of a set of components {component: value}; the manager names them.
        assert ui.values({ui["lora.rank"]: 3, ui["*.batch_size"]: 4}) == {"lora.rank": 3, "*.batch_size": 4}
        assert ui.updates({"reft.rank": 2}) == {ui["reft.rank"]: 2}
        with pytest.raises(KeyError, match="no component"):
            ui["lora.no_such_option"]
    finally:
        demo.heft_ask_service.close()
