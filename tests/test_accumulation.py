"""Gradient accumulation: a last, shorter window is averaged over its own length."""
from __future__ import annotations

from heft_core.config import StageSettings
from heft_core.train import train
from tests.tiny import make_config


def test_accumulation_steps_and_reported_loss(tiny_model, easy_data, tmp_path):
    # 160 examples / batch 16 = 10 batches; accumulation 4 -> windows of 4, 4, 2 = 3 steps per epoch
    stage = StageSettings(epochs=1, learning_rate=1e-9, batch_size=16, grad_accum=4, warmup_ratio=0.0)
    assert stage.optimizer_steps(160) == 3 and stage.optimizer_steps(160, num_processes=2) == 2
    result = train(make_config(tiny_model, "lora", lora_stage=stage), tmp_path / "acc", data=easy_data)
    assert [s.step for s in result.steps] == [1, 2, 3]
    # With a negligible learning rate every window's mean loss is about the same; the short last
    # window would report about half of it if it were divided by the full accumulation count.
    first, second, last = (s.loss for s in result.steps)
    assert 0.7 < last / ((first + second) / 2) < 1.3
