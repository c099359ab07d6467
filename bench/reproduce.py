"""The paper's comparison at a chosen scale: base, LoRA, ReFT, HEFT (several splits), long baselines.

One base model, one data source, one fixed train subset and one fixed evaluation subset for
every run (chosen once with ``--subset-seed``), and the same seeds for every method. For each
seed it trains, with ``heft_core.train.train``:

- ``base``: the zero-shot model (no training);
- ``lora`` and ``reft`` for E epochs (``--epochs``);
- ``heft`` for each split E1+E2 of ``--heft-splits`` (LoRA E1 epochs, then ReFT E2 epochs on the
  frozen LoRA model);
- ``lora`` and ``reft`` for round(E * ``--long-factor``) epochs (the paper's 20/3 budget ratio;
  ``--no-long`` skips them).

Every run evaluates after each epoch. Output under ``--out``: ``results.md`` (table with 95%
Wilson intervals, pairwise exact McNemar p-values per seed), ``results.json``, the chart
``accuracy_vs_epochs.png`` and one run directory per run under ``runs/`` (config, metrics,
per-question predictions). Each trained run is also recorded in the HEFT Studio database (as a
completed run with its step metrics and evaluations, so it shows up in the UI) unless ``--no-db``.

CPU scale (the defaults; embedded SmolLM2-135M, shared BoolQ sample, 48 train / 96 eval rows,
E=3, HEFT 1+2 and 2+1, long baselines 21 epochs: 54 training epochs and 55 evaluations in all;
about 25-30 min on 2 idle cores by the step times in bench/results, 2-3x that on a shared CPU):
    python -m bench.reproduce
GPU scale (any hub model, full BoolQ), e.g.:
    python -m bench.reproduce --model meta-llama/Llama-2-7b-hf --data hub --train-size all \\
        --eval-size all --epochs 3 --seeds 42,43,44 --batch-size 16 --max-length 512 --precision bf16
Smoke run:
    python -m bench.reproduce --train-size 32 --eval-size 32 --epochs 1 --heft-splits 1+1 --max-length 128 --no-long --no-db
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from app.recording import DatabaseCallback, run_results
from heft_core.data import local_boolq_dir

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.reproduce")

PAPER_LONG_FACTOR = 20 / 3


@dataclass
class Plan:
    """One run to do: its name, method and epochs per stage."""

    name: str
    method: str
    lora_epochs: int = 0
    reft_epochs: int = 0
    seed: int = 42
    group: str = ""  # runs of one configuration across seeds share a group

    @property
    def epochs_label(self) -> str:
        if self.method == "heft":
            return f"{self.lora_epochs}+{self.reft_epochs}"
        return str(self.lora_epochs or self.reft_epochs)

    @property
    def total_epochs(self) -> int:
        return self.lora_epochs + self.reft_epochs


@dataclass
class Outcome:
    plan: Plan
    run_dir: str
    accuracy: float | None = None
    low: float | None = None
    high: float | None = None
    n: int = 0
    trainable_params: int = 0
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (cumulative epoch, accuracy)
    correct: dict[str, bool] = field(default_factory=dict)  # uid -> answered correctly
    yes_rate: float | None = None  # share of evaluation questions answered "yes" (compare with the gold share)
    db_run_id: int | None = None
    error: str | None = None
    resumed: bool = False  # read back from an earlier invocation (--resume), not trained by this one


# --------------------------------------------------------------------------- planning


def parse_splits(text: str) -> list[tuple[int, int]]:
    splits = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            first, second = (int(x) for x in part.split("+"))
        except ValueError:
            raise SystemExit(f"--heft-splits: {part!r} is not E1+E2, e.g. '1+2'")
        if first < 1 or second < 1:
            raise SystemExit(f"--heft-splits: {part!r}: both stages need at least one epoch")
        splits.append((first, second))
    return splits


def plan_runs(seeds: Sequence[int], epochs: int, splits: Sequence[tuple[int, int]], long_epochs: int | None, long_seeds: int | None = None) -> list[Plan]:
    """Every run, seed by seed; the long baselines only for the first ``long_seeds`` seeds (all if None)."""
    plans = []
    for index, seed in enumerate(seeds):
        plans.append(Plan(f"base-s{seed}", "base", seed=seed, group="base"))
        plans.append(Plan(f"lora-{epochs}ep-s{seed}", "lora", lora_epochs=epochs, seed=seed, group=f"lora {epochs}"))
        plans.append(Plan(f"reft-{epochs}ep-s{seed}", "reft", reft_epochs=epochs, seed=seed, group=f"reft {epochs}"))
        for first, second in splits:
            plans.append(Plan(f"heft-{first}+{second}-s{seed}", "heft", lora_epochs=first, reft_epochs=second, seed=seed, group=f"heft {first}+{second}"))
        if long_epochs and (long_seeds is None or index < long_seeds):
            plans.append(Plan(f"lora-{long_epochs}ep-s{seed}", "lora", lora_epochs=long_epochs, seed=seed, group=f"lora {long_epochs}"))
            plans.append(Plan(f"reft-{long_epochs}ep-s{seed}", "reft", reft_epochs=long_epochs, seed=seed, group=f"reft {long_epochs}"))
    return plans


def make_config(plan: Plan, args: argparse.Namespace, train_size: int, eval_size: int) -> Any:
    from heft_core.config import LoraSettings, ReftSettings, RunConfig, StageSettings

    return RunConfig(
        method=plan.method, model=args.model, data=args.data, seed=plan.seed, precision=args.precision,
        train_size=train_size, eval_size=eval_size, max_length=args.max_length, eval_batch_size=args.eval_batch_size,
        lora=LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank, dropout=args.lora_dropout, target_modules=args.lora_targets),
        reft=ReftSettings(rank=args.reft_rank, layers=args.reft_layers, positions=args.reft_positions, dropout=args.reft_dropout),
        lora_stage=StageSettings(epochs=max(plan.lora_epochs, 1), learning_rate=args.lora_lr, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio),
        reft_stage=StageSettings(epochs=max(plan.reft_epochs, 1), learning_rate=args.reft_lr, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio),
        eval_every_epoch=True, name=f"{args.name_prefix}{plan.name}",
    )


# --------------------------------------------------------------------------- database


class DbRecorder(DatabaseCallback):
    """Records a run this process trains itself in the app's database, so it shows in the UI.

    The row is created ``running`` by ``storage.queries.start_external_run`` (no worker can
    claim it); metrics, evaluations, progress and cancel go through the app's own
    ``DatabaseCallback``; a thread keeps the heartbeat fresh so the UI does not mark the run
    interrupted during long evaluations.
    """

    def __init__(self, engine: Any, *, name: str, method: str, config: dict[str, Any], base_model: str, data_source: str, eval_signature: str, batch_id: str, total_epochs: float, run_dir: Path):
        from storage import queries

        run = queries.start_external_run(
            engine, name=name, method=method, config=config, base_model=base_model, data_source=data_source,
            worker_pid=os.getpid(), eval_signature=eval_signature, batch_id=batch_id, total_epochs=total_epochs,
        )
        super().__init__(engine, run.id)
        queries.set_artifact_dir(engine, self.run_id, run_dir)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.run_id}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        from storage import queries

        while not self._stop.wait(10.0):
            try:
                queries.heartbeat(self.engine, self.run_id)
            except Exception as exc:  # never kill training over a heartbeat
                logger.warning("heartbeat of run %d failed: %r", self.run_id, exc)

    def finish(self, result: Any | None, error: str | None, eval_signature: str) -> None:
        from storage import queries

        self._stop.set()
        self._beat.join(timeout=15)
        try:
            self.flush()
        except Exception as exc:
            logger.warning("could not flush metrics of run %d: %r", self.run_id, exc)
        if result is None:
            queries.finish_run(self.engine, self.run_id, "failed", error=error or "failed")
            return
        status = "completed" if result.status == "completed" else "cancelled"
        queries.finish_run(self.engine, self.run_id, status, results=run_results(result.summary(), result.run_dir, eval_signature))


# --------------------------------------------------------------------------- running


def run_one(plan: Plan, args: argparse.Namespace, data: Any, run_dir: Path, engine: Any, batch_id: str, eval_signature: str) -> Outcome:
    from heft_core.train import train

    config = make_config(plan, args, len(data.train), len(data.validation))
    if args.resume:
        earlier = finished_outcome(plan, config, run_dir, engine)
        if earlier is not None:
            logger.info("%s: finished by an earlier invocation in %s (accuracy %.4f); not trained again", plan.name, run_dir, earlier.accuracy)
            return earlier
    outcome = Outcome(plan, str(run_dir))
    recorder = None
    if engine is not None:
        recorder = DbRecorder(engine, name=config.name, method=plan.method, config=config.to_dict(), base_model=args.model,
                              data_source=data.source, eval_signature=eval_signature, batch_id=batch_id, total_epochs=plan.total_epochs, run_dir=run_dir)
        outcome.db_run_id = recorder.run_id
    started = time.perf_counter()
    try:
        result = train(config, run_dir, callbacks=[recorder] if recorder else None, data=data)
    except Exception as exc:
        logger.exception("run %s failed", plan.name)
        outcome.error = f"{type(exc).__name__}: {exc}"
        if recorder:
            recorder.finish(None, outcome.error, eval_signature)
        return outcome
    if recorder:
        recorder.finish(result, None, eval_signature)
    if result.status != "completed":
        outcome.error = result.status
    acc = result.accuracy
    if acc is not None:
        outcome.accuracy, outcome.low, outcome.high, outcome.n = acc.accuracy, acc.low, acc.high, acc.n
    outcome.trainable_params = sum(result.trainable_params.values())
    outcome.train_seconds = result.train_seconds
    outcome.tokens_per_second = result.tokens_per_second
    outcome.curve = [(e.cumulative_epoch, e.accuracy) for e in result.evals]
    outcome.correct = {p.uid: p.correct for p in result.predictions}
    if result.predictions:
        outcome.yes_rate = sum(p.predicted for p in result.predictions) / len(result.predictions)
    logger.info("%s: accuracy %s (%.0f s wall)", plan.name, acc, time.perf_counter() - started)
    return outcome


# Settings that change how fast a run trains, not what it learns: --resume ignores them.
SPEED_ONLY_SETTINGS = ("prefix_cache_mb",)


def finished_outcome(plan: Plan, config: Any, run_dir: Path, engine: Any) -> Outcome | None:
    """The outcome of this plan from an earlier invocation (``--resume``): a completed run in
    ``run_dir`` trained with the same settings that the method uses, apart from ``SPEED_ONLY_SETTINGS``."""
    from heft_core.artifacts import RunLoadError, load_run

    try:
        run = load_run(run_dir)
    except RunLoadError:
        return None

    def learning_settings(run_config: Any) -> dict[str, Any]:
        return {k: v for k, v in run_config.effective_dict().items() if k not in SPEED_ONLY_SETTINGS}

    result = run.meta.get("result", {})
    if result.get("status") != "completed" or learning_settings(run.config) != learning_settings(config):
        logger.info("%s: %s holds a run with other settings or unfinished; training again", plan.name, run_dir)
        return None
    low, high = result["accuracy_ci"]
    outcome = Outcome(
        plan, str(run_dir), accuracy=result["accuracy"], low=low, high=high, n=result["eval_n"],
        trainable_params=result["trainable_params"], train_seconds=result["train_seconds"], tokens_per_second=result["tokens_per_second"],
        resumed=True,
    )
    outcome.curve = [(e["cumulative_epoch"], e["accuracy"]) for e in json.loads((Path(run_dir) / "evals.json").read_text())]
    predictions = run.predictions()
    outcome.correct = {p["uid"]: p["correct"] for p in predictions}
    outcome.yes_rate = sum(p["predicted"] for p in predictions) / len(predictions) if predictions else None
    if engine is not None:
        from storage import queries

        recorded = queries.run_with_artifact_dir(engine, run_dir)
        outcome.db_run_id = recorded.id if recorded is not None else None
    return outcome


def fixed_subsets(args: argparse.Namespace) -> Any:
    """The one train subset and one evaluation subset every run uses."""
    from heft_core.data import DatasetSplits, load_data, subset

    data = load_data(args.data)
    train = subset(data.train, args.train_size, args.subset_seed)
    validation = subset(data.validation, args.eval_size, args.subset_seed)
    return DatasetSplits(train, validation, data.source, data.label, data.is_synthetic)


# --------------------------------------------------------------------------- report


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}"


def results_table(outcomes: Sequence[Outcome]) -> list[str]:
    lines = ["| run | method | epochs | seed | accuracy % [95% CI] | answers yes % | trainable params | train s | tokens/s | DB run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        acc = f"{pct(o.accuracy)} [{pct(o.low)}, {pct(o.high)}] (n={o.n})" if o.accuracy is not None else f"failed: {o.error}"
        lines.append(f"| {o.plan.name} | {o.plan.method} | {o.plan.epochs_label} | {o.plan.seed} | {acc} | {pct(o.yes_rate)} | {o.trainable_params:,} | {o.train_seconds:.1f} | {o.tokens_per_second:,.0f} | {o.db_run_id or '—'} |")
    return lines


def group_table(outcomes: Sequence[Outcome]) -> list[str]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.accuracy is not None:
            groups.setdefault(o.plan.group, []).append(o)
    lines = ["| configuration | seeds | mean accuracy % | sd | min–max |", "|---|---|---|---|---|"]
    for name, items in groups.items():
        values = [o.accuracy for o in items]
        sd = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
        lines.append(f"| {name} | {len(values)} | {statistics.mean(values) * 100:.1f} | {sd:.1f} | {min(values) * 100:.1f}–{max(values) * 100:.1f} |")
    return lines


def mcnemar_table(outcomes: Sequence[Outcome]) -> list[str]:
    from heft_core.stats import paired_comparison

    lines = ["| seed | A | B | acc A % | acc B % | A-only right | B-only right | McNemar exact p |", "|---|---|---|---|---|---|---|---|"]
    by_seed: dict[int, list[Outcome]] = {}
    for o in outcomes:
        if o.correct:
            by_seed.setdefault(o.plan.seed, []).append(o)
    for seed, items in by_seed.items():
        for a, b in itertools.combinations(items, 2):
            try:
                cmp = paired_comparison(a.correct, b.correct)
            except ValueError as exc:
                lines.append(f"| {seed} | {a.plan.name} | {b.plan.name} | | | | | {exc} |")
                continue
            p = f"{cmp.p_value:.3g}" + (" *" if cmp.p_value < 0.05 else "")
            lines.append(f"| {seed} | {a.plan.group} | {b.plan.group} | {cmp.accuracy_a * 100:.1f} | {cmp.accuracy_b * 100:.1f} | {cmp.a_only} | {cmp.b_only} | {p} |")
    return lines


def always_yes_table(outcomes: Sequence[Outcome], gold_yes: dict[str, bool]) -> list[str]:
    """Each trained run against answering 'yes' to every question (the majority answer), paired."""
    from heft_core.stats import paired_comparison

    lines = ["| run | acc % | always 'yes' % | run-only right | 'yes'-only right | McNemar exact p |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        if not o.correct or o.plan.method == "base":
            continue
        cmp = paired_comparison(o.correct, {uid: gold_yes[uid] for uid in o.correct})
        p = f"{cmp.p_value:.3g}" + (" *" if cmp.p_value < 0.05 else "")
        lines.append(f"| {o.plan.name} | {cmp.accuracy_a * 100:.1f} | {cmp.accuracy_b * 100:.1f} | {cmp.a_only} | {cmp.b_only} | {p} |")
    return lines


def plot(outcomes: Sequence[Outcome], path: Path, title: str, always_yes: float | None = None) -> None:
    """Accuracy vs cumulative epochs per configuration; ``always_yes`` draws the constant-'yes' baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.curve:
            groups.setdefault(o.plan.group, []).append(o)
    base_items = groups.get("base", [])
    base = statistics.mean(o.curve[0][1] for o in base_items) if base_items else None
    fig, ax = plt.subplots(figsize=(8, 5))
    if always_yes is not None:  # the majority answer: a trained model must beat this, not only the base
        ax.axhline(always_yes * 100, color="grey", linestyle=":", label=f"always 'yes' {always_yes * 100:.1f}%")
    for name, items in groups.items():
        by_epoch: dict[int, list[float]] = {}
        for o in items:
            for epoch, acc in o.curve:
                by_epoch.setdefault(epoch, []).append(acc)
        if base is not None and name != "base":
            by_epoch.setdefault(0, [base])  # every method starts from the zero-shot model
        epochs = sorted(by_epoch)
        means = [statistics.mean(by_epoch[e]) * 100 for e in epochs]
        if name == "base":
            ax.axhline(means[0], color="grey", linestyle="--", label=f"base (zero-shot) {means[0]:.1f}%")
            continue
        style = "-o" if name.startswith("heft") else ("-s" if name.startswith("lora") else "-^")
        ax.plot(epochs, means, style, markersize=4, label=f"{name} ({len(items)} seed{'s' if len(items) > 1 else ''})")
        if name.startswith("heft"):
            switch = int(name.split()[1].split("+")[0])
            if switch in by_epoch:
                ax.plot([switch], [statistics.mean(by_epoch[switch]) * 100], "kx", markersize=8)
    ax.set_xlabel("cumulative epochs (LoRA + ReFT; × marks the HEFT stage switch)")
    ax.set_ylabel("accuracy on the fixed evaluation subset (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def size_arg(text: str) -> int | None:
    return None if str(text).lower() in ("all", "0", "none") else int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', a local model directory or a hub id")
    parser.add_argument(
        "--data", default=None,
        help="data source (default: the local BoolQ directory, $HEFT_BOOLQ_DIR or ../shared/data/boolq, if present, "
        "else 'synthetic'); 'hub' for google/boolq",
    )
    parser.add_argument("--train-size", type=size_arg, default=48, help="training rows ('all' for every row)")
    parser.add_argument("--eval-size", type=size_arg, default=96, help="evaluation rows ('all' for every row)")
    parser.add_argument("--subset-seed", type=int, default=None, help="seed of the fixed train/eval subsets (default: the first seed)")
    parser.add_argument("--epochs", type=int, default=3, help="E: epochs of the LoRA-only and ReFT-only runs, and the HEFT budget")
    parser.add_argument("--heft-splits", default=None, help="HEFT splits E1+E2, comma-separated (default: every split of E, e.g. '1+2,2+1' for E=3)")
    parser.add_argument("--long-factor", type=float, default=round(PAPER_LONG_FACTOR), help="long baselines train round(E * factor) epochs (paper: 20/3)")
    parser.add_argument("--no-long", action="store_true", help="skip the long LoRA/ReFT baselines")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds")
    parser.add_argument("--long-seeds", type=int, default=None, help="run the long baselines for the first N seeds only (default: all)")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--reft-lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names or 'all-linear'")
    parser.add_argument("--reft-rank", type=int, default=4)
    parser.add_argument("--reft-layers", default="all", help="'all' or e.g. '8,16,24'")
    parser.add_argument("--reft-positions", default="f7+l7")
    parser.add_argument("--reft-dropout", type=float, default=0.05)
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--out", default=None, help="output directory (default: bench/results/reproduce-<date>-<cpu|gpu>)")
    parser.add_argument("--no-db", action="store_true", help="do not record runs in the HEFT Studio database")
    parser.add_argument("--resume", action="store_true", help="reuse runs an earlier invocation finished in --out with the same settings (an interrupted reproduction goes on where it stopped)")
    parser.add_argument("--db", default=None, help="database file (default: the app's, under HEFT_HOME)")
    parser.add_argument("--name-prefix", default="repro: ", help="prefix of run names in the database")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.data is None:
        boolq = local_boolq_dir()
        args.data = str(boolq) if boolq else "synthetic"
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        parser.error("--seeds: give at least one seed")
    if args.subset_seed is None:
        args.subset_seed = args.seed_list[0]
    if args.heft_splits is None:
        args.heft_splits = ",".join(f"{i}+{args.epochs - i}" for i in range(1, args.epochs)) or "1+1"
    args.split_list = parse_splits(args.heft_splits)
    args.long_epochs = None if args.no_long else max(args.epochs + 1, round(args.epochs * args.long_factor))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from heft_core.data import eval_signature

    device_kind = "gpu" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"reproduce-{dt.date.today().isoformat()}-{device_kind}"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    data = fixed_subsets(args)
    signature = eval_signature(data.validation)
    engine = None
    if not args.no_db:
        from storage.db import open_db

        engine = open_db(args.db)
    batch_id = f"reproduce-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    plans = plan_runs(args.seed_list, args.epochs, args.split_list, args.long_epochs, args.long_seeds)
    logger.info("%d runs: %s", len(plans), ", ".join(p.name for p in plans))
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    for index, plan in enumerate(plans, 1):
        logger.info("=== run %d/%d: %s ===", index, len(plans), plan.name)
        outcomes.append(run_one(plan, args, data, out / "runs" / plan.name, engine, batch_id, signature))
    wall = time.perf_counter() - started

    resumed = sum(o.resumed for o in outcomes)
    title = f"{args.model} on {data.label}: {len(data.train)} train / {len(data.validation)} eval"
    chart = out / "accuracy_vs_epochs.png"
    try:
        plot(outcomes, chart, title, always_yes=sum(e.answer for e in data.validation) / max(1, len(data.validation)))
    except Exception as exc:  # a chart problem must not lose the results
        logger.warning("chart failed: %r", exc)
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.reproduce", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"# HEFT reproduction — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} ({device_kind})", "",
        f"Command: `{command}`", "",
        "## Settings", "",
        f"- model: {args.model}; data: {data.label} ({data.source}); torch {torch.__version__}, {torch.get_num_threads()} threads" + (f", GPU {torch.cuda.get_device_name(0)}" if device_kind == "gpu" else ""),
        f"- fixed subsets (seed {args.subset_seed}): {len(data.train)} train rows, {len(data.validation)} evaluation rows (eval signature {signature}); seeds {args.seeds}; 'yes' is the gold answer of {pct(sum(e.answer for e in data.validation) / max(1, len(data.validation)))}% of the evaluation rows (a model that always answers 'yes' scores that)",
        f"- epochs E={args.epochs}; HEFT splits {args.heft_splits}; long baselines: " + (f"{args.long_epochs} epochs (E × {args.long_factor:g}, rounded)" + (f", first {args.long_seeds} seed(s) only" if args.long_seeds is not None else "") if args.long_epochs else "skipped (--no-long)"),
        f"- LoRA rank {args.lora_rank}, alpha {args.lora_alpha or 2 * args.lora_rank:g}, targets {args.lora_targets}, lr {args.lora_lr:g}; ReFT rank {args.reft_rank}, layers {args.reft_layers}, positions {args.reft_positions}, lr {args.reft_lr:g}",
        f"- batch {args.batch_size} × grad-accum {args.grad_accum}, warmup ratio {args.warmup_ratio}, linear schedule, max length {args.max_length}, precision {args.precision}",
        f"- total wall time: {wall / 60:.1f} min" + (f" (this invocation; {resumed} of {len(outcomes)} runs read back from earlier ones with --resume)" if resumed else "")
        + f"; database: {'not used' if engine is None else f'batch {batch_id}'}"
        + ("; read-back runs keep their earlier rows (DB run column)" if resumed and engine is not None else ""),
        "",
        "## Results", "", *results_table(outcomes), "",
    ]
    if len(args.seed_list) > 1:
        lines += ["### Across seeds", "", *group_table(outcomes), ""]
    lines += [
        "### Pairwise McNemar tests (same evaluation questions; * p < 0.05)", "", *mcnemar_table(outcomes), "",
        "### Against answering 'yes' to every question (the majority answer; same questions, * p < 0.05)", "",
        *always_yes_table(outcomes, {e.uid: bool(e.answer) for e in data.validation}), "",
        f"![accuracy vs cumulative epochs]({chart.name})", "",
        "Per-question predictions: `runs/<run>/predictions.jsonl`; step metrics: `runs/<run>/metrics.jsonl`.",
        "Accuracy intervals are 95% Wilson intervals; McNemar p-values are exact (binomial) and uncorrected for multiple comparisons.",
    ]
    report = "\n".join(lines) + "\n"
    (out / "results.md").write_text(report)
    summary = {
        "command": command, "settings": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
        "eval_signature": signature, "wall_seconds": wall,
        "runs": [{
            "name": o.plan.name, "method": o.plan.method, "group": o.plan.group, "seed": o.plan.seed, "lora_epochs": o.plan.lora_epochs,
            "reft_epochs": o.plan.reft_epochs, "accuracy": o.accuracy, "ci": [o.low, o.high], "n": o.n, "trainable_params": o.trainable_params,
            "train_seconds": o.train_seconds, "tokens_per_second": o.tokens_per_second, "curve": o.curve, "run_dir": o.run_dir,
            "db_run_id": o.db_run_id, "error": o.error, "resumed": o.resumed,
        } for o in outcomes],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(report)
    logger.info("results in %s", out)
    return summary


if __name__ == "__main__":
    main()
