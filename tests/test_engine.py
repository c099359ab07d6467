"""heft_core on a tiny random Llama: learning, ReFT placement, HEFT stages, artifacts, serving."""
from __future__ import annotations

import json

import pytest
import torch

from heft_core.adapters import ReftAnswerModel
from heft_core.artifacts import load_run
from heft_core.batching import collate
from heft_core.callbacks import TrainerCallback
from heft_core.config import LoraSettings, ReftSettings, RunConfig
from heft_core.inference import SideBySide, answer_model_for_run, evaluate_run
from heft_core.models import load_model, model_info
from heft_core.prompt import EncodedExample, PromptTemplate
from heft_core.train import train
from tests.tiny import make_config


@pytest.fixture(scope="module")
def runs(tiny_model, easy_data, tmp_path_factory):
    """One trained run per method (trained once for the module)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("base", "lora", "reft", "heft"):
        out[method] = train(make_config(tiny_model, method), root / method, data=easy_data)
    return out


@pytest.mark.parametrize("method", ["lora", "reft", "heft"])
def test_loss_falls_and_accuracy_beats_chance(runs, method):
    result = runs[method]
    losses = [s.loss for s in result.steps]
    assert result.status == "completed"
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert result.accuracy.accuracy > 0.75
    assert result.accuracy.accuracy > runs["base"].accuracy.accuracy


def test_evaluation_after_every_epoch_of_every_stage(runs):
    assert [(e.stage, e.epoch, e.cumulative_epoch) for e in runs["heft"].evals] == [
        ("lora", 1, 1), ("lora", 2, 2), ("reft", 1, 3), ("reft", 2, 4),
    ]
    assert [(e.stage, e.epoch) for e in runs["base"].evals] == [("base", 0)]


def test_trainable_parameter_counts(runs, tiny_model):
    info = model_info(tiny_model)
    # LoReFT: 2*d*r + r per intervention (R and W, b), one per layer with shared weights.
    assert runs["reft"].trainable_params == {"reft": info.num_layers * (2 * info.hidden_size * 4 + 4)}
    assert runs["heft"].trainable_params["lora"] == runs["lora"].trainable_params["lora"] > 0


def test_stage2_leaves_lora_weights_bit_for_bit_unchanged(runs):
    from safetensors.torch import load_file

    heft = runs["heft"]
    assert heft.lora_unchanged_by_stage2 is True
    # Stage 1 of HEFT is the LoRA-only run with the same seed: the saved adapters are identical.
    a = load_file(f"{runs['lora'].run_dir}/lora/adapter_model.safetensors")
    b = load_file(f"{heft.run_dir}/lora/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_and_adapter_stage2_agree(runs, tiny_model, easy_data, tmp_path):
    merged = train(make_config(tiny_model, "heft", heft_stage2_mode="merged"), tmp_path / "merged", data=easy_data)
    adapter = {p.uid: p for p in runs["heft"].predictions}
    for p in merged.predictions:
        assert p.p_yes == pytest.approx(adapter[p.uid].p_yes, abs=1e-3)
    assert [s.loss for s in merged.steps] == pytest.approx([s.loss for s in runs["heft"].steps], abs=1e-3)


@pytest.mark.parametrize("method", ["base", "lora", "reft", "heft"])
def test_saved_run_reproduces_its_predictions_exactly(runs, method, monkeypatch, easy_data):
    import heft_core.data as data_lib

    monkeypatch.setattr(data_lib, "load_data", lambda source, **_: easy_data)
    accuracy, predictions, signature = evaluate_run(runs[method].run_dir)
    saved = load_run(runs[method].run_dir)
    assert signature == saved.eval_signature
    assert {p.uid: p.p_yes for p in predictions} == {p["uid"]: p["p_yes"] for p in saved.predictions()}
    assert accuracy.accuracy == saved.meta["result"]["accuracy"]


def test_run_directory_contents(runs):
    run = load_run(runs["heft"].run_dir)
    assert set(run.meta["files"]) >= {"lora", "reft.safetensors", "metrics.jsonl", "evals.json", "predictions.jsonl"}
    assert run.meta["config"]["template"]["yes"] == " yes"
    assert {"torch", "transformers", "peft", "pyreft"} <= set(run.meta["versions"])
    assert len(run.steps()) == len(runs["heft"].steps) and len(run.evals()) == 4


def test_half_written_run_does_not_load(runs, tmp_path):
    import shutil

    from heft_core.artifacts import RunLoadError

    copy = tmp_path / "copy"
    shutil.copytree(runs["lora"].run_dir, copy)
    (copy / "run.json").unlink()
    with pytest.raises(RunLoadError, match="not a finished run"):
        load_run(copy)


def test_side_by_side_equals_each_run_loaded_alone(runs, tiny_model, easy_data):
    from heft_core.evaluate import predict

    server = SideBySide(tiny_model, template=PromptTemplate(after_question=""), max_length=64)
    for method in ("lora", "reft", "heft"):
        server.add_run(method, runs[method].run_dir)
    examples = easy_data.validation[:12]
    shared = {name: server.predict(name, examples) for name in ("base", "lora", "reft", "heft")}
    encoder = server.variants["base"].encoder
    for name in ("lora", "reft", "heft"):
        # The run alone, on its own fresh copy of the base model.
        alone_model = answer_model_for_run(load_run(runs[name].run_dir), load_model(tiny_model))
        alone = predict(
            alone_model, encoder.encode_examples(examples), yes_id=encoder.yes_id, no_id=encoder.no_id, pad_id=0,
            batch_size=16, device=torch.device("cpu"),
        )
        for a, b in zip(alone, shared[name]):
            assert a.p_yes == pytest.approx(b.p_yes, abs=1e-5)
            assert a.predicted == b.predicted
    base_alone = {p.uid: p.p_yes for p in runs["base"].predictions}
    for p in shared["base"]:
        assert p.p_yes == pytest.approx(base_alone[p.uid], abs=1e-5)
    answers = server.answer_all(examples[0].passage, examples[0].question)
    assert set(answers) == {"base", "lora", "reft", "heft"}
    assert all(a.answer in ("yes", "no") and 0 <= a.p_yes <= 1 for a in answers.values())
    # answer() of one question agrees with the batched predictions
    assert answers["heft"].p_yes == pytest.approx(shared["heft"][0].p_yes, abs=1e-5)


def test_side_by_side_rejects_a_run_on_another_base_model(runs, tiny_model, tmp_path, easy_data):
    other = tmp_path / "other"
    import shutil

    run = json.loads(open(runs["lora"].run_dir + "/run.json").read())
    shutil.copytree(runs["lora"].run_dir, other)
    run["config"]["model"] = "some-org/another-model"
    (other / "run.json").write_text(json.dumps(run))
    server = SideBySide(tiny_model)
    with pytest.raises(ValueError, match="another-model"):
        server.add_run("x", other)


def _layer_inputs(model, answer_model, batch):
    """Inputs of every decoder layer (= outputs of the layer before), and the final norm's input.

    Recorded by wrapping ``forward`` (pyvene removes forward hooks on each call).
    """
    seen: list[torch.Tensor] = []
    modules = list(model.model.layers) + [model.model.norm]
    originals = [m.forward for m in modules]

    def recorder(original):
        def forward(hidden_states, *args, **kwargs):
            seen.append(hidden_states.detach().clone())
            return original(hidden_states, *args, **kwargs)
        return forward

    for module, original in zip(modules, originals):
        module.forward = recorder(original)
    try:
        with torch.no_grad():
            answer_model.answer_logits(batch)
    finally:
        for module, original in zip(modules, originals):
            module.forward = original
    return seen


def test_reft_changes_hidden_states_only_at_its_layer_and_positions(tiny_model):
    from heft_core.adapters import PlainAnswerModel

    info = model_info(tiny_model)
    model = load_model(tiny_model)
    length = 12
    batch = collate([EncodedExample("x", list(range(5, 5 + length)), 1)], pad_id=0)
    before = _layer_inputs(model, PlainAnswerModel(model), batch)
    torch.manual_seed(0)
    settings = ReftSettings(rank=4, layers=[2], positions="f1+l2", dropout=0.0)
    reft = ReftAnswerModel(model, settings, info.num_layers, info.hidden_size)
    after = _layer_inputs(model, reft, batch)
    changed = [((a - b).abs().amax(-1)[0] > 1e-6).nonzero().flatten().tolist() for a, b in zip(before, after)]
    # inputs of layers 0..2 (outputs of embeddings, layers 0 and 1): unchanged everywhere
    assert changed[0] == changed[1] == changed[2] == []
    # output of layer 2 = input of layer 3: changed exactly at the first and the last two tokens
    assert changed[3] == [0, length - 2, length - 1]
    # later layers see the change spread along the sequence (causal attention)
    assert len(changed[4]) == length


def test_unshared_positions_use_two_interventions_per_layer(tiny_model):
    info = model_info(tiny_model)
    settings = ReftSettings(rank=2, layers=[0, 3], positions="f3+l3", share_weights=False)
    reft = ReftAnswerModel(load_model(tiny_model), settings, info.num_layers, info.hidden_size)
    assert len(reft.interventions) == 4


class StopAfter(TrainerCallback):
    def __init__(self, steps: int):
        self.steps, self.seen = steps, 0

    def on_step(self, event) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.seen >= self.steps


def test_stop_request_ends_at_the_next_step_and_keeps_what_is_finished(tiny_model, easy_data, tmp_path):
    result = train(make_config(tiny_model, "heft"), tmp_path / "stopped", callbacks=[StopAfter(3)], data=easy_data)
    assert result.status == "cancelled"
    assert len(result.steps) == 3
    saved = load_run(tmp_path / "stopped")
    assert saved.meta["result"]["status"] == "cancelled"
    assert len(saved.steps()) == 3


def test_training_is_deterministic_under_a_fixed_seed(runs, tiny_model, easy_data, tmp_path):
    again = train(make_config(tiny_model, "reft"), tmp_path / "again", data=easy_data)
    assert [s.loss for s in again.steps] == [s.loss for s in runs["reft"].steps]
    assert [p.p_yes for p in again.predictions] == [p.p_yes for p in runs["reft"].predictions]


def test_bf16_mixed_precision_trains_evaluates_and_reloads(tiny_model, easy_data, tmp_path, monkeypatch):
    import heft_core.data as data_lib

    result = train(make_config(tiny_model, "heft", precision="bf16"), tmp_path / "bf16", data=easy_data)
    assert result.status == "completed" and len(result.evals) == 4
    assert result.accuracy.accuracy > 0.75
    monkeypatch.setattr(data_lib, "load_data", lambda source, **_: easy_data)
    _, predictions, _ = evaluate_run(tmp_path / "bf16", precision="bf16")
    assert [p.p_yes for p in predictions] == [p.p_yes for p in result.predictions]


def _reft_step(reft, batch, targets):
    for intervention in reft.interventions:
        intervention.zero_grad()
    logits = reft.answer_logits(batch)
    torch.nn.functional.cross_entropy(logits, targets).backward()
    grads = torch.cat([p.grad.flatten() for p in reft.trainable_parameters()])
    return logits.detach(), grads


@pytest.mark.parametrize("host_kind", ["base", "lora adapter"])
def test_reusing_the_prefix_states_gives_the_full_forward_logits_and_gradients(tiny_model, host_kind):
    from heft_core.adapters import build_lora_model
    from heft_core.prefix_cache import PrefixStateCache

    info = model_info(tiny_model)
    host = load_model(tiny_model)
    if host_kind == "lora adapter":  # HEFT stage 2: a frozen, non-zero LoRA adapter under the interventions
        torch.manual_seed(1)
        host = build_lora_model(host, LoraSettings(rank=4, dropout=0.0), info.num_layers)
        for name, param in host.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
        host.requires_grad_(False)
    # Different lengths, so rows are left-padded by different amounts.
    examples = [EncodedExample(f"e{i}", list(range(5 + i, 5 + i + n)), i % 2) for i, n in enumerate([9, 14, 6, 11])]
    batch = collate(examples, pad_id=0)
    targets = torch.tensor([3, 4, 3, 4])
    settings = ReftSettings(rank=4, layers=[1, 3], positions="l2", dropout=0.0)
    torch.manual_seed(0)
    full = ReftAnswerModel(host, settings, info.num_layers, info.hidden_size, reuse_prefix=False)
    state = full.intervention_state()
    cache = PrefixStateCache(budget_bytes=2**30)
    reused = ReftAnswerModel(host, settings, info.num_layers, info.hidden_size, state=state, prefix_cache=cache)
    full_logits, full_grads = _reft_step(full, batch, targets)
    assert reused._prefix_end(batch, [[[0]]]) == 0  # a position inside the padding: no reuse
    first_logits, first_grads = _reft_step(reused, batch, targets)
    assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)
    # Reordered rows in another batch: every row's prefix now comes from the cache.
    again = collate(examples[::-1], pad_id=0)
    again_logits, again_grads = _reft_step(reused, again, targets.flip(0))
    assert cache.hits == 4
    torch.testing.assert_close(first_logits, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first_grads, full_grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(again_logits.flip(0), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again_grads, full_grads, rtol=1e-4, atol=1e-6)
    assert full_grads.abs().sum() > 0


def test_reft_training_with_reused_prefix_states_matches_the_full_forward(tiny_model, easy_data, tmp_path, monkeypatch):
    config = make_config(tiny_model, "heft", reft=ReftSettings(rank=4, layers="all", positions="l2", dropout=0.0))
    logs: list[str] = []

    class Logs(TrainerCallback):
        def on_log(self, message: str) -> None:
            logs.append(message)

    reused = train(config, tmp_path / "reused", callbacks=[Logs()], data=easy_data)
    # 2 epochs of training and evaluation: everything after the first pass over each prompt is reused
    assert any("reft prefix states: 224 prompts kept" in line and "224 computed" in line for line in logs), logs
    monkeypatch.setattr(ReftAnswerModel, "_prefix_end", lambda self, batch, groups: 0)
    full = train(config, tmp_path / "full", data=easy_data)
    reft_steps = [(a.loss, b.loss) for a, b in zip(reused.steps, full.steps) if a.stage == "reft"]
    assert reft_steps and all(abs(a - b) < 1e-4 for a, b in reft_steps)
    assert [p.predicted for p in reused.predictions] == [p.predicted for p in full.predictions]


def test_prefix_cache_stops_storing_at_its_budget_and_still_answers(tiny_model):
    from heft_core.prefix_cache import PrefixStateCache

    info = model_info(tiny_model)
    host = load_model(tiny_model)
    examples = [EncodedExample(f"e{i}", list(range(5 + i, 5 + i + 10)), i % 2) for i in range(4)]
    settings = ReftSettings(rank=2, layers=[1], positions="l1", dropout=0.0)
    unlimited = ReftAnswerModel(host, settings, info.num_layers, info.hidden_size, prefix_cache=PrefixStateCache(2**30))
    with torch.no_grad():
        unlimited.answer_logits(collate(examples, pad_id=0))
    one_prompt = unlimited.prefix_cache.used_bytes // 4
    small = PrefixStateCache(budget_bytes=one_prompt * 2 + one_prompt // 2)  # room for two prompts
    limited = ReftAnswerModel(
        host, settings, info.num_layers, info.hidden_size, state=unlimited.intervention_state(), prefix_cache=small
    )
    with torch.no_grad():
        first = limited.answer_logits(collate(examples, pad_id=0))
        second = limited.answer_logits(collate(examples, pad_id=0))
    assert len(small) == 2 and small.full and small.used_bytes <= small.budget_bytes
    assert (small.hits, small.misses) == (2, 6)
    torch.testing.assert_close(first, second)


def test_prefix_cache_budget_auto_is_a_share_of_available_memory():
    from heft_core.config import ConfigError
    from heft_core.prefix_cache import AUTO_SHARE, available_bytes, resolve_budget

    cpu = torch.device("cpu")
    assert resolve_budget(0, cpu) == 0
    assert resolve_budget(3, cpu) == 3 * 2**20
    available = available_bytes(cpu)
    assert available is not None and available > 0  # /proc/meminfo on Linux
    assert 0 < resolve_budget("auto", cpu) <= AUTO_SHARE * available * 1.5  # memory moves between the two reads
    assert RunConfig().prefix_cache_mb == "auto"
    assert RunConfig(prefix_cache_mb=512).prefix_cache_mb == 512
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        RunConfig(prefix_cache_mb="lots")


def test_lora_on_chosen_layers_of_all_linear_modules(tiny_model):
    # peft refuses layers_to_transform with its "all-linear" shorthand; the modules are named instead.
    from heft_core.adapters import build_lora_model

    info = model_info(tiny_model)
    model = build_lora_model(
        load_model(tiny_model), LoraSettings(rank=2, target_modules=["all-linear"], layers=[2, 3]), info.num_layers
    )
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in adapted}
    modules = {name.rsplit(".", 1)[-1] for name in adapted}
    assert layers == {2, 3}
    assert modules == set(info.linear_modules)
    assert not any("lm_head" in name for name in adapted)
