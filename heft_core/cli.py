"""Command line: ``python -m heft_core train|eval|ask|compare|export|study|study-report``.

Bad input (any ``heft_common.errors.HeftError``: a bad option, data source, model or run
directory) exits with status 2 and a one-line message, never a traceback. The training and
inference modules import torch, so each command imports them when it runs (heavy: deferred).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from heft_common.errors import ConfigError, HeftError
from heft_core import stats
from heft_core.artifacts import load_run
from heft_core.callbacks import TrainerCallback
from heft_core.config import RunConfig
from heft_core.study_presets import PRESETS

logger = logging.getLogger("heft_core")


def _int_or_auto(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else int(text)


# flag -> dotted config key; every option of RunConfig is reachable here or through --set.
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--method", "method", str, "base (zero-shot), lora, reft or heft"),
    ("--model", "model", str, "'embedded' (SmolLM2-135M-Instruct, default), a hub id or a local directory"),
    ("--data", "data", str,
     "'synthetic' (offline, not BoolQ), 'hub' (google/boolq), hub:<id>, or a local file/directory"),
    ("--lora-rank", "lora.rank", int, "LoRA rank (1..1024)"),
    ("--lora-alpha", "lora.alpha", float, "LoRA alpha"),
    ("--lora-dropout", "lora.dropout", float, "LoRA dropout [0, 1)"),
    ("--lora-targets", "lora.target_modules", str, "comma-separated linear layers (q_proj,v_proj) or all-linear"),
    ("--lora-layers", "lora.layers", str, "layers to adapt, e.g. '0-11' (default all)"),
    ("--reft-rank", "reft.rank", int, "LoReFT rank (1..512)"),
    ("--reft-layers", "reft.layers", str, "intervention layers, e.g. 'all' or '2,4,6' or '0-7'"),
    ("--reft-positions", "reft.positions", str, "positions in pyreft syntax: f7+l7, l1, f3, ..."),
    ("--reft-dropout", "reft.dropout", float, "dropout on the intervened representation"),
    ("--lora-epochs", "lora_stage.epochs", int, "epochs of LoRA (LoRA-only, or HEFT stage 1)"),
    ("--lora-lr", "lora_stage.learning_rate", float, "learning rate of the LoRA stage"),
    ("--reft-epochs", "reft_stage.epochs", int, "epochs of ReFT (ReFT-only, or HEFT stage 2)"),
    ("--reft-lr", "reft_stage.learning_rate", float, "learning rate of the ReFT stage"),
    ("--batch-size", "*.batch_size", int, "batch size of both stages"),
    ("--grad-accum", "*.grad_accum", int, "gradient accumulation steps of both stages"),
    ("--warmup-ratio", "*.warmup_ratio", float, "warmup ratio of both stages"),
    ("--weight-decay", "*.weight_decay", float, "weight decay of both stages"),
    ("--scheduler", "*.scheduler", str, "linear, cosine, constant or constant_with_warmup"),
    ("--stage2-mode", "heft_stage2_mode", str, "HEFT stage 2 over LoRA kept as a frozen 'adapter' or 'merged'"),
    ("--max-length", "max_length", int, "max tokens per example (passages are truncated)"),
    ("--train-size", "train_size", int, "training examples (subset of the train split)"),
    ("--eval-size", "eval_size", int, "evaluation examples (subset of the validation split)"),
    ("--eval-batch-size", "eval_batch_size", int, "evaluation batch size"),
    ("--seed", "seed", int, "seed for subsets, initialisation and batch order"),
    ("--precision", "precision", str, "auto (bf16 on GPUs that have it), no, bf16, fp16"),
    ("--prefix-cache-mb", "prefix_cache_mb", _int_or_auto,
     "MiB of ReFT prefix states kept across epochs: 'auto' (a quarter of available memory), "
     "or a number (0: recompute)"),
    ("--checkpoint-minutes", "checkpoint_minutes", float,
     "minutes between checkpoints inside an epoch (default 10; 0: only at epoch ends)"),
    ("--name", "name", str, "a name for the run"),
    ("--report-to", "report.report_to", str,
     "trackers to report to, comma-separated: trackio, tensorboard, wandb, mlflow (report.* options via --set)"),
]


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("*."):
        for stage in ("lora_stage", "reft_stage"):
            _set_dotted(target, f"{stage}.{key[2:]}", value)
        return
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _parse_set(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError("--set", f"{text!r} must look like key=value, e.g. lora_stage.batch_size=4")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def config_from_args(args: argparse.Namespace) -> RunConfig:
    data: dict[str, Any] = RunConfig.from_file(args.config).to_dict() if args.config else {}
    for flag, key, _kind, _help in _TRAIN_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set_dotted(data, key, value)
    if args.no_share_weights:
        _set_dotted(data, "reft.share_weights", False)
    if args.keep_epoch_checkpoints:
        _set_dotted(data, "keep_epoch_checkpoints", True)
    for item in args.set or []:
        _set_dotted(data, *_parse_set(item))
    return RunConfig.from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m heft_core",
        description="HEFT Studio engine: LoRA, ReFT and HEFT (LoRA then ReFT) on BoolQ-style yes/no data.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a run and write its directory",
        description="Train base/lora/reft/heft. Options override the --config file; "
        "--set reaches any option by its dotted name.",
    )
    train.add_argument("--config", help="YAML or JSON file with any RunConfig options")
    for flag, _key, kind, help_text in _TRAIN_FLAGS:
        train.add_argument(flag, type=kind, default=None, help=help_text)
    train.add_argument(
        "--no-share-weights", action="store_true", help="separate interventions for first and last positions"
    )
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="any option by dotted name, e.g. reft_stage.warmup_ratio=0.05 (repeatable)",
    )
    train.add_argument(
        "--keep-epoch-checkpoints", action="store_true", help="keep every epoch's checkpoint, not only the latest"
    )
    train.add_argument("--output-dir", "-o", help="run directory to write (required unless --resume)")
    train.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue an interrupted or cancelled run from its latest checkpoint, with its own recorded config",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a run directory on a data source")
    ev.add_argument("run_dir")
    ev.add_argument("--data", help="data source (default: the run's own)")
    ev.add_argument("--eval-size", type=int, help="number of validation questions (default: the run's own)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--predictions", help="write per-question predictions (JSON Lines) here")

    ask = sub.add_parser("ask", help="answer one question with the base model and one or more runs")
    ask.add_argument("run_dirs", nargs="*", help="run directories (same base model)")
    ask.add_argument("--model", help="base model when no run is given (default: the runs' model or 'embedded')")
    ask.add_argument("--passage", required=True)
    ask.add_argument("--question", required=True)

    cmp = sub.add_parser("compare", help="paired McNemar test of two runs on the same questions")
    cmp.add_argument("run_a")
    cmp.add_argument("run_b")
    cmp.add_argument(
        "--claim", nargs=3, type=float, metavar=("ACC_A", "ACC_B", "N"),
        help="instead: what a claimed accuracy difference on N questions means, e.g. 0.8517 0.8505 3270",
    )

    from heft_core.export import EXPORT_FORMATS  # light: no torch until an export runs

    formats = "; ".join(f"{name} ({', '.join(fmt.methods)}): {fmt.description}" for name, fmt in EXPORT_FORMATS.items())
    exp = sub.add_parser(
        "export", help="export a finished run (peft adapter, merged model or pyreft interventions) with a model card"
    )
    exp.add_argument("run_dir")
    exp.add_argument("--format", help=f"{formats} (default: the run's first)")
    exp.add_argument("--out", required=True, help="new or empty directory, or a previous export to replace")
    exp.add_argument(
        "--push", metavar="REPO_ID",
        help="then upload the export to this Hugging Face model repo (token: HF_TOKEN or `hf auth login`)",
    )
    exp.add_argument("--private", action="store_true", help="create the --push repo as private")

    study = sub.add_parser(
        "study", help="train a whole study (arms x seeds x grid) in this process and write its report directory",
        description="Runs every planned run of a study spec (YAML/JSON) sequentially, then writes results.md/csv/json, "
                    "charts, predictions and the spec into --out.",
    )
    study.add_argument("spec", nargs="?", help="study spec file (YAML or JSON); or use --preset")
    study.add_argument("--preset", help="start from a preset instead: " + ", ".join(PRESETS))
    study.add_argument("--out", help="study directory to write (one zip-able directory)")
    study.add_argument("--resume", action="store_true",
                       help="reuse runs finished in --out with the same settings; continue a run stopped part-way "
                            "from its checkpoint")
    study.add_argument("--print-spec", action="store_true", help="print the spec as YAML and its run count; stop")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    report = sub.add_parser("study-report", help="print the report of a study directory written by `study`")
    report.add_argument("study_dir")
    report.add_argument("--format", choices=("md", "json", "csv"), default="md", help="md, json or csv (runs)")
    imp = sub.add_parser("study-import", help="import a study directory (or its zip) into the app's registry "
                                              "(HEFT_HOME); runs `python -m app.study_import`")
    imp.add_argument("study_dir")
    return parser


class _ProgressCallback(TrainerCallback):
    """tqdm bar over optimizer steps, with loss and the latest accuracy."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, info: dict[str, Any]) -> None:
        logger.info(
            "training %s on %s: %d train / %d eval examples, %d steps, device %s", info["method"], info["data_label"],
            info["train_examples"], info["eval_examples"], info["total_steps"], info["device"],
        )
        if self.enabled and info["total_steps"]:
            self.bar = tqdm(total=info["total_steps"], unit="step", file=sys.stderr)

    def on_step(self, event: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=event.stage, loss=f"{event.loss:.4f}", tok_s=f"{event.tokens_per_second:.0f}")

    def on_evaluate(self, event: Any) -> None:
        message = (
            f"eval {event.stage} epoch {event.epoch}: accuracy {event.accuracy:.4f} ({event.scoring}) "
            f"[{event.low:.4f}, {event.high:.4f}] n={event.n}"
        )
        if event.generation_accuracy is not None and event.scoring != "generation":
            message += f"; generation {event.generation_accuracy:.4f}, {event.unparsed} unparsed"
        elif event.unparsed is not None:
            message += f"; {event.unparsed} unparsed"
        (self.bar.write(message) if self.bar is not None else logger.info(message))

    def on_log(self, message: str) -> None:
        logger.info(message)


