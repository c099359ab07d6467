"""Command line: ``python -m heft_core train|eval|ask|compare``.

Bad input (any ConfigError, DataError, ModelLoadError or RunLoadError) exits with status 2
and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from heft_core.callbacks import TrainerCallback
from heft_core.config import ConfigError, RunConfig

logger = logging.getLogger("heft_core")


def _int_or_auto(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else int(text)


# flag -> dotted config key; every option of RunConfig is reachable here or through --set.
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--method", "method", str, "base (zero-shot), lora, reft or heft"),
    ("--model", "model", str, "'embedded' (SmolLM2-135M-Instruct, default), a hub id or a local directory"),
    ("--data", "data", str, "'synthetic' (offline, not BoolQ), 'hub' (google/boolq), hub:<id>, or a local file/directory"),
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
    ("--prefix-cache-mb", "prefix_cache_mb", _int_or_auto, "MiB of ReFT prefix states kept across epochs: 'auto' (a quarter of available memory), or a number (0: recompute)"),
    ("--name", "name", str, "a name for the run"),
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
    for item in args.set or []:
        _set_dotted(data, *_parse_set(item))
    return RunConfig.from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m heft_core", description="HEFT Studio engine: LoRA, ReFT and HEFT (LoRA then ReFT) on BoolQ-style yes/no data.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a run and write its directory", description="Train base/lora/reft/heft. Options override the --config file; --set reaches any option by its dotted name.")
    train.add_argument("--config", help="YAML or JSON file with any RunConfig options")
    for flag, _key, kind, help_text in _TRAIN_FLAGS:
        train.add_argument(flag, type=kind, default=None, help=help_text)
    train.add_argument("--no-share-weights", action="store_true", help="separate interventions for first and last positions")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any option by dotted name, e.g. reft_stage.warmup_ratio=0.05 (repeatable)")
    train.add_argument("--output-dir", "-o", required=True, help="run directory to write")
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
    cmp.add_argument("--claim", nargs=3, type=float, metavar=("ACC_A", "ACC_B", "N"), help="instead: what a claimed accuracy difference on N questions means, e.g. 0.8517 0.8505 3270")
    return parser


class _ProgressCallback(TrainerCallback):
    """tqdm bar over optimizer steps, with loss and the latest accuracy."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, info: dict[str, Any]) -> None:
        logger.info("training %s on %s: %d train / %d eval examples, %d steps, device %s", info["method"], info["data_label"], info["train_examples"], info["eval_examples"], info["total_steps"], info["device"])
        if self.enabled and info["total_steps"]:
            from tqdm import tqdm

            self.bar = tqdm(total=info["total_steps"], unit="step", file=sys.stderr)

    def on_step(self, event: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=event.stage, loss=f"{event.loss:.4f}", tok_s=f"{event.tokens_per_second:.0f}")

    def on_evaluate(self, event: Any) -> None:
        message = f"eval {event.stage} epoch {event.epoch}: accuracy {event.accuracy:.4f} [{event.low:.4f}, {event.high:.4f}] n={event.n}"
        (self.bar.write(message) if self.bar is not None else logger.info(message))

    def on_log(self, message: str) -> None:
        logger.info(message)


def _cmd_train(args: argparse.Namespace) -> int:
    from heft_core.train import train

    config = config_from_args(args)
    result = train(config, args.output_dir, callbacks=[_ProgressCallback(not args.no_progress)])
    print(json.dumps(result.summary()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from heft_core.inference import evaluate_run

    accuracy, predictions, signature = evaluate_run(args.run_dir, args.data, args.eval_size, args.batch_size)
    if args.predictions:
        with open(args.predictions, "w") as fh:
            fh.writelines(json.dumps(p.to_dict()) + "\n" for p in predictions)
    print(json.dumps({"accuracy": accuracy.accuracy, "accuracy_ci": [accuracy.low, accuracy.high], "eval_n": accuracy.n, "correct": accuracy.correct, "eval_signature": signature}))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from heft_core.artifacts import load_run
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
    from heft_core import stats
    from heft_core.artifacts import load_run

    if args.claim:
        acc_a, acc_b, n = args.claim
        print(json.dumps(stats.paper_claim_check(acc_a, acc_b, int(n))))
        return 0
    run_a, run_b = load_run(args.run_a), load_run(args.run_b)
    if run_a.eval_signature != run_b.eval_signature:
        raise ConfigError("compare", "the two runs were evaluated on different questions; a paired test needs the same eval set")
    comparison = stats.paired_comparison(run_a.correctness(), run_b.correctness())
    payload = {"a": str(args.run_a), "b": str(args.run_b), **comparison.__dict__, "summary": comparison.summary()}
    print(json.dumps(payload))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from heft_core.artifacts import RunLoadError
    from heft_core.data import DataError
    from heft_core.models import ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "train" else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "ask": _cmd_ask, "compare": _cmd_compare}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelLoadError, RunLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
