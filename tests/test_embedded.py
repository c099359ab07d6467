"""The embedded SmolLM2-135M-Instruct: the cache conversion, and a short HEFT run that learns.

Marked slow (minutes on 2 CPU cores); still part of `make test`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heft_core.config import RunConfig
from heft_core.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

_CONVERT = "from heft_core.models import embedded_model_dir; print(embedded_model_dir())"


def test_two_processes_converting_the_cache_at_once_get_one_whole_cache(tmp_path):
    env = dict(os.environ, HEFT_HOME=str(tmp_path / "home"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    cache = Path(paths.pop())
    assert (cache / "config.json").exists() and (cache / "model.safetensors").exists()
    # one conversion happened; no staging directory is left behind
    assert sum("Converting" in err for _, err in outputs) <= 1
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(".")] == []
    # The GGUF's chat template is carried into the cache (template.format: chat), and the paper's answer
    # words are one token each after SmolLM2's generation prompt.
    from transformers import AutoTokenizer

    from heft_core.prompt import PromptEncoder, PromptTemplate

    tokenizer = AutoTokenizer.from_pretrained(cache)
    assert "<|im_start|>" in tokenizer.chat_template
    template = PromptTemplate(after_question="?\nAnswer:", yes=" Yes", no=" No", format="chat", system="Yes or No.")
    encoder = PromptEncoder(tokenizer, template, 256)
    assert tokenizer.decode(encoder.encode("The sky is blue.", "is the sky blue")).endswith(
        "Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_quick_cpu_preset_heft_run_beats_the_zero_shot_baseline(tmp_path):
    """The UI's "Quick CPU demo" preset, trained for real: it must visibly learn."""
    from app import forms

    [heft_config] = forms.form_to_configs(forms.preset_form(forms.PRESET_QUICK))
    assert heft_config.method == "heft" and heft_config.data == "synthetic"
    base_config = RunConfig.from_dict({**heft_config.to_dict(), "method": "base"})
    base = train(base_config, tmp_path / "base")
    heft = train(heft_config, tmp_path / "heft")
    assert heft.status == "completed"
    assert heft.accuracy.accuracy >= base.accuracy.accuracy + 0.1, (base.accuracy, heft.accuracy)
