"""Study presets: the paper's recipe and its Table 1 (arXiv 2509.09801), "Equal budget", and the CPU presets.

:data:`PRESETS` by key, :data:`PRESET_TITLES` by title, :func:`preset` to build one. "Paper table" is the paper's
Table 1 with the paper's own recipe, from its sections 3.2-3.4 and appendix script (base, ReFT 0+20, LoRA 20+0,
HEFT 3+3, HEFT 20+20), with a variant with LoRA on all linear layers; "Equal budget" is a question of our own;
"CPU: learns on BoolQ" and "CPU demo: four variants" are sized for a 2-core CPU. Each is a
:class:`~heft_core.study.StudySpec`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from heft_common.errors import ConfigError
from heft_common.vocabulary import EMBEDDED_MODEL, METHOD_TITLES
from heft_core.study import StudyArm, StudySpec, _check_int, _flatten


def _heft_splits(epochs: int) -> list[StudyArm]:
    return [StudyArm("heft", lora_epochs=first, reft_epochs=epochs - first) for first in range(1, epochs)]


def _shared(
    model: str, data: str, train_size: int | None, eval_size: int | None, options: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {"model": model, "data": data, "train_size": train_size, "eval_size": eval_size, **_flatten(options, "base")}


# --- the paper (arXiv 2509.09801): its recipe and its Table 1, from its sections 3.2-3.4, Table 1 and the
# training script of its appendix A.1 (collected in shared/notes/paper-recipe.md).
PAPER_MODEL = "meta-llama/Llama-2-7b-chat-hf"
PAPER_MODEL_LAYERS = 32
PAPER_REFT_LAYER = 15  # one LoReFT on layer 15's block output
# The paper's system line in substance (answer only "Yes" or "No", from the passage); its exact words are not
# quoted in our notes.
PAPER_SYSTEM_PROMPT = (
    'You are a helpful assistant. Read the passage and answer the question with only "Yes" or "No".'
)
# LoRA targets under the two readings of the paper: its code (peft's default for Llama: q_proj, v_proj; this
# produced its numbers) and its text ("the model's linear layers").
PAPER_LORA_TARGETS = {"code": ["q_proj", "v_proj"], "text": ["all-linear"]}
# Layer counts of models the presets know without reading a config (others: heft_core.models.model_info).
KNOWN_LAYER_COUNTS = {
    PAPER_MODEL: 32,
    "meta-llama/Llama-2-7b-hf": 32,
    EMBEDDED_MODEL: 30,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 30,
}


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 1 (BoolQ validation, 3,270 questions, one seed)."""

    method: str
    lora_epochs: int
    reft_epochs: int
    accuracy: float
    minutes: int  # training time as the paper gives it (h:mm), in minutes

    @property
    def budget_label(self) -> str:
        """As the paper writes it: LoRA epochs + ReFT epochs."""
        return f"{self.lora_epochs}+{self.reft_epochs}"

    def arm(self) -> StudyArm:
        return StudyArm(self.method, lora_epochs=self.lora_epochs or None, reft_epochs=self.reft_epochs or None)


# The one place the paper's numbers live: the report's "paper" column reads them from here.
PAPER_TABLE_1: tuple[PaperRow, ...] = (
    PaperRow("reft", 0, 20, 0.8336, 2 * 60 + 19),
    PaperRow("lora", 20, 0, 0.8505, 6 * 60 + 52),
    PaperRow("heft", 3, 3, 0.8517, 1 * 60 + 23),
    PaperRow("heft", 20, 20, 0.8547, 9 * 60 + 11),
)
PAPER_QUESTIONS = 3270


def paper_row(method: str, lora_epochs: int | None, reft_epochs: int | None) -> PaperRow | None:
    """The row of Table 1 with this method and epochs, if the paper has one."""
    for row in PAPER_TABLE_1:
        if (row.method, row.lora_epochs, row.reft_epochs) == (method, lora_epochs or 0, reft_epochs or 0):
            return row
    return None


def paper_reft_layer(num_layers: int) -> int:
    """The paper's intervention layer (15 of Llama-2-7B's 32) at the same relative depth of a model with
    ``num_layers`` decoder layers: round(15 / 32 x num_layers), e.g. 14 of SmolLM2-135M's 30."""
    _check_int(num_layers, "num_layers", 1, 10_000)
    return min(num_layers - 1, round(PAPER_REFT_LAYER / PAPER_MODEL_LAYERS * num_layers))


