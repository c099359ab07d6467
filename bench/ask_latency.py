"""Ask latency: the base model and three runs (LoRA, ReFT, HEFT) answering one question, two ways.

Both sides serve the same question from one loaded ``heft_core.inference.SideBySide`` (model
and runs loaded before anything is timed):

- ``per-variant`` (the path before shared prompt states): every variant runs its own pass
  over the whole prompt (``SideBySide.answers(..., share_prefix=False)``);
- ``shared``: variants on the same host share its prompt states. With ReFT positions ``lN``
  the base model and the ReFT-only run share the frozen base's states up to the first
  intervened token, and the LoRA run and a HEFT run whose stage 1 is that LoRA adapter (a
  comparison batch: same seed, same data, same LoRA settings) share the LoRA model's, so two
  prompt passes serve four answers; a HEFT run with its own stage-1 adapter needs a third.

The sides alternate (A, B, B, A, ...) after an untimed warmup; the report gives the median of
the per-round ratios (shared / per-variant) of wall-clock seconds and of this process's CPU
seconds (``time.process_time``: all torch threads; on a machine other jobs share, CPU time moves
much less than wall time), both sides' medians, the prompt passes each side ran, and the largest
P(yes) difference between the sides (same answers within float tolerance).

    python -m bench.ask_latency                       # embedded SmolLM2, a 150-token passage
    python -m bench.ask_latency --distinct-heft       # also: HEFT with its own stage-1 LoRA
    python -m bench.ask_latency --model /path/to/tiny-llama --data synthetic --quick   # smoke

The runs are trained here first (a few steps each, 8 questions; their weights do not matter
for speed) into ``--runs-dir`` (a temporary directory unless given; an existing run there is reused).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("bench.ask_latency")

PASSAGE_SEED_TEXT = (
    "The old harbour town sits where the river widens into a shallow bay. Fishing boats leave before dawn and "
    "return in the afternoon, when the market by the stone quay fills with buyers from the inland villages. In "
    "winter the bay sometimes freezes at its edges, and the ferry to the island across the water runs only on "
    "calm days. A lighthouse built two centuries ago still stands on the northern cliff, although its lamp was "
    "replaced by an automatic beacon long ago and the keeper's cottage is now a small museum about the town's "
    "shipwrecks, its lifeboat crews and the families who kept the light burning through storms. "
)
QUESTION = "does the ferry to the island run every day in winter"


def make_passage(tokenizer: Any, tokens: int) -> str:
    """An original passage of exactly ``tokens`` tokens (for this tokenizer), cut at a token boundary."""
    text = PASSAGE_SEED_TEXT
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += PASSAGE_SEED_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def run_config(method: str, args: argparse.Namespace, layers: str, lora_lr: float) -> Any:
    from heft_core.config import RunConfig

    return RunConfig.from_dict({
        "method": method, "model": args.model, "data": args.data, "train_size": 8, "eval_size": 4,
        "max_length": args.passage_tokens + 64, "seed": args.seed, "precision": "no",
        "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
        "reft": {"rank": 4, "layers": layers, "positions": args.positions},
        "lora_stage": {"epochs": 1, "learning_rate": lora_lr, "batch_size": 4},
        "reft_stage": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4},
    })


def trained_run(name: str, config: Any, runs_dir: Path) -> Path:
    """A run directory for ``config`` under ``runs_dir``, trained now unless it is there already."""
    from heft_core.artifacts import RUN_FILE
    from heft_core.train import train

    out = runs_dir / name
    if (out / RUN_FILE).exists():
        logger.info("reusing %s", out)
        return out
    logger.info("training %s (%s)", name, config.method)
    train(config, out)
    return out


def default_layers(model: str) -> str:
    from heft_core.models import model_info

    depth = model_info(model).num_layers
    return ",".join(str(layer) for layer in sorted({depth // 4, depth // 2, 3 * depth // 4}))


def time_side(side_by_side: Any, passage: str, question: str, names: Sequence[str],
              share: bool) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, CPU seconds, {name: P(yes)}) of answering once with every variant."""
    start, cpu_start = time.perf_counter(), time.process_time()
    answers = {name: answer.p_yes for name, answer in side_by_side.answers(passage, question, names, share_prefix=share)}
    return time.perf_counter() - start, time.process_time() - cpu_start, answers


