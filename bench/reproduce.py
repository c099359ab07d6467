"""The paper's comparison at a chosen scale, as a study: a thin caller of ``heft_core.study``.

It builds the "Paper table" preset (``heft_core.study.paper_table``: base; LoRA and ReFT at E
epochs and at round(E x 20/3); HEFT at every split of E) from the flags below and trains it with
``heft_core.study_runner.run_study_in_process``, exactly as ``python -m heft_core study`` does:
one implementation of orchestration and statistics for the app, the CLI and this benchmark.
The output directory is a study directory (``results.md`` / ``.csv`` / ``.json``, charts,
per-question predictions, ``spec.yaml``, one run directory per run); ``python -m heft_core
study-report DIR`` prints its report again. To see the runs in the app, launch the same spec
from the Studies tab or the ``/start_study`` API instead (it queues them for the worker).

Flags left out keep the preset's settings (``heft_core.study.PAPER_OPTIONS``). Examples:

    python -m bench.reproduce --print-spec                       # the plan, nothing trained
    python -m bench.reproduce --train-size 128 --eval-size 128 --epochs 3 --long-factor 7 \\
        --lora-targets all-linear --lora-lr 1e-3 --max-length 256 --batch-size 8   # CPU scale
    python -m bench.reproduce --model meta-llama/Llama-2-7b-hf --data hub --train-size all \\
        --eval-size all --epochs 3 --seeds 42,43,44 --precision bf16             # the paper's scale

For the CPU study that learns (LoRA and HEFT beating the majority answer on the shared BoolQ
sample) use ``python -m heft_core study --preset cpu-boolq``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any, Sequence

from heft_core.data import local_boolq_dir
from heft_core.study import StudyArm, StudySpec, paper_table

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


def parse_splits(text: str) -> list[tuple[int, int]]:
    """'1+2,2+1' -> [(1, 2), (2, 1)]."""
    splits = []
    for part in text.split(","):
        first, plus, second = part.strip().partition("+")
        if not plus or not first.isdigit() or not second.isdigit() or int(first) < 1 or int(second) < 1:
            raise argparse.ArgumentTypeError(f"--heft-splits: {part.strip()!r} is not E1+E2 with E1, E2 >= 1")
        splits.append((int(first), int(second)))
    return splits


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a local model directory or a hub id")
    parser.add_argument("--data", default=None, help="data source (default: the local BoolQ sample, $HEFT_BOOLQ_DIR "
                                                     "or ../shared/data/boolq, if present, else 'hub')")
    parser.add_argument("--train-size", type=size_arg, default=None, help="training rows ('all', the default)")
    parser.add_argument("--eval-size", type=size_arg, default=None, help="evaluation rows ('all', the default)")
    parser.add_argument("--epochs", type=int, default=3, help="E: the short budget of LoRA and ReFT, and HEFT's")
    parser.add_argument("--heft-splits", type=parse_splits, default=None,
                        help="HEFT splits E1+E2, comma-separated (default: every split of E)")
    parser.add_argument("--long-factor", type=float, default=20 / 3, help="long baselines train round(E x factor)")
    parser.add_argument("--no-long", action="store_true", help="leave out the long LoRA and ReFT baselines")
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
        boolq = local_boolq_dir()
        args.data = str(boolq) if boolq else "hub"
    return args


def build_spec(args: argparse.Namespace) -> StudySpec:
    """The "Paper table" preset with the flags' settings (``heft_core.study.paper_table``)."""
    options: dict[str, Any] = {option: getattr(args, flag) for flag, option in OPTION_FLAGS.items()
                               if getattr(args, flag) is not None}
    for flag, option in STAGE_FLAGS.items():
        if getattr(args, flag) is not None:
            options[f"lora_stage.{option}"] = options[f"reft_stage.{option}"] = getattr(args, flag)
    if args.lora_lr is not None:
        options["lora_stage.learning_rate"] = args.lora_lr
    if args.reft_lr is not None:
        options["reft_stage.learning_rate"] = args.reft_lr
    spec = paper_table(epochs=args.epochs, long_factor=args.long_factor, seeds=args.seed_list, model=args.model,
                       data=args.data, train_size=args.train_size, eval_size=args.eval_size, options=options,
                       name=f"Paper table, E={args.epochs}")
    arms = [arm for arm in spec.arms if not (args.no_long and arm.method in ("lora", "reft")
                                             and arm.total_epochs > args.epochs)]
    if args.heft_splits is not None:
        arms = [arm for arm in arms if arm.method != "heft"]
        arms += [StudyArm("heft", lora_epochs=first, reft_epochs=second) for first, second in args.heft_splits]
    return dataclasses.replace(spec, arms=arms)  # validated again on construction


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
