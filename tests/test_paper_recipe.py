"""The paper's recipe options (arXiv 2509.09801), each checked against the library that defines it.

- ``lora_loss: sequence``: the engine's loss is transformers' causal-LM loss over prompt + answer + eos
  as ``DataCollatorForLanguageModeling(mlm=False)`` labels it (padding masked, the prompt not).
- ``scoring: generation`` / ``both``: equals a direct greedy ``generate`` + the paper's string rule on the
  same questions, unparsed answers included; ReFT's equals pyvene's ``generate`` with the intervention on
  the prompt.
- ``template.format: chat``: the prompt tokenises as ``apply_chat_template`` does.
"""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from heft_common.errors import ConfigError
from heft_core.adapters import PlainAnswerModel, ReftAnswerModel
from heft_core.batching import collate, collate_sequences, length_grouped_batches
from heft_core.config import RunConfig, StageSettings
from heft_core.evaluate import accuracies_of, parse_generated, score
from heft_core.models import load_model, load_tokenizer
from heft_core.prompt import PromptEncoder, PromptTemplate
from heft_core.train import train
from tests.conftest import FILLER, NO_WORDS, YES_WORDS
from tests.test_resume import assert_same_run, jsonl, resume_config
from tests.tiny import Recorder, make_config, make_tiny_model_dir

# A Llama-2-style chat template (system folded into the first user turn), small enough to read.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ bos_token }}[ INST ] {% if system %}<< SYS >> {{ system }} << / SYS >> {% endif %}"
    "{{ messages[0]['content'] | trim }} [ / INST ]"
)
SYSTEM = "Answer only Yes or No ."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, easy_data) -> str:
    """The tiny Llama whose tokenizer has a chat template and knows the paper's words."""
    texts = [e.passage + " " + e.question for e in easy_data.train + easy_data.validation]
    texts.append(" ".join(YES_WORDS + NO_WORDS + FILLER) + " [ INST ] << SYS >> / Yes No Answer : only or .")
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-chat"), texts, layers=2, hidden=32)
    tokenizer = load_tokenizer(str(path))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def paper_template(**overrides) -> PromptTemplate:
    settings = dict(after_question="?\nAnswer:", yes=" Yes", no=" No", format="chat", system=SYSTEM)
    settings.update(overrides)
    return PromptTemplate(**settings)


# --------------------------------------------------------------------------- chat prompt


