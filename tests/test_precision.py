"""``precision: auto`` on CPUs with and without bf16 units (simulated /proc/cpuinfo), and the bf16 warning."""
from __future__ import annotations

from pathlib import Path

import pytest

from app import forms
from heft_core import hardware
from heft_core.train import train
from tests.tiny import Recorder, make_config

WITH_AVX512_BF16 = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
WITH_AMX = "fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8"
WITHOUT = "fpu sse2 avx2 fma"


@pytest.fixture
def cpu(tmp_path, monkeypatch):
    """Point the hardware module's /proc/cpuinfo reader at a file with the given flags."""
    def with_flags(flags: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n")
        monkeypatch.setattr(hardware, "CPUINFO", str(path))

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    return with_flags


@pytest.mark.parametrize("flags, native", [(WITH_AVX512_BF16, True), (WITH_AMX, True), (WITHOUT, False)])
def test_auto_resolves_to_fp32_until_the_switch_then_bf16_only_where_the_cpu_has_bf16_units(
    cpu, monkeypatch, flags, native
):
    cpu(flags)
    assert hardware.read_cpu_flags(hardware.CPUINFO) >= set(flags.split())
    assert hardware.cpu_has_native_bf16() is native
    monkeypatch.setattr(hardware, "CPU_AUTO_BF16", False)  # as shipped: fp32 until the parity runs
    assert hardware.resolve_precision("auto")[0] == "no"
    monkeypatch.setattr(hardware, "CPU_AUTO_BF16", True)  # the lead's switch after parity
    mode, dtype = hardware.resolve_precision("auto")
    assert mode == ("bf16" if native else "no")  # never emulated bf16
    assert str(dtype) == "torch.float32"  # base weights stay fp32; autocast runs the matmuls in bf16
    assert hardware.resolve_precision("no")[0] == "no" and hardware.resolve_precision("bf16")[0] == "bf16"


def test_explicit_bf16_without_bf16_units_warns_in_the_form(cpu):
    cpu(WITHOUT)
    message = forms.precision_message("bf16", on_gpu=False)
    assert "emulated" in message and "slower" in message
    assert forms.precision_message("auto", on_gpu=False) == "" and forms.precision_message("no", on_gpu=False) == ""
    assert forms.precision_message("bf16", on_gpu=True) == ""
    cpu(WITH_AVX512_BF16)
    assert forms.precision_message("bf16", on_gpu=False) == ""


def test_explicit_bf16_without_bf16_units_still_trains_and_the_log_warns(cpu, tiny_model, easy_data, tmp_path):
    cpu(WITHOUT)
    logs = Recorder()
    config = make_config(tiny_model, "lora", precision="bf16", train_size=32, eval_size=16)
    config.lora_stage.epochs = 1
    result = train(config, tmp_path / "bf16", callbacks=[logs], data=easy_data)
    assert result.status == "completed"
    assert "precision: bf16 -> bf16 (trains in bf16)" in logs.logs
    assert any(line.startswith("warning: precision bf16 on a CPU without bf16 units") and "slower" in line
               for line in logs.logs), logs.logs


def test_an_auto_run_resumes_in_the_precision_it_trained_in(cpu, monkeypatch, tiny_model, easy_data, tmp_path):
    cpu(WITH_AVX512_BF16)
    monkeypatch.setattr(hardware, "CPU_AUTO_BF16", False)
    config = make_config(tiny_model, "lora", train_size=32, eval_size=16, checkpoint_minutes=1e-6)
    out = Path(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(config, out, callbacks=[Recorder(crash_at=6)], data=easy_data)  # epoch 2 of 2 (4 steps each)
    monkeypatch.setattr(hardware, "CPU_AUTO_BF16", True)  # auto would now train in bf16
    logs = Recorder()
    result = train(config, out, callbacks=[logs], data=easy_data, resume=True)
    assert result.status == "completed"
    assert "precision: auto -> no (trains in fp32)" in logs.logs
    assert any(line.startswith("resumed from step 5") for line in logs.logs), logs.logs
