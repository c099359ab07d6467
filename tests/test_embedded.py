"""The embedded SmolLM2-135M-Instruct: the cache conversion, and a short HEFT run that learns.

Marked slow (minutes on 2 CPU cores); still part of `make test`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heft_core.config import LoraSettings, ReftSettings, RunConfig, StageSettings
from heft_core.train import cpu_has_native_bf16, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

_CONVERT = "from heft_core.models import embedded_model_dir; print(embedded_model_dir())"


def test_two_processes_converting_the_cache_at_once_get_one_whole_cache(tmp_path):
    env = dict(os.environ, HEFT_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    cache = Path(paths.pop())
    assert (cache / "config.json").exists() and (cache / "model.safetensors").exists()
    # one conversion happened; no staging directory is left behind
    assert sum("Converting" in err for _, err in outputs) <= 1
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".")] == []


def test_short_heft_run_beats_the_zero_shot_baseline_on_synthetic_data(tmp_path):
    precision = "bf16" if cpu_has_native_bf16() else "no"
    common = dict(model="embedded", data="synthetic", train_size=128, eval_size=64, max_length=128, seed=42, precision=precision)
    base = train(RunConfig(method="base", **common), tmp_path / "base")
    heft = train(
        RunConfig(
            method="heft", **common,
            lora=LoraSettings(rank=8, target_modules=["q_proj", "v_proj"]),
            reft=ReftSettings(rank=4, layers=[8, 16, 24], positions="l1"),
            lora_stage=StageSettings(epochs=2, learning_rate=2e-3, batch_size=8),
            reft_stage=StageSettings(epochs=1, learning_rate=1e-3, batch_size=8),
        ),
        tmp_path / "heft",
    )
    assert heft.status == "completed"
    assert heft.accuracy.accuracy >= base.accuracy.accuracy + 0.1, (base.accuracy, heft.accuracy)