def test_chat_prompt_tokenises_as_apply_chat_template(chat_model, easy_data):
    tokenizer = load_tokenizer(chat_model)
    for system in (SYSTEM, ""):
        template = paper_template(system=system)
        encoder = PromptEncoder(tokenizer, template, max_length=256)
        for example in easy_data.validation[:8]:
            messages = [{"role": "user", "content": template.render(example.passage, example.question)}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            assert encoder.encode(example.passage, example.question) == list(expected)
            assert "<unk>" not in tokenizer.convert_ids_to_tokens(expected)  # a real check, not unknowns
    assert tokenizer.convert_ids_to_tokens(encoder.encode("the river", "is it red"))[:4] == ["<s>", "[", "INST", "]"]


def test_chat_prompt_truncates_the_passage_and_keeps_question_and_cue_whole(chat_model):
    tokenizer = load_tokenizer(chat_model)
    encoder = PromptEncoder(tokenizer, paper_template(), max_length=40)
    ids = encoder.encode(" ".join(FILLER * 5), "is the bird red")
    assert len(ids) == 40
    text = tokenizer.decode(ids)
    assert text.startswith("<s> [ INST ] < < SYS > > Answer only Yes or No . < < / SYS > > Passage : the")
    assert text.endswith("Question : is the bird red ? Answer : [ / INST ]")


def test_chat_format_on_a_tokenizer_without_a_chat_template_is_refused(tiny_model):
    config = make_config(tiny_model, "lora", template=paper_template(yes=" yes", no=" no"))
    with pytest.raises(ConfigError) as error:
        config.validate_for_tokenizer(load_tokenizer(tiny_model))
    assert error.value.option == "template.format" and "chat template" in str(error.value)


# --------------------------------------------------------------------------- sequence loss


def test_sequence_loss_equals_transformers_causal_lm_loss(tiny_model, easy_data):
    from transformers import DataCollatorForLanguageModeling

    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model)
    encoder = PromptEncoder(tokenizer, make_config(tiny_model, "lora").template, 64)
    examples = encoder.encode_examples(easy_data.train[:6])
    batch = collate_sequences(examples, yes_id=encoder.yes_id, no_id=encoder.no_id,
                              eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    engine = PlainAnswerModel(model).sequence_loss(batch)

    # The paper's pipeline: whole texts, DataCollatorForLanguageModeling(mlm=False) pads and labels them.
    tokenizer.padding_side = "right"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    texts = [e.input_ids + [encoder.yes_id if e.label else encoder.no_id, tokenizer.eos_token_id] for e in examples]
    direct_batch = collator([{"input_ids": t} for t in texts])
    assert torch.equal(direct_batch["labels"], batch.labels) and torch.equal(direct_batch["input_ids"], batch.input_ids)
    direct = model(input_ids=direct_batch["input_ids"], attention_mask=direct_batch["attention_mask"],
                   labels=direct_batch["labels"]).loss
    torch.testing.assert_close(engine, direct)
    # The prompt is not masked: every real token but the first is a target, the answer and eos included.
    assert int((batch.labels[:, 1:] != -100).sum()) == sum(len(t) - 1 for t in texts)


def test_a_sequence_loss_run_reports_the_direct_loss_of_its_first_batch(tiny_model, easy_data, tmp_path):
    config = make_config(tiny_model, "lora", lora_loss="sequence", train_size=32, eval_size=8,
                         lora_stage=StageSettings(epochs=1, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0))
    result = train(config, tmp_path / "run", data=easy_data)
    tokenizer, model = load_tokenizer(tiny_model), load_model(tiny_model)  # LoRA starts as the identity (B = 0)
    from heft_core.train import prepare

    prepared = prepare(config, easy_data)
    first = length_grouped_batches(prepared.train_encoded, 8, random.Random(f"{config.seed}-lora"))[0]
    batch = collate_sequences(first, yes_id=prepared.encoder.yes_id, no_id=prepared.encoder.no_id,
                              eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    direct = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert result.steps[0].loss == pytest.approx(direct.item(), rel=1e-5)
    answer_only = train(config.__class__(**{**config.__dict__, "lora_loss": "answer"}), tmp_path / "a", data=easy_data)
    assert answer_only.steps[0].loss != pytest.approx(result.steps[0].loss, rel=1e-3)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["lora_loss"] == "sequence"


# --------------------------------------------------------------------------- generation scoring


def direct_generations(model, encoded, tokenizer, max_new_tokens: int) -> dict[str, str]:
    """One question at a time, no padding: transformers' own greedy generate."""
    texts = {}
    for example in encoded:
        ids = torch.tensor([example.input_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts[example.uid] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return texts


def words_making_parsed_and_unparsed(texts: dict[str, str]) -> tuple[str, str]:
    """Answer words (from what the random model emits) under which some answers parse and some do not."""
    words = sorted({w for text in texts.values() for w in text.split() if w.isalpha()})
    for yes in words:
        for no in words:
            if yes != no:
                parsed = [parse_generated(t, " " + yes, " " + no) for t in texts.values()]
                if None in parsed and 1 in parsed and 0 in parsed:
                    return " " + yes, " " + no
    raise AssertionError(f"no pair of words gives parsed and unparsed answers: {texts}")


def test_paper_rule():
    assert parse_generated(" Yes, it is", " Yes", " No") == 1
    assert parse_generated("No. Yes", " Yes", " No") == 1  # "Yes" is looked for first, as in the paper
    assert parse_generated(" No", " Yes", " No") == 0
    assert parse_generated(" yes", " Yes", " No") is None  # case-sensitive
    assert parse_generated("", " Yes", " No") is None


def test_generation_scoring_equals_direct_generate_and_the_paper_rule(tiny_model, easy_data, tmp_path):
    n_new = 4
    tokenizer, model = load_tokenizer(tiny_model), load_model(tiny_model)
    plain = make_config(tiny_model, "base").template
    encoded = PromptEncoder(tokenizer, plain, 64).encode_examples(easy_data.validation[:24])
    direct = direct_generations(model, encoded, tokenizer, n_new)
    yes, no = words_making_parsed_and_unparsed(direct)
    expected = {uid: parse_generated(text, yes, no) for uid, text in direct.items()}

    # Through the engine, as a run: a base run scored by generation, and by both, on the same questions.
    template = PromptTemplate(after_question="", yes=yes, no=no)
    data = dataclasses.replace(easy_data, validation=easy_data.validation[:24])
    for scoring in ("generation", "both"):
        config = make_config(tiny_model, "base", template=template, scoring=scoring,
                             generation_max_new_tokens=n_new, eval_batch_size=5)
        result = train(config, tmp_path / scoring, data=data)
        rows = {r["uid"]: r for r in jsonl(tmp_path / scoring / "predictions.jsonl")}
        assert {uid: r["generated"] for uid, r in rows.items()} == direct  # batched, left-padded: the same text
        assert {uid: r["generation_predicted"] for uid, r in rows.items()} == expected
        unparsed = sum(v is None for v in expected.values())
        generation_correct = sum(expected[e.uid] == (1 if e.answer else 0) for e in data.validation)
        summary = result.summary()
        assert summary["accuracies"]["generation"]["unparsed"] == unparsed > 0
        assert summary["accuracies"]["generation"]["accuracy"] == pytest.approx(generation_correct / 24)
        (event,) = json.loads((tmp_path / scoring / "evals.json").read_text())
        assert event["unparsed"] == unparsed and event["generation_accuracy"] == pytest.approx(generation_correct / 24)
        if scoring == "generation":  # the primary scoring is generation: no logits computed
            assert summary["scoring"] == "generation" and set(summary["accuracies"]) == {"generation"}
            assert all("p_yes" not in r and r["correct"] == r["generation_correct"] for r in rows.values())
            assert all(r["predicted"] == r["generation_predicted"] for r in rows.values())
            assert event["scoring"] == "generation" and event["accuracy"] == event["generation_accuracy"]
        else:  # both: logits primary, both recorded on the same questions
            assert summary["scoring"] == "logits" and set(summary["accuracies"]) == {"logits", "generation"}
            assert all(r["correct"] == r["logits_correct"] and "p_yes" in r for r in rows.values())
            assert summary["accuracy"] == summary["accuracies"]["logits"]["accuracy"]
            assert event["scoring"] == "logits"
        run = json.loads((tmp_path / scoring / "run.json").read_text())["result"]
        assert run["scoring"] == summary["scoring"] and run["accuracies"] == summary["accuracies"]


def test_reft_generation_scoring_equals_pyvene_generate_on_the_prompt(tiny_model, easy_data):
    from heft_core.models import model_info

    tokenizer, model = load_tokenizer(tiny_model), load_model(tiny_model)
    config = make_config(tiny_model, "reft")
    info = model_info(tiny_model)
    torch.manual_seed(0)
    reft = ReftAnswerModel(model, config.reft, info.num_layers, info.hidden_size)
    encoded = PromptEncoder(tokenizer, config.template, 64).encode_examples(easy_data.validation[:12])
    predictions = score(
        reft, encoded, scoring="both", yes_id=1, no_id=2, yes_word=" red", no_word=" blue", tokenizer=tokenizer,
        max_new_tokens=3, pad_id=tokenizer.pad_token_id, batch_size=4, device=torch.device("cpu"),
    )
    for example, prediction in zip(encoded, predictions):
        alone = collate([example], tokenizer.pad_token_id)
        expected = tokenizer.decode(reft.generate(alone, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id,
                                                  eos_token_id=tokenizer.eos_token_id)[0], skip_special_tokens=True)
        assert prediction.generated == expected
    # The intervention acts: without it, the base model says something else for some question.
    base = direct_generations(model, encoded, tokenizer, 3)
    assert any(base[p.uid] != p.generated for p in predictions)
    assert set(accuracies_of(predictions)) == {"logits", "generation"}


# --------------------------------------------------------------------------- checkpoints


def test_a_sequence_loss_run_scored_both_ways_resumes_to_the_same_run(tiny_model, easy_data, tmp_path):
    config = resume_config(tiny_model, "test:easy", "heft", lora_loss="sequence", scoring="both",
                           generation_max_new_tokens=2)
    train(config, tmp_path / "reference", data=easy_data)
    from tests.test_resume import STEPS_PER_EPOCH, crash

    crash(config, tmp_path / "run", STEPS_PER_EPOCH + 3, easy_data)
    recorder = Recorder()
    train(config, tmp_path / "run", callbacks=[recorder], data=easy_data, resume=True)
    assert recorder.resumes and recorder.resumes[0].from_step > 0
    assert_same_run(tmp_path / "run", tmp_path / "reference")
    assert jsonl(tmp_path / "run" / "predictions.jsonl") == jsonl(tmp_path / "reference" / "predictions.jsonl")


# --------------------------------------------------------------------------- edges


@pytest.mark.parametrize("option, value", [
    ("scoring", "accuracy"), ("generation_max_new_tokens", 0), ("generation_max_new_tokens", 65),
    ("lora_loss", "tokens"),
])
def test_bad_recipe_options_are_refused_with_the_option_named(tiny_model, option, value):
    with pytest.raises(ConfigError) as error:
        make_config(tiny_model, "lora", **{option: value})
    assert error.value.option == option


def test_bad_template_format_is_refused():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"template": {"format": "markdown"}})
    assert error.value.option == "template.format"


def test_chat_format_without_a_chat_template_queues_nothing(tiny_model, data_dir, home):
    from app.service import submit_runs
    from storage import queries
    from storage.db import open_db

    engine = open_db(home / "heft.db")
    config = make_config(tiny_model, "lora", data=data_dir, template=paper_template(yes=" yes", no=" no"))
    with pytest.raises(ConfigError) as error:
        submit_runs(engine, [config])
    assert error.value.option == "template.format"
    assert queries.list_runs(engine) == []


def test_model_card_names_the_scoring_and_shows_both(tiny_model, easy_data, tmp_path):
    from huggingface_hub import ModelCard

    from heft_core import export

    config = make_config(tiny_model, "lora", scoring="both", generation_max_new_tokens=2, train_size=16, eval_size=8,
                         lora_stage=StageSettings(epochs=1, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0))
    result = train(config, tmp_path / "run", data=easy_data)
    out = export.export_run(tmp_path / "run", tmp_path / "export", "adapter")
    assert json.loads((out / export.MANIFEST_FILE).read_text())["scoring"] == "logits"
    card = ModelCard.load(tmp_path / "export" / "README.md")
    generation = result.summary()["accuracies"]["generation"]
    assert "logits scoring: **" in card.text and "Generation scoring on the same questions" in card.text
    assert f"{generation['unparsed']} unparsed" in card.text
    assert card.data.eval_results[0].metric_name == "Accuracy, logits scoring (n=8)"


def test_unparsed_answers_count_for_neither_class_in_the_one_class_flag(tmp_path):
    from types import SimpleNamespace

    from app import studies

    rows = [{"uid": str(i), "label": i % 2, "predicted": 1, "correct": i % 2 == 1} for i in range(19)]
    rows.append({"uid": "19", "label": 1, "predicted": None, "correct": False, "generation_predicted": None})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = SimpleNamespace(id=1, status="completed", artifact_dir=str(tmp_path))
    assert studies.run_answers(run)[-1] == ("19", 1, None)
    assert studies.one_class_flags([run]) == {1: "yes"}  # 19 of 19 parsed answers are yes
