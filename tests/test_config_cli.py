"""Bad input gets one clear error naming the option, before any weights load; the CLI works."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from heft_core import cli
from heft_core.config import (
    ConfigError,
    LoraSettings,
    ReftSettings,
    RunConfig,
    StageSettings,
    parse_layers,
    parse_positions,
)
from heft_core.data import DatasetSplits, Example


@pytest.mark.parametrize("make, option", [
    (lambda: LoraSettings(rank=0), "lora.rank"),
    (lambda: LoraSettings(dropout=1.5), "lora.dropout"),
    (lambda: LoraSettings(target_modules=[]), "lora.target_modules"),
    (lambda: ReftSettings(rank=-1), "reft.rank"),
    (lambda: ReftSettings(positions="x7"), "reft.positions"),
    (lambda: ReftSettings(positions="f7+"), "reft.positions"),
    (lambda: ReftSettings(positions="7"), "reft.positions"),
    (lambda: ReftSettings(positions="f0"), "reft.positions"),
    (lambda: ReftSettings(layers="1,x"), "reft.layers"),
    (lambda: RunConfig(method="lora", lora_stage=StageSettings(epochs=0)), "lora_stage.epochs"),
    (lambda: RunConfig(method="reft", reft_stage=StageSettings(epochs=-2)), "reft_stage.epochs"),
    (lambda: RunConfig(method="heft", lora_stage=StageSettings(batch_size=0)), "lora_stage.batch_size"),
    (lambda: RunConfig(method="heft", reft_stage=StageSettings(learning_rate=0)), "reft_stage.learning_rate"),
    (lambda: RunConfig(method="lora", lora_stage=StageSettings(learning_rate=-1e-3)), "lora_stage.learning_rate"),
    (lambda: RunConfig(method="sft"), "method"),
    (lambda: RunConfig(max_length=4), "max_length"),
    (lambda: RunConfig(train_size=0), "train_size"),
    (lambda: RunConfig.from_dict({"lora": {"rnak": 4}}), "lora.rnak"),
])
def test_bad_values_name_their_option(make, option):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.option == option
    assert str(info.value).startswith(option)


def test_positions_and_layers_parse_like_pyreft():
    assert parse_positions("f7+l7") == (7, 7)
    assert parse_positions("l1") == (0, 1)
    assert parse_positions("f3") == (3, 0)
    assert parse_layers("0,2,4-6") == [0, 2, 4, 5, 6]
    assert parse_layers("all") == "all"


def test_model_shape_checks():
    config = RunConfig(
        method="heft", reft=ReftSettings(layers=[3, 30]), lora=LoraSettings(target_modules=["q_proj", "qkv"])
    )
    with pytest.raises(ConfigError, match=r"reft.layers: \[30\] outside the model's depth; allowed 0..29"):
        config.validate_for_model(30, {"q_proj", "v_proj"})
    config = RunConfig(method="lora", lora=LoraSettings(target_modules=["q_proj", "qkv"]))
    with pytest.raises(ConfigError, match="lora.target_modules"):
        config.validate_for_model(30, {"q_proj", "v_proj"})


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if any code path loads model weights."""
    import heft_core.train as train_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(train_mod, "load_model", forbidden)


def _splits(train, validation):
    return DatasetSplits(train, validation, "test", "test data", True)


def _ex(uid, answer, question="is it red"):
    return Example(uid, question, "a passage", answer)


@pytest.mark.parametrize("splits, message", [
    (_splits([], [_ex("v", True)]), "no training rows"),
    (_splits([_ex("a", True), _ex("b", True)], [_ex("v", True)]), "needs both"),
    (_splits([_ex("a", True), _ex("b", False)], []), "no validation rows"),
])
def test_unusable_data_is_rejected_before_weights_load(tiny_model, no_weight_loading, splits, message):
    from heft_core.train import train

    with pytest.raises(ConfigError, match=message):
        train(RunConfig(method="lora", model=tiny_model), "/nonexistent/never-written", data=splits)


def test_sequence_length_too_short_for_question_and_cue(tiny_model, easy_data, no_weight_loading):
    from heft_core.train import train

    long_question = " ".join(["red"] * 40)
    splits = _splits([_ex("a", True, long_question), _ex("b", False)], [_ex("v", True)])
    with pytest.raises(ConfigError, match="max_length: 32 tokens cannot hold the question"):
        train(RunConfig(method="lora", model=tiny_model, max_length=32), "/nonexistent/x", data=splits)