def _layer_count(model: str) -> int:
    if model in KNOWN_LAYER_COUNTS:
        return KNOWN_LAYER_COUNTS[model]
    from heft_core.models import model_info

    return model_info(model).num_layers


def paper_options(model: str = PAPER_MODEL, *, lora_targets: str = "code") -> dict[str, Any]:
    """The paper's recipe as dotted run options, mapped to ``model``.

    As the paper ran it (its appendix A.1): LoRA rank 8, alpha 32, dropout 0.05 on peft's default modules for
    Llama (``lora_targets="code"``: q_proj, v_proj; its text says "the model's linear layers", which
    ``lora_targets="text"`` reads as all-linear), lr 2e-4, batch 1 x accumulation 32, no warmup, linear decay,
    weight decay 0, the causal-LM loss over the whole prompt-and-answer sequence; stage 2 on the merged stage-1
    model; one rank-4 LoReFT on layer 15's output at the last prompt position, lr 2e-4, batch 8 x
    accumulation 4, no warmup, linear; Llama-2's chat prompt with a system line, cue "Answer:", answer words
    " Yes" / " No"; scored by greedy generation of at most 5 tokens (and by the two answer logits, on the same
    questions); max length 2,048 (the paper pads to 2,048, so nothing is truncated). Precision ``auto``: bf16
    where the GPU has it, as the paper's bf16 model. On a model other than Llama-2-7B the intervention layer
    keeps the same relative depth (:func:`paper_reft_layer`).
    """
    if lora_targets not in PAPER_LORA_TARGETS:
        raise ConfigError("lora_targets", f"must be one of {', '.join(PAPER_LORA_TARGETS)}, got {lora_targets!r}")
    layers = _layer_count(model)
    layer = PAPER_REFT_LAYER if layers == PAPER_MODEL_LAYERS else paper_reft_layer(layers)
    stage = {"warmup_ratio": 0.0, "scheduler": "linear", "weight_decay": 0.0, "learning_rate": 2e-4}
    return {
        "lora.rank": 8,
        "lora.alpha": 32.0,
        "lora.dropout": 0.05,
        "lora.target_modules": list(PAPER_LORA_TARGETS[lora_targets]),
        "reft.rank": 4,
        "reft.layers": [layer],
        "reft.positions": "l1",
        "reft.dropout": 0.0,  # pyreft's LoreftIntervention default, which the paper's script keeps
        **{f"lora_stage.{key}": value for key, value in stage.items()},
        "lora_stage.batch_size": 1,
        "lora_stage.grad_accum": 32,
        **{f"reft_stage.{key}": value for key, value in stage.items()},
        "reft_stage.batch_size": 8,
        "reft_stage.grad_accum": 4,
        "lora_loss": "sequence",
        "heft_stage2_mode": "merged",
        "scoring": "both",
        "generation_max_new_tokens": 5,
        "template.format": "chat",
        "template.system": PAPER_SYSTEM_PROMPT,
        "template.before_passage": "Passage: ",
        "template.after_passage_before_question": "\nQuestion: ",
        "template.after_question": "?\nAnswer:",
        "template.yes": " Yes",
        "template.no": " No",
        "max_length": 2048,
        "precision": "auto",
        "eval_every_epoch": False,  # the paper evaluates once, after training
    }


# The paper's recipe on its own model (the app's "Paper setting").
PAPER_OPTIONS: dict[str, Any] = paper_options()


