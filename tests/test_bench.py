"""Smoke tests of the benchmark scripts on the tiny random Llama (no timing assertions)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check, reproduce, throughput


def test_reference_batches_match_the_real_collators(tiny_model):
    """Our right-padded reference batches equal DataCollatorForSeq2Seq + pyreft.ReftDataCollator."""
    import pyreft
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "right"
    prompts = [[2, 5, 6, 7, 8], [2, 9, 10], [2, 11, 12, 13]]
    answers = [20, 21, 20]
    positions = [throughput.pyreft_positions(len(p), 2, 2) for p in prompts]
    ours = throughput.make_reference_batch(prompts, answers, tokenizer.pad_token_id, positions, num_interventions=3)
    features = [{"input_ids": p + [a], "labels": [-100] * len(p) + [a], "intervention_locations": [pos] * 3} for p, a, pos in zip(prompts, answers, positions)]
    collator = pyreft.ReftDataCollator(data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, label_pad_token_id=-100, padding="longest"))
    theirs = collator(features)
    for key in ("input_ids", "attention_mask", "labels", "intervention_locations"):
        assert torch.equal(ours[key], theirs[key].long()), key
    # pyreft's l1 default (make_last_position_supervised_data_module): the last prompt token
    assert throughput.pyreft_positions(5, 0, 1) == [4]


def test_step_flops_formula():
    from transformers import LlamaConfig

    config = LlamaConfig(**gpu_check.LLAMA2_7B)
    forward = throughput.step_flops(config, (1, 1), logit_positions=1, lowest_trainable_layer=-1, train=False)
    # one token: 2 x (non-embedding linear params + head), attention negligible
    params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000
    assert forward == pytest.approx(2 * params, rel=1e-3)
    full = throughput.step_flops(config, (8, 512), logit_positions=8, lowest_trainable_layer=-1)
    top_only = throughput.step_flops(config, (8, 512), logit_positions=8, lowest_trainable_layer=30)
    assert top_only < full < 3 * throughput.step_flops(config, (8, 512), logit_positions=8, lowest_trainable_layer=-1, train=False)


def test_generation_answer_parsing():
    assert throughput.generation_answer(" Yes, it is") == 1
    assert throughput.generation_answer(" no.") == 0
    assert throughput.generation_answer(" nobody") is None


def test_throughput_quick_on_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "throughput.md"
    report = throughput.main([
        "--quick", "--model", tiny_model, "--data", "synthetic", "--reft-configs", "1,2:l1", "--memory-repeats", "0", "--out", str(out),
    ])
    assert out.read_text() == report
    for title in ("LoRA (rank 8", "Precision", "ReFT (LoReFT rank 4, layers 1,2, positions l1)", "Evaluation"):
        assert title in report
    assert "## Failures" not in report
    # same batches, same initial weights, same optimizer: the fp32 sides end on the same loss
    for line in report.splitlines():
        if line.startswith("Final loss") and "bf16" not in line:
            spread = float(line.rsplit("spread ", 1)[1].rstrip(").").split(")")[0])
            assert spread < 1e-3, line


def test_throughput_profile_prints_the_step_ops(tiny_model):
    report = throughput.main(["--profile", "lora-ours", "--model", tiny_model, "--data", "synthetic", "--quick"])
    assert report.startswith("lora-ours: one step on batch 1")
    assert "aten::mm" in report  # the step's matrix products, with their shapes
    assert "Input Shapes" in report


def test_reproduce_smoke_records_runs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HEFT_HOME", str(tmp_path / "home"))
    summary = reproduce.main([
        "--model", tiny_model, "--data", "synthetic", "--train-size", "16", "--eval-size", "16", "--epochs", "1",
        "--heft-splits", "1+1", "--max-length", "64", "--no-long", "--batch-size", "8", "--out", str(tmp_path / "out"),
        "--db", str(tmp_path / "home" / "heft.db"),
    ])
    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == {"base-s42", "lora-1ep-s42", "reft-1ep-s42", "heft-1+1-s42"}
    assert all(r["error"] is None and r["n"] == 16 for r in runs.values())
    assert (tmp_path / "out" / "accuracy_vs_epochs.png").stat().st_size > 0
    report = (tmp_path / "out" / "results.md").read_text()
    assert "McNemar" in report and "heft 1+1" in report and "answers yes %" in report and "always answers" in report
    assert "| lora-1ep-s42 |" in report.split("Against answering 'yes'")[1]  # each trained run vs the majority answer
    assert json.loads((tmp_path / "out" / "results.json").read_text())["eval_signature"]

    from storage import queries
    from storage.db import open_db

    engine = open_db(tmp_path / "home" / "heft.db")
    recorded = queries.list_runs(engine)
    assert sorted(r.method for r in recorded) == ["base", "heft", "lora", "reft"]
    for run in recorded:
        assert run.status == "completed" and run.eval_n == 16 and run.eval_signature == summary["eval_signature"]
        assert queries.evaluations(engine, run.id)
        assert bool(queries.metrics_since(engine, run.id)) == (run.method != "base")  # a zero-shot run has no steps

    # --resume takes finished runs with the same settings from the output directory, trains the rest
    args = ["--model", tiny_model, "--data", "synthetic", "--train-size", "16", "--eval-size", "16", "--epochs", "1",
            "--heft-splits", "1+1", "--max-length", "64", "--no-long", "--batch-size", "8", "--out", str(tmp_path / "out"),
            "--db", str(tmp_path / "home" / "heft.db"), "--resume"]
    again = {r["name"]: r for r in reproduce.main(args)["runs"]}
    for name, run in runs.items():
        assert (again[name]["accuracy"], again[name]["db_run_id"]) == (run["accuracy"], run["db_run_id"])
        assert again[name]["train_seconds"] == pytest.approx(run["train_seconds"], abs=0.01)  # run.json keeps 2 decimals
    assert len(queries.list_runs(engine)) == 4
    assert all(run["resumed"] for run in again.values())
    assert "4 of 4 runs read back" in (tmp_path / "out" / "results.md").read_text()
    changed = {r["name"]: r for r in reproduce.main([*args, "--lora-lr", "0.003"])["runs"]}
    retrained = {name for name in runs if changed[name]["db_run_id"] != runs[name]["db_run_id"]}
    assert retrained == {"lora-1ep-s42", "heft-1+1-s42"}  # the LoRA learning rate changes only these
    assert len(queries.list_runs(engine)) == 6


def test_gpu_check_code_paths_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "gpu_check.md"
    report = gpu_check.main(["--device", "cpu", "--tiny", "--sections", "lora,reft,eval", "--reft-configs", "1,2:l1", "--out", str(out)])
    assert "## Failures" not in report, report
    assert "HEFT stage 2" in report and "Evaluation" in report and "LoRA (rank 8" in report
    assert out.read_text() == report


def test_reproduce_plan_runs_long_baselines_for_the_first_seeds_only():
    plans = reproduce.plan_runs([42, 43], 3, [(1, 2), (2, 1)], long_epochs=21, long_seeds=1)
    names = [p.name for p in plans]
    assert "lora-21ep-s42" in names and "reft-21ep-s42" in names
    assert not any(name.startswith(("lora-21ep-s43", "reft-21ep-s43")) for name in names)
    assert {"base-s43", "lora-3ep-s43", "reft-3ep-s43", "heft-1+2-s43", "heft-2+1-s43"} <= set(names)