def test_layers_outside_depth_rejected_before_weights_load(tiny_model, easy_data, no_weight_loading):
    from heft_core.train import train

    with pytest.raises(ConfigError, match=r"reft.layers: \[9\] outside the model's depth; allowed 0..3"):
        config = RunConfig(method="reft", model=tiny_model, reft=ReftSettings(layers=[9]))
        train(config, "/nonexistent/x", data=easy_data)


def test_missing_model_names_the_model(tmp_path):
    from heft_core.models import ModelLoadError, model_info

    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        model_info("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="no such local directory"):
        model_info(str(tmp_path / "missing"))


def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tiny_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "heft_core", "train", "--method", "reft", "--model", tiny_model, "--data", "synthetic",
         "--reft-positions", "f7+", "-o", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "reft.positions" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_train_eval_ask_compare(tiny_model, easy_data, data_dir, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("template:\n  after_question: ''\nmax_length: 64\nseed: 3\n")
    common = ["--model", tiny_model, "--data", str(data_dir), "--config", str(config_file), "--batch-size", "8",
              "--no-progress", "--lora-lr", "0.01", "--reft-lr", "0.01", "--reft-positions", "l1",
              "--set", "lora.target_modules=[\"all-linear\"]"]
    summaries = {}
    for method in ("lora", "heft"):
        assert cli.main(["train", "--method", method, *common, "-o", str(tmp_path / method)]) == 0
        summaries[method] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "accuracy_ci", "train_seconds", "tokens_per_second", "trainable_params", "run_dir"):
        assert key in summaries["heft"]
    assert summaries["heft"]["trainable_params"] > summaries["lora"]["trainable_params"]

    assert cli.main(["eval", str(tmp_path / "heft")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == summaries["heft"]["accuracy"]

    e = easy_data.validation[0]
    ask = ["ask", str(tmp_path / "lora"), str(tmp_path / "heft"), "--passage", e.passage, "--question", e.question]
    assert cli.main(ask) == 0
    answers = json.loads(capsys.readouterr().out)
    assert set(answers) == {"base", "lora", "heft"}

    assert cli.main(["compare", str(tmp_path / "lora"), str(tmp_path / "heft")]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["n"] == len(easy_data.validation)
    assert compared["both_right"] + compared["a_only"] + compared["b_only"] + compared["both_wrong"] == compared["n"]

    assert cli.main(["compare", "x", "y", "--claim", "0.8517", "0.8505", "3270"]) == 0
    assert json.loads(capsys.readouterr().out)["difference_questions"] == 4


def test_cli_help_documents_every_option():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--lora-rank", "--reft-positions", "--reft-layers", "--stage2-mode", "--lora-epochs", "--reft-epochs",
                 "--set", "--config"):
        assert flag in help_text


def test_cli_prefix_cache_flag_takes_auto_or_mib():
    parser = cli.build_parser()
    for raw, expected in (("auto", "auto"), ("AUTO", "auto"), ("64", 64), ("0", 0)):
        args = parser.parse_args(["train", "--prefix-cache-mb", raw, "-o", "out"])
        assert cli.config_from_args(args).prefix_cache_mb == expected
    assert cli.config_from_args(parser.parse_args(["train", "-o", "out"])).prefix_cache_mb == "auto"


def test_effective_dict_keeps_only_what_the_method_uses():
    from heft_core.config import RunConfig

    keys = {method: set(RunConfig(method=method).effective_dict()) for method in ("base", "lora", "reft", "heft")}
    assert keys["heft"] == set(RunConfig().to_dict()) - {"report"}  # where a run is reported is not learning
    assert keys["lora"] == keys["heft"] - {"reft", "reft_stage", "prefix_cache_mb", "heft_stage2_mode"}
    assert keys["reft"] == keys["heft"] - {"lora", "lora_stage", "lora_loss", "frozen_cache_mb", "heft_stage2_mode"}
    assert keys["base"] == keys["lora"] - {"lora", "lora_stage", "lora_loss", "frozen_cache_mb"}