def _resume_config(args: argparse.Namespace) -> RunConfig:
    """The recorded config of the run directory named by ``--resume`` (no other option may change it)."""
    from heft_core.artifacts import read_run_record
    from heft_core.checkpoint import read_run_config

    given = [flag for flag, *_ in _TRAIN_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]
    switches = (("--config", args.config), ("--set", args.set), ("--no-share-weights", args.no_share_weights),
                ("--keep-epoch-checkpoints", args.keep_epoch_checkpoints))
    given += [flag for flag, on in switches if on]
    if args.output_dir and Path(args.output_dir).resolve() != Path(args.resume).resolve():
        given.append("--output-dir")
    if given:
        raise ConfigError("--resume", f"continues the run with its own recorded config; drop {', '.join(given)}")
    record = read_run_record(args.resume) if (Path(args.resume) / "run.json").exists() else None
    if record is not None and record.get("result", {}).get("status") == "completed":
        raise ConfigError("--resume", f"{args.resume} is a completed run; there is nothing to resume")
    recorded = read_run_config(args.resume) or (record or {}).get("config")
    if recorded is None:
        raise ConfigError(
            "--resume", f"{args.resume} has no recorded run config; it is not a run directory written by 'train'"
        )
    return RunConfig.from_dict(recorded)


def _cmd_train(args: argparse.Namespace) -> int:
    from heft_core.train import train

    if args.resume:
        config, output_dir = _resume_config(args), args.resume
    elif not args.output_dir:
        raise ConfigError("--output-dir", "name the run directory to write (or --resume RUN_DIR to continue a run)")
    else:
        config, output_dir = config_from_args(args), args.output_dir
    result = train(config, output_dir, callbacks=[_ProgressCallback(not args.no_progress)], resume=bool(args.resume))
    print(json.dumps(result.summary()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from heft_core.inference import evaluate_run

    for option, value in (("--eval-size", args.eval_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(option, f"must be a positive integer, got {value}")
    accuracy, predictions, signature = evaluate_run(args.run_dir, args.data, args.eval_size, args.batch_size)
    if args.predictions:
        with open(args.predictions, "w") as fh:
            fh.writelines(json.dumps(p.to_dict()) + "\n" for p in predictions)
    from heft_core.evaluate import accuracies_of

    print(json.dumps({
        "scoring": predictions[0].scoring if predictions else "logits",
        "accuracy": accuracy.accuracy, "accuracy_ci": [accuracy.low, accuracy.high], "eval_n": accuracy.n,
        "correct": accuracy.correct, "accuracies": accuracies_of(predictions), "eval_signature": signature,
    }))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from heft_core.inference import SideBySide

    configs = [load_run(d).config for d in args.run_dirs]
    model_ref = args.model or (configs[0].model if configs else "embedded")
    server = SideBySide(model_ref, template=configs[0].template if configs else None)
    for run_dir in args.run_dirs:
        server.add_run(Path(run_dir).name, run_dir)
    answers = server.answer_all(args.passage, args.question)
    print(json.dumps({name: a.to_dict() for name, a in answers.items()}))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.claim:
        acc_a, acc_b, n = args.claim
        try:
            claim = stats.paper_claim_check(acc_a, acc_b, int(n))
        except ValueError as error:  # stats' range checks; here they are the user's numbers
            raise ConfigError("--claim", str(error)) from error
        print(json.dumps(claim))
        return 0
    run_a, run_b = load_run(args.run_a), load_run(args.run_b)
    if run_a.eval_signature != run_b.eval_signature:
        raise ConfigError(
            "compare", "the two runs were evaluated on different questions; a paired test needs the same eval set"
        )
    comparison = stats.paired_comparison(run_a.correctness(), run_b.correctness())
    payload = {"a": str(args.run_a), "b": str(args.run_b), **comparison.__dict__, "summary": comparison.summary()}
    print(json.dumps(payload))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from heft_core import export

    if args.private and not args.push:
        raise ConfigError("--private", "applies to --push only; name the repo with --push REPO_ID")
    token = None
    if args.push:  # checked before exporting: a push that cannot happen writes nothing
        export.check_repo_id(args.push)
        token = export.resolve_token()
    out = export.export_run(args.run_dir, args.out, args.format)
    manifest = export.read_manifest(out) or {}
    payload = {
        "out": str(out), "format": manifest.get("format"), "method": manifest.get("method"),
        "files": manifest.get("files"), "pushed": None,
    }
    if args.push:
        payload["pushed"] = export.push_to_hub(out, args.push, private=args.private, token=token)
    print(json.dumps(payload))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from heft_core import study, study_presets, study_runner

    if bool(args.spec) == bool(args.preset):
        raise ConfigError("spec", "give a study spec file or --preset NAME (one of them)")
    spec = study.StudySpec.from_file(args.spec) if args.spec else study_presets.preset(args.preset)
    if args.print_spec:
        print(spec.to_yaml() + f"# {spec.run_count} planned runs")
        return 0
    if not args.out:
        raise ConfigError("--out", "name the study directory to write")
    report = study_runner.run_study_in_process(spec, args.out, progress=not args.no_progress, resume=args.resume)
    print(json.dumps({
        "study": report.name, "out": str(args.out), "planned": report.planned_runs, "finished": report.finished_runs,
        "missing": report.missing, "report": str(Path(args.out) / "results.md"),
    }))
    return 0


def _cmd_study_report(args: argparse.Namespace) -> int:
    from heft_core import study_report, study_runner

    spec, outcomes = study_runner.load_study_dir(args.study_dir)
    report = study_report.study_report(spec, outcomes)
    report.charts = [name for name in study_report.CHART_FILES if (Path(args.study_dir) / name).exists()]
    print({"md": report.to_markdown, "json": report.to_json, "csv": report.to_csv}[args.format]())
    return 0


def _cmd_study_import(args: argparse.Namespace) -> int:
    # The registry is the app's (SQL lives in storage/, the import's rules in app/): the library delegates to the
    # app's command, imported by name so heft_core itself imports neither.
    import importlib

    return importlib.import_module("app.study_import").main([args.study_dir])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose or args.command in ("train", "study") else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "train": _cmd_train, "eval": _cmd_eval, "ask": _cmd_ask, "compare": _cmd_compare, "export": _cmd_export,
        "study": _cmd_study, "study-report": _cmd_study_report, "study-import": _cmd_study_import,
    }
    try:
        return handlers[args.command](args)
    except HeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
