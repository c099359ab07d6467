"""Seconds per epoch with the frozen-layer cache on and off, side by side in one process.

    python -m bench.frozen_layers --data ../shared/data/boolq --rows 24 --out bench/results/x.md

The CPU preset's LoRA shape (embedded SmolLM2-135M, rank 8, all-linear on layers 10-29, no dropout,
batch 8, fp32): layers 0-9 are frozen, so with ``frozen_cache_mb`` on, epoch 2 and the per-epoch
evaluations start at layer 10 from the states kept in epoch 1. The off side (``frozen_cache_mb=0``)
recomputes layers 0-9 (without autograd) in every step, as the full forward does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch


def _epoch_seconds(result) -> list[float]:
    ends: dict[int, float] = {}
    for step in result.steps:
        ends[int(round(step.epoch + 0.4999))] = step.elapsed_seconds
    ordered = [ends[e] for e in sorted(ends)]
    return [b - a for a, b in zip([0.0] + ordered, ordered)]


class _EvalClock:
    def __init__(self):
        from heft_core.callbacks import TrainerCallback

        outer = self

        class Clock(TrainerCallback):
            def on_phase(self, name: str, done: int, total: int) -> None:
                now = time.perf_counter()
                if name.startswith("evaluating") and done == 0:
                    outer.started = now
                elif name.startswith("evaluating") and done == total and outer.started is not None:
                    outer.evals.append(now - outer.started)
                    outer.started = None

            def on_log(self, message: str) -> None:
                if message.startswith("frozen layers"):
                    outer.log = message

        self.started: float | None = None
        self.evals: list[float] = []
        self.log = ""
        self.callback = Clock()



def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv  # the report names the exact command
    from bench.precision import cpu_description, load_warning
    from heft_common.vocabulary import EMBEDDED_MODEL
    from heft_core.config import LoraSettings, RunConfig, StageSettings
    from heft_core.train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/boolq")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows: dict[str, tuple[list[float], list[float], float, str]] = {}
    for label, budget in (("cache on (auto)", "auto"), ("cache off (0)", 0)):
        config = RunConfig(
            method="lora", model=EMBEDDED_MODEL, data=args.data, train_size=args.rows, eval_size=args.eval_rows,
            lora=LoraSettings(rank=8, alpha=16.0, dropout=0.0, target_modules=["all-linear"], layers=list(range(10, 30))),
            lora_stage=StageSettings(epochs=2, learning_rate=1e-3, batch_size=8, warmup_ratio=0.06),
            max_length=256, precision="no", frozen_cache_mb=budget, checkpoint_minutes=0, seed=42,
        )
        clock = _EvalClock()
        with TemporaryDirectory() as out:
            start = time.perf_counter()
            result = train(config, Path(out), callbacks=[clock.callback])
            wall = time.perf_counter() - start
        rows[label] = (_epoch_seconds(result), clock.evals, wall, clock.log)
    load_after = os.getloadavg()
    cpu, flags = cpu_description()
    lines = [
        "# Frozen lower layers computed once: seconds per epoch, cache on vs off (bench/frozen_layers.py)", "",
        f"- command: `python -m bench.frozen_layers {' '.join(argv or [])}`",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"- CPU flags: {flags}",
        f"- load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}{load_warning(load_before, load_after)}",
        f"- workload: embedded SmolLM2-135M, LoRA rank 8 all-linear on layers 10-29 (0-9 frozen), {args.rows} BoolQ "
        f"train rows, {args.eval_rows} validation rows, batch 8, max_length 256, fp32, 2 epochs, evaluation after "
        "each; the two runs one after the other in one process",
        "", "| side | epoch 1 train s | epoch 2 train s | eval 1 s | eval 2 s | wall s | log line |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, (epochs, evals, wall, log) in rows.items():
        cells = [f"{s:.1f}" for s in (epochs + [float("nan")] * 2)[:2]] + [f"{s:.1f}" for s in (evals + [float("nan")] * 2)[:2]]
        lines.append(f"| {label} | {' | '.join(cells)} | {wall:.1f} | {log} |")
    on, off = rows["cache on (auto)"], rows["cache off (0)"]
    if len(on[0]) == 2 and len(off[0]) == 2:
        lines += ["", f"Epoch 2 training: off/on = {off[0][1] / on[0][1]:.2f}x; "
                      f"epoch-2 evaluation: off/on = {off[1][-1] / on[1][-1]:.2f}x; wall: off/on = {off[2] / on[2]:.2f}x."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