def paper_table(
    *,
    rows: Sequence[tuple[int, int]] | None = None,
    seeds: Sequence[int] = (42, 43, 44),
    model: str = PAPER_MODEL,
    data: str = "hub",
    train_size: int | None = None,
    eval_size: int | None = None,
    lora_targets: str = "code",
    options: Mapping[str, Any] | None = None,
    name: str = "Paper table",
) -> StudySpec:
    """The paper's Table 1 as the paper ran it: base, ReFT 0+20, LoRA 20+0, HEFT 3+3, HEFT 20+20 (LoRA epochs +
    ReFT epochs), three seeds, full BoolQ from the hub, the recipe of :func:`paper_options` on
    ``meta-llama/Llama-2-7b-chat-hf``.

    LoRA adapts q_proj and v_proj, as the paper's code did (peft's default for Llama); its text says "the model's
    linear layers": ``lora_targets="text"`` (the "Paper table, all linear layers" preset) is that reading.
    ``rows`` replaces the trained rows by (LoRA epochs, ReFT epochs) pairs (``(0, n)`` ReFT, ``(n, 0)`` LoRA,
    else HEFT), e.g. fewer epochs at CPU scale; the report's paper column matches rows by method and epochs.
    Another ``model`` gets the intervention layer at the paper's relative depth (:func:`paper_reft_layer`).
    """
    pairs = [(r.lora_epochs, r.reft_epochs) for r in PAPER_TABLE_1] if rows is None else list(rows)
    arms = [StudyArm("base")]
    for first, second in pairs:
        method = "heft" if first and second else "lora" if first else "reft"
        arms.append(StudyArm(method, lora_epochs=first or None, reft_epochs=second or None))
    recipe = paper_options(model, lora_targets=lora_targets)
    reading = "q_proj and v_proj, as the paper's code" if lora_targets == "code" else (
        "all linear layers, as the paper's text reads")
    layer = recipe["reft.layers"][0]
    mapped = "" if layer == PAPER_REFT_LAYER and model == PAPER_MODEL else (
        f" On {model} the intervention is at layer {layer}, the paper's relative depth (15 of 32).")
    return StudySpec(
        name=name,
        arms=arms,
        seeds=list(seeds),
        base=_shared(model, data, train_size, eval_size, {**recipe, **(options or {})}),
        compare_with_paper=True,
        description=(
            "The paper's Table 1 (arXiv 2509.09801) with the paper's recipe: base, "
            + ", ".join(f"{METHOD_TITLES[arm.method]} {arm.lora_epochs or 0}+{arm.reft_epochs or 0}"
                        for arm in arms[1:])
            + f" (LoRA + ReFT epochs); {len(seeds)} seed{'s' if len(seeds) != 1 else ''}. LoRA r 8, alpha 32 on "
            f"{reading}; one rank-4 LoReFT at the last prompt position; lr 2e-4, effective batch 32; causal-LM "
            "loss over the whole sequence; chat prompt; scored by generation (the paper's) and by logits."
            + mapped
        ),
    )


def paper_table_linear(**overrides: Any) -> StudySpec:
    """:func:`paper_table` with LoRA on all linear layers: the paper's text's reading, not its code's."""
    overrides.setdefault("name", "Paper table, all linear layers")
    return paper_table(lora_targets="text", **overrides)


def equal_budget(
    *,
    epochs: int = 3,
    seeds: Sequence[int] = (42, 43, 44),
    model: str = EMBEDDED_MODEL,
    data: str = "hub",
    train_size: int | None = None,
    eval_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    name: str = "Equal budget",
) -> StudySpec:
    """Not the paper's table: a question of our own. Every trained arm at the same total epochs (LoRA E, ReFT E
    and each HEFT split of E, with base), with the paper's recipe (:func:`paper_options`) mapped to ``model``."""
    _check_int(epochs, "epochs", 2, 1000)
    arms = [
        StudyArm("base"),
        StudyArm("lora", lora_epochs=epochs),
        StudyArm("reft", reft_epochs=epochs),
        *_heft_splits(epochs),
    ]
    return StudySpec(
        name=name,
        arms=arms,
        seeds=list(seeds),
        base=_shared(model, data, train_size, eval_size, {**paper_options(model), **(options or {})}),
        description=(
            f"Not the paper's table: LoRA, ReFT and every HEFT split at the same budget of {epochs} epochs in total "
            f"(does splitting a fixed budget between the stages help?), {len(seeds)} seeds, the paper's recipe."
        ),
    )

# Starting settings for the CPU preset; see cpu_learns_on_boolq.
CPU_BOOLQ_OPTIONS: dict[str, Any] = {
    "lora.rank": 8,
    "lora.alpha": 16.0,
    "lora.target_modules": ["all-linear"],
    # The top 20 of SmolLM2's 30 layers: backward stops at layer 10 (a step costs ~0.76x of all 30);
    # no dropout: two passes over 1,500 rows underfit rather than overfit, and it costs ~0.73x.
    "lora.layers": list(range(10, 30)),
    "lora.dropout": 0.0,
    "reft.rank": 4,
    "reft.layers": [8, 16, 24],
    "reft.positions": "l1",
    "lora_stage.learning_rate": 1e-3,
    "reft_stage.learning_rate": 2e-3,
    "lora_stage.batch_size": 8,
    "reft_stage.batch_size": 8,
    "lora_stage.warmup_ratio": 0.06,
    "reft_stage.warmup_ratio": 0.06,
    "max_length": 256,
    "precision": "auto",
}


