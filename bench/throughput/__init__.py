"""Training and evaluation speed of heft_core against the recipes users would otherwise run.

Every figure is a RATIO of two sides measured side by side in one process: both sides get
the same model weights, the same pre-built batches of token ids in the same order, the same
optimizer (AdamW, constant learning rate, no warmup, gradient clipping at 1.0) and the same
initial adapter weights; they run in alternating chunks (A, B, A, B ...; the order rotates
each round) after untimed warmup steps, and the report gives the median of the per-round
ratios. Absolute numbers are printed only for context: other processes may share the CPU.

Pairs
-----
- LoRA: heft_core (``build_lora_model`` + ``PlainAnswerModel.answer_logits``: logits at the
  answer position only, cross-entropy on the answer token) vs a transformers ``Trainer`` on a
  peft LoRA model with the causal-LM loss (labels -100 except the answer token; full logits).
- ReFT: heft_core ``ReftAnswerModel`` vs pyreft's recipe (``get_reft_model`` + ``ReftModel``
  forward with ``labels`` and ``unit_locations`` from ``intervention_locations``, exactly as
  ``pyreft.ReftTrainer.compute_loss`` does it; batches laid out like
  ``make_last_position_supervised_data_module`` + ``ReftDataCollator``). heft_core's side appears
  three times, to measure each idea alone: ``reft-ours`` (a first epoch: the prompt before the
  first intervened position runs without autograd, see ``heft_core.prefix_cache``),
  ``reft-ours-full`` (that reuse off) and ``reft-ours-cached`` (a later epoch: the prefix states
  were kept from the first).
- LoRA in bf16 (CPU): heft_core vs the Trainer recipe again, both under bf16 autocast over fp32
  weights (``TrainingArguments(bf16=True)``); and heft_core bf16 vs its fp32.
- Evaluation: heft_core ``predict`` (one forward, two logits) vs greedy generation and a
  string match of yes/no, as pyreft's example evaluator does it for BoolQ (32 new tokens, stop at
  EOS): on the base model, and on a ReFT model (pyreft's ``IntervenableModel.generate`` with the
  interventions on the prompt vs heft_core's first and later-epoch evaluations).
- Memory: each training side runs alone in a fresh ``spawn`` subprocess (A, B, A, B ...);
  there the weights are copied out of their memory map, the RSS high-water mark (``VmHWM``) is
  reset once the model and adapter are built, and read after the training steps: "training
  increment" is that peak minus the RSS before the first step (``ru_maxrss`` would include the
  parent's RSS; see :func:`_memory_child` and :func:`_make_weights_anonymous`).
- Utilisation: achieved model FLOP/s (formula in :func:`step_flops`) over the peak FLOP/s of a
  plain square matmul measured in the same run, at sizes chosen by time (:func:`timed_matmul_peak`),
  for the dtypes the selected sides use only (no bf16 peak with ``--no-bf16``).

Run ``python -m bench.throughput --help`` from the repository root; ``--quick`` gives a smoke run in a minute or two.
"""
from __future__ import annotations

from bench.throughput.alternation import (  # noqa: F401
    SideTiming,
    alternate,
    close_all,
    copy_from_first,
    paired_ratios,
)
from bench.throughput.build import (  # noqa: F401
    REFT_OURS_KINDS,
    BenchOptions,
    _interventions,
    bf16_autocast,
    build_side,
    copy_initial_weights,
    load_base,
    lora_settings,
    model_shape,
    reft_settings,
)
from bench.throughput.cli import (  # noqa: F401
    lora_kinds,
    main,
    parse_args,
    profile_side,
    reft_kinds,
    release_memory,
    run_lora_group,
    run_reft_group,
)
from bench.throughput.common import (  # noqa: F401
    IGNORE_INDEX,
    MAX_GRAD_NORM,
    ROOT,
    logger,
)
from bench.throughput.evaluation import (  # noqa: F401
    YES_NO_RE,
    _ContextFactory,
    _decode_new,
    _generation_args,
    _generation_correct,
    eval_pair,
    eval_sides,
    generation_answer,
    reft_eval_group,
)
from bench.throughput.flops import (  # noqa: F401
    side_flops,
    step_flops,
)
from bench.throughput.memory import (  # noqa: F401
    _make_weights_anonymous,
    _memory_child,
    _proc_status_bytes,
    _reset_peak_rss,
    _side_modules,
    measure_memory,
)
from bench.throughput.peaks import (  # noqa: F401
    PEAK_BUDGET_S,
    PEAK_DTYPES,
    PEAK_MAX_SIZE,
    PEAK_MULTIPLY_LIMIT_S,
    PEAK_REPEATS,
    PEAK_START_SIZE,
    QUICK_PEAK_BUDGET_S,
    QUICK_PEAK_MULTIPLY_LIMIT_S,
    MatmulPeak,
    MatmulPeaks,
    SquareMultiplyTimer,
    cpu_has_bf16_units,
    load_average,
    machine_description,
    matmul_peak,
    next_peak_size,
    peak_limits,
    peak_names,
    peak_summary,
    refresh_peaks,
    synchronize,
    timed_matmul_peak,
)
from bench.throughput.report import (  # noqa: F401
    _memory_summary,
    eval_table,
    fmt_range,
    median,
    mib,
    training_table,
)
from bench.throughput.sides import (  # noqa: F401
    OursSide,
    PyreftSide,
    Side,
    TrainerSide,
    _ListDataset,
    _unwrap,
)
from bench.throughput.workload import (  # noqa: F401
    Workload,
    batch_to,
    build_workload,
    encode_rows,
    make_reference_batch,
    pyreft_positions,
)
