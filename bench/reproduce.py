"""The paper's Table 1 at a chosen scale, as a study: a thin caller of ``heft_core.study``.

It builds the "Paper table" preset (``heft_core.study_presets.paper_table``: base, ReFT 0+20, LoRA 20+0,
HEFT 3+3 and HEFT 20+20, LoRA epochs + ReFT epochs, with the paper's own recipe from its sections
3.2-3.4 and appendix script: ``heft_core.study_presets.paper_options``) from the flags below and trains it
with ``heft_core.study_runner.run_study_in_process``, exactly as ``python -m heft_core study`` does:
one implementation of orchestration and statistics for the app, the CLI and this benchmark.
The output directory is a study directory (``results.md`` / ``.csv`` / ``.json``, charts,
per-question predictions, ``spec.yaml``, one run directory per run); ``python -m heft_core
study-report DIR`` prints its report again, with the paper's number and time beside each row.
To see the runs in the app, launch the same spec from the Studies tab or the ``/start_study``
API instead (it queues them for the worker).

Flags left out keep the paper's settings; on a model other than Llama-2-7B the intervention
layer moves to the same relative depth (15 of 32 -> 14 of SmolLM2's 30). Examples:

    python -m bench.reproduce --print-spec                       # the plan, nothing trained
    python -m bench.reproduce --rows 0+2,2+0,1+1 --train-size 256 --eval-size 500 --max-length 512 \\
        --seeds 42,43                                             # CPU scale on the embedded model
    python -m bench.reproduce --model meta-llama/Llama-2-7b-chat-hf --data hub --train-size all \\
        --eval-size all --seeds 42,43,44                          # the paper's scale (a GPU)

For the CPU study that learns (LoRA and HEFT beating the majority answer on the shared BoolQ
sample) use ``python -m heft_core study --preset cpu-boolq``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
from pathlib import Path
from typing import Any, Sequence

import yaml

from heft_core.data import LOCAL_BOOLQ, local_boolq_dir
from heft_core.study import StudySpec
from heft_core.study_presets import PAPER_TABLE_1, paper_table

ROOT = Path(__file__).resolve().parent.parent

# flag -> the dotted RunConfig option it sets (only when given)
OPTION_FLAGS = {
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_targets": "lora.target_modules",
    "reft_rank": "reft.rank",
    "reft_layers": "reft.layers",
    "reft_positions": "reft.positions",
    "max_length": "max_length",
    "precision": "precision",
}
STAGE_FLAGS = {  # flag -> the option of both stages it sets
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "warmup_ratio": "warmup_ratio",
}


def size_arg(text: str) -> int | None:
    return None if str(text).lower() in ("all", "0", "none") else int(text)


def parse_rows(text: str) -> list[tuple[int, int]]:
    """'0+20,20+0,3+3' -> [(0, 20), (20, 0), (3, 3)]: LoRA epochs + ReFT epochs per trained row."""
    rows = []
    for part in text.split(","):
        first, plus, second = part.strip().partition("+")
        if not plus or not first.isdigit() or not second.isdigit() or int(first) + int(second) < 1:
            raise argparse.ArgumentTypeError(f"--rows: {part.strip()!r} is not E1+E2 (LoRA + ReFT epochs, not 0+0)")
        rows.append((int(first), int(second)))
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a local model directory or a hub id")
    parser.add_argument("--data", default=None, help="data source (default: the local BoolQ sample, $HEFT_BOOLQ_DIR "
                                                     "or ../shared/data/boolq, if present, else 'hub')")
    parser.add_argument("--train-size", type=size_arg, default=None, help="training rows ('all', the default)")
    parser.add_argument("--eval-size", type=size_arg, default=None, help="evaluation rows ('all', the default)")
    parser.add_argument("--rows", type=parse_rows, default=None,
                        help="trained rows as LoRA+ReFT epochs, comma-separated (default: the paper's "
                             + ",".join(row.budget_label for row in PAPER_TABLE_1) + ")")
    parser.add_argument("--lora-reading", choices=["code", "text"], default="code",
                        help="LoRA targets: the paper's code (q_proj, v_proj; default) or its text (all linear)")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds")
    parser.add_argument("--lora-lr", type=float, default=None)
    parser.add_argument("--reft-lr", type=float, default=None)
    for flag in ("--batch-size", "--grad-accum", "--lora-rank", "--reft-rank", "--max-length"):
        parser.add_argument(flag, type=int, default=None)
    parser.add_argument("--warmup-ratio", type=float, default=None)
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--lora-targets", default=None, help="comma-separated module names or 'all-linear'")
    parser.add_argument("--reft-layers", default=None, help="'all' or e.g. '8,16,24'")
    parser.add_argument("--reft-positions", default=None, help="e.g. 'f7+l7' or 'l1'")
    parser.add_argument("--precision", default=None, choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any dotted run option, e.g. --set template.format=plain (YAML value; repeatable)")
    parser.add_argument("--out", default=None, help="study directory (default: bench/results/reproduce-<date>)")
    parser.add_argument("--resume", action="store_true", help="reuse runs finished in --out with the same settings")
    parser.add_argument("--print-spec", action="store_true", help="print the study spec and its run count; stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: {args.seeds!r} is not a comma-separated list of whole numbers")
    if args.data is None:
        args.data = LOCAL_BOOLQ if local_boolq_dir() else "hub"  # a label, resolved where it runs
    return args


def build_spec(args: argparse.Namespace) -> StudySpec:
    """The "Paper table" preset with the flags' settings (``heft_core.study_presets.paper_table``)."""
    options: dict[str, Any] = {option: getattr(args, flag) for flag, option in OPTION_FLAGS.items()
                               if getattr(args, flag) is not None}
    for flag, option in STAGE_FLAGS.items():
        if getattr(args, flag) is not None:
            options[f"lora_stage.{option}"] = options[f"reft_stage.{option}"] = getattr(args, flag)
    for item in args.overrides:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise SystemExit(f"--set: {item!r} is not KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    if args.lora_lr is not None:
        options["lora_stage.learning_rate"] = args.lora_lr
    if args.reft_lr is not None:
        options["reft_stage.learning_rate"] = args.reft_lr
    return paper_table(rows=args.rows, seeds=args.seed_list, model=args.model, data=args.data,
                       train_size=args.train_size, eval_size=args.eval_size, lora_targets=args.lora_reading,
                       options=options, name="Paper table" + (", all linear layers" if args.lora_reading == "text" else ""))


def main(argv: Sequence[str] | None = None) -> Any:
    """Train the study (or print its spec); returns the ``StudyReport`` (None with --print-spec)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = build_spec(args)
    if args.print_spec:
        print(spec.to_yaml() + f"# {spec.run_count} planned runs")
        return None
    from heft_core.study_runner import run_study_in_process

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"reproduce-{dt.date.today().isoformat()}"
    report = run_study_in_process(spec, out, progress=not args.no_progress, resume=args.resume)
    print((out / "results.md").read_text())
    return report


if __name__ == "__main__":
    main()