def cpu_learns_on_boolq(
    *,
    seeds: Sequence[int] = (42,),
    data: str | None = None,
    train_size: int | None = 1500,
    eval_size: int | None = 500,
    options: Mapping[str, Any] | None = None,
    name: str = "CPU: learns on BoolQ",
) -> StudySpec:
    """The embedded SmolLM2-135M on the shared BoolQ sample, sized for a 2-core CPU: base, LoRA 2
    epochs, HEFT 1+1 (the same epoch count); one seed.

    LoRA adapts every linear layer of the top 20 layers (rank 8, no dropout, learning rate 1e-3,
    batch 8): all linear layers learn far faster at this size than q/v alone, and leaving the
    bottom 10 layers frozen stops the backward pass there. ReFT intervenes at the last prompt
    token of layers 8, 16 and 24, where prefix reuse makes it cheap. The settings were chosen on a
    held-out third of the *training* sample (1,000 rows to train, 500 to score), never on the
    validation rows: one epoch ended at the prior at every learning rate and batch size tried,
    two epochs did not. On the 500 validation questions the LoRA arm scored 68.6% against the
    majority's 64.2% (exact McNemar 66/44, p = 0.045; seed 43: 68.6% again, p = 0.017) after
    985 s of fp32 training on 2 Intel Xeon cores (``bench/results/study-cpu-boolq-2ep-2026-12-02-cpu/``,
    whose NOTES.md has the screening,
    the earlier one-epoch runs that did not learn, and a projection of about 49 min on the 2-core
    AMD EPYC without AVX-512 of the earlier runs: over 45, not measured).
    ``data`` defaults to the shared sample (the label ``boolq-local``, which ``heft_core.data`` resolves to
    ``local_boolq_dir()`` wherever the study runs), else the hub.
    """
    if data is None:
        from heft_core.data import LOCAL_BOOLQ, local_boolq_dir

        data = LOCAL_BOOLQ if local_boolq_dir() is not None else "hub"
    arms = [StudyArm("base"), StudyArm("lora", lora_epochs=2), StudyArm("heft", lora_epochs=1, reft_epochs=1)]
    return StudySpec(
        name=name,
        arms=arms,
        seeds=list(seeds),
        base=_shared(EMBEDDED_MODEL, data, train_size, eval_size, {**CPU_BOOLQ_OPTIONS, **(options or {})}),
        description=(
            "Embedded SmolLM2-135M on BoolQ at CPU scale: do two epochs of all-linear LoRA, and HEFT 1+1 "
            "at the same epoch count, beat the majority answer?"
        ),
    )


def cpu_demo(*, reft_epochs: int = 2, name: str = "CPU demo: four variants", **overrides: Any) -> StudySpec:
    """The app's bundled demo (``app/demo_study``): the CPU preset extended to all four variants, base, LoRA 2,
    ReFT ``reft_epochs`` and HEFT 2+``reft_epochs``, one seed. HEFT's stage 1 is the LoRA run's (the planner
    shares it: same seed, data and settings), and HEFT keeps it as an adapter (``heft_stage2_mode: adapter``),
    so the Ask tab serves LoRA and HEFT from one adapter and one prompt pass."""
    spec = cpu_learns_on_boolq(name=name, **overrides)
    spec.arms = [StudyArm("base"), StudyArm("lora", lora_epochs=2), StudyArm("reft", reft_epochs=reft_epochs),
                 StudyArm("heft", lora_epochs=2, reft_epochs=reft_epochs)]
    spec.base["heft_stage2_mode"] = "adapter"
    spec.description = (
        f"The app's demo: the embedded SmolLM2-135M on the BoolQ sample at CPU scale, base, LoRA 2, ReFT {reft_epochs} "
        f"and HEFT 2+{reft_epochs} (its stage 1 the LoRA run's own adapter), one seed, the CPU preset's settings."
    )
    return spec


PRESETS: dict[str, Callable[..., StudySpec]] = {
    "paper-table": paper_table,
    "paper-table-linear": paper_table_linear,
    "equal-budget": equal_budget,
    "cpu-boolq": cpu_learns_on_boolq,
    "cpu-demo": cpu_demo,
}
PRESET_TITLES: dict[str, str] = {
    "paper-table": "Paper table",
    "paper-table-linear": "Paper table, all linear layers",
    "equal-budget": "Equal budget",
    "cpu-boolq": "CPU: learns on BoolQ",
    "cpu-demo": "CPU demo: four variants",
}


def preset(name: str, **overrides: Any) -> StudySpec:
    """The preset ``name`` (a key of :data:`PRESETS` or its title) with keyword overrides."""
    key = next((k for k, title in PRESET_TITLES.items() if name in (k, title)), None)
    if key is None:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key](**overrides)
