"""Frozen lower layers computed once (heft_core.frozen_cache): the same numbers as the full forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heft_common.errors import ConfigError
from heft_core import frozen_cache
from heft_core.adapters import PlainAnswerModel, build_lora_model
from heft_core.batching import collate
from heft_core.config import LoraSettings, RunConfig
from heft_core.frozen_cache import FrozenLayerCache, FrozenPrefixAnswerModel, frozen_layers
from heft_core.models import load_model, model_info
from heft_core.prompt import EncodedExample
from heft_core.train import train
from tests.tiny import Recorder, make_config

UPPER = [2, 3]  # LoRA on the top two of the tiny model's four layers: layers 0 and 1 are frozen


def _lora(tiny_model: str, layers=UPPER):
    info = model_info(tiny_model)
    torch.manual_seed(0)
    model = build_lora_model(load_model(tiny_model), LoraSettings(rank=4, dropout=0.0, target_modules=["all-linear"],
                                                                  layers=layers), info.num_layers)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the LoRA branch shapes the logits and every gradient
            torch.nn.init.normal_(param, std=0.5)
    return model


def _step(answer_model, batch, targets):
    answer_model.module.zero_grad()
    logits = answer_model.answer_logits(batch)
    torch.nn.functional.cross_entropy(logits, targets).backward()
    grads = torch.cat([p.grad.flatten() for p in answer_model.trainable_parameters()])
    return logits.detach(), grads


def _examples():  # different lengths, so rows are left-padded by different amounts
    return [EncodedExample(f"e{i}", list(range(5 + i, 5 + i + n)), i % 2) for i, n in enumerate([9, 14, 6, 11])]


def test_split_forward_gives_the_full_forward_logits_and_gradients(tiny_model):
    model = _lora(tiny_model)
    model.train()
    examples = _examples()
    targets = torch.tensor([3, 4, 3, 4])
    full_logits, full_grads = _step(PlainAnswerModel(model), collate(examples, 0), targets)
    cache = FrozenLayerCache(2**30)
    split = FrozenPrefixAnswerModel(model, frozen_layers(model, UPPER), cache)
    assert split.k == 2
    first_logits, first_grads = _step(split, collate(examples, 0), targets)
    assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)
    # Reordered rows in another batch (other padding): every row's states now come from the cache.
    again_logits, again_grads = _step(split, collate(examples[::-1], 0), targets.flip(0))
    assert cache.hits == 4
    torch.testing.assert_close(first_logits, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first_grads, full_grads, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again_logits.flip(0), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again_grads, full_grads, rtol=1e-4, atol=1e-5)
    assert full_grads.abs().sum() > 0


def test_a_small_budget_stops_storing_and_still_answers(tiny_model):
    model = _lora(tiny_model)
    examples = _examples()
    unlimited = FrozenPrefixAnswerModel(model, 2, FrozenLayerCache(2**30))
    with torch.no_grad():
        reference = unlimited.answer_logits(collate(examples, 0))
    smallest = min(states.numel() * states.element_size() for states in unlimited.cache._store.values())
    small = FrozenLayerCache(budget_bytes=smallest)  # room for one prompt at most
    limited = FrozenPrefixAnswerModel(model, 2, small)
    with torch.no_grad():
        first = limited.answer_logits(collate(examples, 0))
        second = limited.answer_logits(collate(examples, 0))
    assert len(small) <= 1 and small.full and small.used_bytes <= small.budget_bytes
    assert small.misses == 8 - len(small) and small.hits == len(small)
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)


def test_only_frozen_and_deterministic_lower_layers_are_skipped(tiny_model):
    assert frozen_layers(_lora(tiny_model, layers=None), None) == 0  # LoRA on every layer
    assert frozen_layers(_lora(tiny_model, layers=[0, 3]), [0, 3]) == 0
    model = _lora(tiny_model)
    assert frozen_layers(model, UPPER) == 2
    model.get_base_model().model.layers[1].self_attn.attention_dropout = 0.1  # random in train mode
    assert frozen_layers(model, UPPER) == 0


def test_frozen_cache_option_is_validated():
    assert RunConfig().frozen_cache_mb == "auto"
    assert RunConfig(frozen_cache_mb=64).frozen_cache_mb == 64
    for bad in ("lots", -1, True):
        with pytest.raises(ConfigError, match="frozen_cache_mb"):
            RunConfig(frozen_cache_mb=bad)
    assert "frozen_cache_mb" not in RunConfig(method="reft").effective_dict()


def _config(tiny_model: str, **overrides) -> RunConfig:
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"], layers=UPPER)
    return make_config(tiny_model, "lora", lora=lora, **overrides)


def _lora_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "adapter_model.safetensors"))


def _assert_close_runs(a, b, a_dir: Path, b_dir: Path) -> None:
    assert len(a.steps) == len(b.steps)
    assert all(abs(x.loss - y.loss) < 1e-4 for x, y in zip(a.steps, b.steps))
    wa, wb = _lora_tensors(a_dir), _lora_tensors(b_dir)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-5)
    assert [p.predicted for p in a.predictions] == [p.predicted for p in b.predictions]
    # two epochs of float drift (summation order) move P(yes) by up to ~4e-4; a wrong forward moves it by far more
    assert all(abs(p.p_yes - q.p_yes) < 2e-3 for p, q in zip(a.predictions, b.predictions))


def test_lora_training_with_kept_states_matches_the_full_forward(tiny_model, easy_data, tmp_path, monkeypatch):
    kept_logs, none_logs = Recorder(), Recorder()
    kept = train(_config(tiny_model), tmp_path / "kept", callbacks=[kept_logs], data=easy_data)
    # 2 epochs of training and evaluation on 160 + 64 prompts: each computed once, reused after
    line = next(line for line in kept_logs.logs if line.startswith("frozen layers 0..1:"))
    assert "224 prompts kept" in line and "224 computed" in line and "frozen_cache_mb=auto" in line, line
    none = train(_config(tiny_model, frozen_cache_mb=0), tmp_path / "none", callbacks=[none_logs], data=easy_data)
    line = next(line for line in none_logs.logs if line.startswith("frozen layers"))
    assert "0 prompts kept" in line and "0 reused" in line and "frozen_cache_mb=0" in line, line
    monkeypatch.setattr(frozen_cache, "frozen_layers", lambda model, layers: 0)  # today's full forward
    full_logs = Recorder()
    full = train(_config(tiny_model), tmp_path / "full", callbacks=[full_logs], data=easy_data)
    assert not any(line.startswith("frozen layers") for line in full_logs.logs)
    _assert_close_runs(kept, full, tmp_path / "kept", tmp_path / "full")
    _assert_close_runs(none, full, tmp_path / "none", tmp_path / "full")


def test_a_resumed_run_rebuilds_the_states_and_ends_as_an_uninterrupted_one(tiny_model, easy_data, tmp_path):
    config = _config(tiny_model, checkpoint_minutes=1e-6)  # a checkpoint at every step
    reference = train(config, tmp_path / "reference", data=easy_data)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config, out, callbacks=[Recorder(crash_at=25)], data=easy_data)  # in epoch 2 (20 steps each)
    logs = Recorder()
    resumed = train(config, out, callbacks=[logs], data=easy_data, resume=True)
    assert any(line.startswith("resumed from step 24") for line in logs.logs), logs.logs
    assert any(line.startswith("frozen layers 0..1:") for line in logs.logs)
    assert not list(out.glob("**/*frozen*"))  # the states are never saved
    _assert_close_runs(resumed, reference, out, tmp_path / "reference")
