"""Smoke tests of the benchmark scripts on the tiny random Llama (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check, reproduce, throughput
from heft_core.study_presets import paper_table


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
    features = [
        {"input_ids": p + [a], "labels": [-100] * len(p) + [a], "intervention_locations": [pos] * 3}
        for p, a, pos in zip(prompts, answers, positions)
    ]
    collator = pyreft.ReftDataCollator(
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, label_pad_token_id=-100, padding="longest")
    )
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
    assert (
        top_only
        < full
        < 3 * throughput.step_flops(config, (8, 512), logit_positions=8, lowest_trainable_layer=-1, train=False)
    )


def test_generation_answer_parsing():
    assert throughput.generation_answer(" Yes, it is") == 1
    assert throughput.generation_answer(" no.") == 0
    assert throughput.generation_answer(" nobody") is None


def test_throughput_quick_on_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "throughput.md"
    report = throughput.main(
        [
            "--quick",
            "--model",
            tiny_model,
            "--data",
            "synthetic",
            "--reft-configs",
            "1,2:l1",
            "--memory-repeats",
            "0",
            "--out",
            str(out),
        ]
    )
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


def test_throughput_no_bf16_measures_no_bf16_peak(tiny_model, tmp_path, monkeypatch):
    asked: list[torch.dtype] = []

    def spy(device, dtype, **limits):
        asked.append(dtype)
        return throughput.MatmulPeak(1e9, 256, (256,), 0.0)

    monkeypatch.setattr(throughput.peaks, "timed_matmul_peak", spy)
    report = throughput.main(
        [
            "--quick",
            "--no-bf16",
            "--pairs",
            "lora,reft",
            "--model",
            tiny_model,
            "--data",
            "synthetic",
            "--reft-configs",
            "1,2:l1",
            "--memory-repeats",
            "0",
            "--out",
            str(tmp_path / "throughput.md"),
        ]
    )
    assert "## Failures" not in report, report
    assert torch.float32 in asked  # before the groups and after each one
    assert torch.bfloat16 not in asked
    peak_line = next(line for line in report.splitlines() if "matmul peak" in line)
    assert "fp32 1 GFLOP/s at 256×256" in peak_line and "bf16 not measured" in peak_line
    assert "LoRA in bf16" not in report
    # the dtypes follow the selected sides: bf16 only where a bf16 side runs
    assert throughput.peak_names({"lora", "reft", "eval"}, no_bf16=False) == ["fp32", "bf16"]
    assert throughput.peak_names({"reft"}, no_bf16=False) == ["fp32"]
    assert throughput.peak_names({"eval"}, no_bf16=False) == []


class FakeMatmulMachine:
    """A fake clock and multiply timer.

    Bigger multiplies run closer to ``flops_per_second``; a new size costs a warm-up too."""

    def __init__(self, flops_per_second: float) -> None:
        self.rate = flops_per_second
        self.now = 0.0
        self.timed: list[int] = []

    def clock(self) -> float:
        return self.now

    def multiply_seconds(self, n: int) -> float:
        return 2 * n**3 / self.rate_at(n)

    def rate_at(self, n: int) -> float:
        return self.rate * n / (n + 64)

    def time_multiply(self, n: int) -> float:
        seconds = self.multiply_seconds(n)
        if not self.timed or self.timed[-1] != n:
            self.now += seconds  # warm-up multiply at a new size
        self.now += seconds
        self.timed.append(n)
        return seconds


@pytest.mark.parametrize("rate, budget", [(1.5e9, 3.0), (1e11, 3.0), (1e11, 0.5), (1e15, 3.0)])
def test_throughput_peak_sizes_are_bounded_by_the_time_budget(rate, budget):
    machine = FakeMatmulMachine(rate)
    peak = throughput.timed_matmul_peak(
        torch.device("cpu"),
        torch.float32,
        budget_s=budget,
        multiply_limit_s=0.2,
        time_multiply=machine.time_multiply,
        clock=machine.clock,
    )
    assert machine.now <= budget  # the whole measurement, warm-ups included
    assert machine.timed[0] == throughput.PEAK_START_SIZE and machine.timed == sorted(machine.timed)
    assert all(machine.multiply_seconds(n) <= 0.2 for n in machine.timed)
    biggest = max(machine.timed)
    assert (
        biggest == throughput.PEAK_MAX_SIZE
        or machine.multiply_seconds(throughput.next_peak_size(biggest)) > 0.2
        or budget < 1
    )
    assert peak.size == biggest and peak.sizes == tuple(dict.fromkeys(machine.timed))
    assert peak.flops_per_second == pytest.approx(machine.rate_at(biggest))
    assert machine.timed.count(biggest) == 3 or budget < 1  # best of three at the final size


def test_throughput_peak_on_emulated_bf16_stops_small():
    """The CPU of the report: bf16 without units at ~1 GFLOP/s; the old fixed ladder went to 3072 (~60 s a multiply)."""
    machine = FakeMatmulMachine(1e9)
    peak = throughput.timed_matmul_peak(
        torch.device("cpu"), torch.bfloat16, time_multiply=machine.time_multiply, clock=machine.clock
    )
    assert peak.size <= 512 and machine.now <= throughput.PEAK_BUDGET_S
    slow = FakeMatmulMachine(1e6)  # even the first size is over budget: it is timed once, nothing more
    throughput.timed_matmul_peak(
        torch.device("cpu"), torch.bfloat16, time_multiply=slow.time_multiply, clock=slow.clock
    )
    assert slow.timed == [throughput.PEAK_START_SIZE]


def test_throughput_notes_emulated_bf16():
    assert throughput.cpu_has_bf16_units({"avx2", "fma"}, "x86_64") is False
    assert throughput.cpu_has_bf16_units({"avx512f", "avx512_bf16"}, "x86_64") is True
    assert throughput.cpu_has_bf16_units({"amx_bf16"}, "x86_64") is True
    assert throughput.cpu_has_bf16_units({"asimd", "bf16"}, "aarch64") is True
    assert throughput.cpu_has_bf16_units(set(), "riscv64") is None
    peaks = throughput.MatmulPeaks()
    peaks.update(fp32=5e10, bf16=1e9)
    peaks.sizes.update(fp32=1536, bf16=384)
    line = throughput.peak_summary(peaks, torch.device("cpu"), bf16_units=False)
    assert "fp32 50 GFLOP/s at 1536×1536" in line and "bf16 1 GFLOP/s at 384×384 (emulated" in line
    assert "emulated" not in throughput.peak_summary(peaks, torch.device("cpu"), bf16_units=True)
    with pytest.raises(ValueError, match="fp32, bf16"):
        throughput.refresh_peaks({}, torch.device("cpu"), ["fp16"])


def test_reproduce_is_the_paper_table_preset_with_the_flags_settings():
    spec = reproduce.build_spec(reproduce.parse_args(["--data", "synthetic", "--seeds", "1,2"]))
    assert spec.to_dict() == paper_table(seeds=[1, 2], model="embedded", data="synthetic").to_dict()
    assert [arm.name for arm in spec.arms] == ["Base", "ReFT 20", "LoRA 20", "HEFT 3+3", "HEFT 20+20"]
    spec = reproduce.build_spec(reproduce.parse_args([
        "--data", "synthetic", "--rows", "0+2,2+0,1+1,1+2", "--lora-lr", "0.003",
        "--batch-size", "4", "--lora-reading", "text", "--seeds", "7",
    ]))
    assert [arm.name for arm in spec.arms] == ["Base", "ReFT 2", "LoRA 2", "HEFT 1+1", "HEFT 1+2"]
    config = next(run.config for run in spec.plan() if run.method == "heft")
    assert config.lora_stage.learning_rate == 0.003 and config.lora.target_modules == ["all-linear"]
    assert config.lora_stage.batch_size == config.reft_stage.batch_size == 4 and config.seed == 7
    assert config.reft_stage.learning_rate == paper_table().base["reft_stage.learning_rate"]  # not given: the preset's
    assert config.reft.layers == [14]  # the embedded model's 30 layers: the paper's layer 15 of 32, same depth
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--rows", "3"])


def test_reproduce_trains_the_study_and_writes_its_report(tiny_model, tmp_path):
    from heft_core.study_runner import load_study_dir

    out = tmp_path / "out"
    args = ["--model", tiny_model, "--data", "synthetic", "--train-size", "16", "--eval-size", "16",
            "--rows", "0+1,1+0,1+1", "--seeds", "42", "--max-length", "64", "--batch-size", "8", "--grad-accum", "1",
            "--lora-rank", "2", "--reft-layers", "1,2", "--reft-positions", "l1", "--out", str(out), "--no-progress",
            # the tiny word-level tokenizer has no chat template and no capitalised answer words
            "--set", "template.format=plain", "--set", "template.yes=' yes'", "--set", "template.no=' no'"]
    report = reproduce.main(args)
    assert report.finished_runs == report.planned_runs == 4 and not report.missing
    assert [arm.arm for arm in report.arms] == ["Base", "ReFT 1", "LoRA 1", "HEFT 1+1"]
    assert (out / "results.md").read_text() == report.to_markdown()
    assert json.loads((out / "results.json").read_text())["finished_runs"] == 4
    spec, outcomes = load_study_dir(out)  # what `python -m heft_core study-report` reads
    assert spec.to_dict() == reproduce.build_spec(reproduce.parse_args(args)).to_dict()
    assert [o.status for o in outcomes] == ["completed"] * 4
    again = reproduce.main([*args, "--resume"])  # every run finished with the same settings: none trains again
    assert [row.accuracy for row in again.runs] == [row.accuracy for row in report.runs]


def test_gpu_check_code_paths_on_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "gpu_check.md"
    report = gpu_check.main(
        ["--device", "cpu", "--tiny", "--sections", "lora,reft,eval", "--reft-configs", "1,2:l1", "--out", str(out)]
    )
    assert "## Failures" not in report, report
    assert "HEFT stage 2" in report and "Evaluation" in report and "LoRA (rank 8" in report
    assert out.read_text() == report