def measure(side_by_side: Any, passage: str, question: str, names: Sequence[str], repeats: int, warmup: int) -> dict[str, Any]:
    """Alternate the two sides; medians, per-round ratios, prompt passes and the largest P(yes) difference."""
    for _ in range(warmup):
        time_side(side_by_side, passage, question, names, True)
        time_side(side_by_side, passage, question, names, False)
    shared_times, per_variant_times, ratios, worst = [], [], [], 0.0
    shared_cpu, per_variant_cpu, cpu_ratios = [], [], []
    for round_index in range(repeats):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        seconds: dict[bool, float] = {}
        cpu: dict[bool, float] = {}
        answers: dict[bool, dict[str, float]] = {}
        for share in order:
            seconds[share], cpu[share], answers[share] = time_side(side_by_side, passage, question, names, share)
        shared_times.append(seconds[True])
        per_variant_times.append(seconds[False])
        ratios.append(seconds[True] / seconds[False])
        shared_cpu.append(cpu[True])
        per_variant_cpu.append(cpu[False])
        cpu_ratios.append(cpu[True] / cpu[False])
        logger.info("round %d/%d: shared %.3f s (CPU %.3f s), per-variant %.3f s (CPU %.3f s): ratio %.2f (CPU %.2f)",
                    round_index + 1, repeats, seconds[True], cpu[True], seconds[False], cpu[False], ratios[-1],
                    cpu_ratios[-1])
        worst = max(worst, max(abs(answers[True][n] - answers[False][n]) for n in names))
    groups = side_by_side.sharing_groups(passage, question, names)
    return {
        "variants": list(names), "repeats": repeats,
        "shared_seconds_median": statistics.median(shared_times),
        "per_variant_seconds_median": statistics.median(per_variant_times),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "shared_cpu_seconds_median": statistics.median(shared_cpu),
        "per_variant_cpu_seconds_median": statistics.median(per_variant_cpu),
        "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios),
        "prompt_passes_shared": len(groups), "prompt_passes_per_variant": len(names),
        "sharing": [list(group) for group in groups],
        "max_p_yes_difference": worst,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', a local model directory or a hub id")
    parser.add_argument("--data", default="synthetic", help="data the runs are trained on (a few steps)")
    parser.add_argument("--passage-tokens", type=int, default=150)
    parser.add_argument("--positions", default="l1", help="ReFT positions of the ReFT and HEFT runs (lN shares)")
    parser.add_argument("--layers", default=None, help="ReFT layers (default: a quarter, half and three quarters deep)")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds (each side once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--distinct-heft", action="store_true",
                        help="also measure a HEFT run whose stage-1 LoRA differs from the LoRA run (3 prompt passes)")
    parser.add_argument("--runs-dir", default=None, help="where the runs are trained (reused when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warmup: a smoke run")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from heft_core.inference import BASE, SideBySide

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    layers = args.layers or default_layers(args.model)
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="heft-ask-bench-"))
    runs = {
        "lora": trained_run("lora", run_config("lora", args, layers, 1e-3), runs_dir),
        "reft": trained_run("reft", run_config("reft", args, layers, 1e-3), runs_dir),
        "heft": trained_run("heft", run_config("heft", args, layers, 1e-3), runs_dir),
    }
    if args.distinct_heft:  # another stage-1 learning rate: its own LoRA adapter
        runs["heft_own_lora"] = trained_run("heft-own-lora", run_config("heft", args, layers, 5e-4), runs_dir)
    load_start = time.perf_counter()
    side_by_side = SideBySide(args.model, precision="no", device="cpu")
    for name, path in runs.items():
        side_by_side.add_run(name, path)
    load_seconds = time.perf_counter() - load_start
    logger.info("model and %d runs loaded in %.1f s", len(runs), load_seconds)
    passage = make_passage(side_by_side.tokenizer, args.passage_tokens)
    prompt_tokens = len(side_by_side.variants[BASE].encoder.encode(passage, QUESTION))
    report: dict[str, Any] = {
        "model": args.model, "passage_tokens": args.passage_tokens, "prompt_tokens": prompt_tokens,
        "positions": args.positions, "layers": layers, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average_before": os.getloadavg()[0], "model_and_runs_load_seconds": round(load_seconds, 2),
        "cases": {},
    }
    report["cases"]["batch (HEFT stage 1 = the LoRA run)"] = measure(
        side_by_side, passage, QUESTION, [BASE, "lora", "reft", "heft"], args.repeats, args.warmup)
    if args.distinct_heft:
        report["cases"]["HEFT with its own stage-1 LoRA"] = measure(
            side_by_side, passage, QUESTION, [BASE, "lora", "reft", "heft_own_lora"], args.repeats, args.warmup)
    report["load_average_after"] = os.getloadavg()[0]
    for case, result in report["cases"].items():
        print(f"{case}: shared {result['shared_seconds_median']:.3f} s vs per-variant "
              f"{result['per_variant_seconds_median']:.3f} s -> ratio {result['ratio_median']:.2f} "
              f"({result['ratio_min']:.2f}-{result['ratio_max']:.2f}); CPU {result['shared_cpu_seconds_median']:.3f} s "
              f"vs {result['per_variant_cpu_seconds_median']:.3f} s -> ratio {result['cpu_ratio_median']:.2f} "
              f"({result['cpu_ratio_min']:.2f}-{result['cpu_ratio_max']:.2f}); prompt passes "
              f"{result['prompt_passes_shared']} vs {result['prompt_passes_per_variant']}; "
              f"max |dP(yes)| {result['max_p_yes_difference']:.2e}")
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
