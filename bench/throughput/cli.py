"""The command line: parse the flags, run the groups, write the report."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bench import throughput as _package
from bench.throughput.alternation import alternate, close_all, copy_from_first, paired_ratios
from bench.throughput.build import BenchOptions, build_side
from bench.throughput.common import MAX_GRAD_NORM, ROOT, logger
from bench.throughput.evaluation import eval_pair, reft_eval_group
from bench.throughput.flops import side_flops
from bench.throughput.memory import measure_memory
from bench.throughput.peaks import (
    MatmulPeaks,
    cpu_has_bf16_units,
    load_average,
    machine_description,
    peak_names,
    peak_summary,
    refresh_peaks,
    synchronize,
)
from bench.throughput.report import eval_table, fmt_range, median, training_table
from bench.throughput.workload import Workload, build_workload
from heft_core.data import local_boolq_dir

throughput_doc = _package.__doc__ or ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=throughput_doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', a local model directory or a hub id")
    parser.add_argument(
        "--data", default=None,
        help="data source (default: the local BoolQ directory, $HEFT_BOOLQ_DIR or ../shared/data/boolq, if present, "
        "else 'synthetic')",
    )
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side per round (small = fine alternation, robust to other load)")
    parser.add_argument("--repeats", type=int, default=8, help="rounds of alternation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the first round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passage-tokens", type=int, default=200, help="passages are cut to this many tokens; question and answer cue stay whole")
    parser.add_argument("--max-length", type=int, default=None, help="hard cap on the whole prompt (default: passage tokens + question + template)")
    parser.add_argument("--eval-questions", type=int, default=64)
    parser.add_argument("--eval-repeats", type=int, default=3, help="rounds of the evaluation pair")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation length of the reference evaluator (pyreft's BoolQ setting: 32)")
    parser.add_argument("--memory-repeats", type=int, default=2, help="subprocess runs per side (A,B,A,B); 0 skips memory")
    parser.add_argument("--memory-steps", type=int, default=2, help="optimizer steps in each memory subprocess")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--reft-rank", type=int, default=4)
    parser.add_argument("--reft-lr", type=float, default=2e-3)
    parser.add_argument("--reft-configs", default="8,16,24:l1", help="';'-separated layers:positions pairs for the ReFT pair, e.g. '8,16,24:l1;all:f7+l7'")
    parser.add_argument("--pairs", default="lora,reft,eval", help="which pairs to run (lora includes the bf16 precision side)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast sides and their bf16 matmul peak")
    parser.add_argument("--profile", default=None, metavar="KIND", help="print torch.profiler's table for one training step of a side (e.g. lora-ours, lora-ref, reft-ours) and exit")
    parser.add_argument("--compile-probe", action="store_true", help="add a LoRA side whose decoder layers run under torch.compile (measures that idea; heft_core does not compile)")
    parser.add_argument("--heft2", action="store_true", help="add heft_core's HEFT stage 2 (ReFT on a frozen LoRA model) to the ReFT group")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--out", default=None, help="report path (default: bench/results/throughput-<date>-cpu.md)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = 1, 2, 1
        args.batch_size = min(args.batch_size, 2)
        args.passage_tokens = min(args.passage_tokens, 24)
        args.eval_questions = min(args.eval_questions, 4)
        args.memory_repeats = min(args.memory_repeats, 1)
        args.memory_steps = 1
        args.eval_repeats = min(args.eval_repeats, 2)
    if args.data is None:
        boolq = local_boolq_dir()
        args.data = str(boolq) if boolq else "synthetic"
    return args


def lora_kinds(args: argparse.Namespace, memory: bool = False) -> list[str]:
    kinds = ["lora-ours", "lora-ref"] + ([] if args.no_bf16 else ["lora-ours-bf16", "lora-ref-bf16"])
    return kinds + (["lora-ours-compiled"] if args.compile_probe and not memory else [])


def reft_kinds(heft2: bool) -> list[str]:
    return ["reft-ours", "reft-ref", "reft-ours-full", "reft-ours-cached"] + (["heft2-ours"] if heft2 else [])


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so later subprocesses have room."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_lora_group(args: argparse.Namespace, opts: BenchOptions, workload: Workload, config: Any, peaks: dict[str, float], peak_name: str = "fp32", memory: dict[str, list[dict[str, float]]] | None = None) -> list[str]:
    """LoRA: heft_core vs the Trainer recipe, plus (unless ``args.no_bf16``) heft_core under bf16 autocast."""
    kinds = lora_kinds(args)
    total = args.warmup + args.steps * args.repeats
    sides = []
    try:
        for kind in kinds:
            logger.info("building %s", kind)
            sides.append(build_side(kind, opts, workload, max_steps=total))
        copy_from_first(sides)
        flops = {kind: side_flops(kind, config, workload, opts) for kind in kinds}
        timings = alternate(sides, warmup=args.warmup, steps=args.steps, repeats=args.repeats, device=opts.torch_device, tokens=workload.real_tokens, flops=flops)
    finally:
        close_all(sides)
    release_memory()
    refresh_peaks(peaks, opts.torch_device, dict.fromkeys([peak_name] + ([] if args.no_bf16 else ["bf16"])), args.quick)
    precision = "bf16 autocast" if opts.bf16_autocast_ref else "fp32"
    descriptions = {
        "lora-ours": f"heft_core: answer-position logits, CE on the answer token, {precision}",
        "lora-ref": f"transformers Trainer + peft LoRA, causal-LM loss over full logits, {precision}",
        "lora-ours-bf16": "heft_core as lora-ours under torch.autocast(bfloat16) (fp32 weights: heft_core's bf16 on CPUs)",
        "lora-ref-bf16": "Trainer as lora-ref with TrainingArguments(bf16=True) (autocast over the fp32 model)",
        "lora-ours-compiled": f"lora-ours with every decoder layer's forward under torch.compile(dynamic=True), {precision}",
    }
    lines = training_table(f"LoRA (rank {opts.lora_rank}, all-linear) — heft_core vs transformers Trainer", {k: timings[k] for k in kinds[:2]}, "lora-ref", memory, peaks, {k: peak_name for k in kinds[:2]}, descriptions)
    if not args.no_bf16:
        lines += training_table("LoRA in bf16 — heft_core vs transformers Trainer, both under bf16 autocast", {k: timings[k] for k in ("lora-ours-bf16", "lora-ref-bf16")}, "lora-ref-bf16", memory, peaks, {"lora-ours-bf16": "bf16", "lora-ref-bf16": "bf16"}, descriptions)
        lines += training_table("Precision — heft_core LoRA bf16 vs fp32 (what the precision setting changes)", {k: timings[k] for k in ("lora-ours-bf16", "lora-ours")}, "lora-ours", memory, peaks, {"lora-ours-bf16": "bf16"}, descriptions)
    if args.compile_probe:
        pair = {k: timings[k] for k in ("lora-ours-compiled", "lora-ours", "lora-ref")}
        lines += training_table("Probe — torch.compile of the decoder layers (not heft_core's path)", pair, "lora-ours", None, peaks, {k: peak_name for k in pair}, descriptions)
        compiled = timings["lora-ours-compiled"]
        lines += [
            f"Untimed warmup ({args.warmup} step(s) per side), compiling included: lora-ours-compiled {compiled.warmup_seconds:.1f} s, "
            f"lora-ours {timings['lora-ours'].warmup_seconds:.1f} s (inductor's cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}). "
            f"Compiled vs the Trainer recipe: {fmt_range(paired_ratios(compiled, timings['lora-ref']))}.",
            "",
        ]
    return lines


def run_reft_group(args: argparse.Namespace, opts: BenchOptions, workload: Workload, config: Any, peaks: dict[str, float], layers: str, positions: str, heft2: bool = False, peak_name: str = "fp32", memory: dict[str, list[dict[str, float]]] | None = None) -> list[str]:
    """ReFT: heft_core vs pyreft (and, with ``heft2``, heft_core's HEFT stage 2 on a frozen LoRA model)."""
    opts = dataclasses.replace(opts, reft_layers=layers, reft_positions=positions)
    kinds = reft_kinds(heft2)
    total = args.warmup + args.steps * args.repeats
    sides = []
    try:
        for kind in kinds:
            logger.info("building %s (layers %s, positions %s)", kind, layers, positions)
            sides.append(build_side(kind, opts, workload, max_steps=total))
        copy_from_first(sides)
        flops = {kind: side_flops(kind, config, workload, opts) for kind in kinds}
        timings = alternate(sides, warmup=args.warmup, steps=args.steps, repeats=args.repeats, device=opts.torch_device, tokens=workload.real_tokens, flops=flops)
    finally:
        close_all(sides)
    release_memory()
    refresh_peaks(peaks, opts.torch_device, [peak_name], args.quick)
    descriptions = {
        "reft-ours": "heft_core ReftAnswerModel: answer-position logits, CE on the answer token; prefix before the first intervened position run without autograd (first epoch)",
        "reft-ours-full": "reft-ours with prefix reuse off: the whole prompt runs with autograd (measures that idea alone)",
        "reft-ours-cached": "reft-ours in a later epoch: prefix keys/values kept from the first epoch, only the intervened positions run",
        "reft-ref": "pyreft get_reft_model + ReftModel(labels=...) as ReftTrainer.compute_loss, full logits",
        "heft2-ours": "heft_core HEFT stage 2: ReftAnswerModel on the frozen LoRA (peft) model",
    }
    title = f"ReFT (LoReFT rank {opts.reft_rank}, layers {layers}, positions {positions}) — heft_core vs pyreft recipe" + (" (+ HEFT stage 2)" if heft2 else "")
    return training_table(title, timings, "reft-ref", memory, peaks, {k: peak_name for k in kinds}, descriptions)


def profile_side(kind: str, opts: BenchOptions, workload: Workload, warmup: int, rows: int = 25) -> str:
    """Where one training step of ``kind`` spends its time: torch.profiler's table by op and shape."""
    from torch.profiler import ProfilerActivity, profile

    side = build_side(kind, opts, workload, max_steps=warmup + 1)
    try:
        side.run(warmup)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.torch_device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            side.run(1)
            synchronize(opts.torch_device)
        index = warmup % len(workload.chunks)
        chunk = workload.chunks[index]
        title = f"{kind}: one step on batch {index} ({len(chunk)} rows, padded width {max(len(e.input_ids) for e in chunk)})"
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=60)
        return f"{title}\n{table}"
    finally:
        side.close()


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from heft_core.models import load_model, load_tokenizer, model_info

    started = time.perf_counter()
    load_start = load_average()
    device = torch.device("cpu")
    opts = BenchOptions(model=args.model, seed=args.seed, lora_rank=args.lora_rank, lora_lr=args.lora_lr, reft_rank=args.reft_rank, reft_lr=args.reft_lr)
    info = model_info(args.model)
    tokenizer = load_tokenizer(args.model)
    num_batches = args.warmup + args.steps * args.repeats
    workload = build_workload(args.data, tokenizer, batch_size=args.batch_size, num_batches=num_batches, passage_tokens=args.passage_tokens, max_length=args.max_length, seed=args.seed)
    if args.profile:
        report = profile_side(args.profile, opts, workload, max(1, args.warmup))
        print(report)
        return report
    from transformers import AutoConfig

    from heft_core.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    pairs = {p.strip() for p in args.pairs.split(",") if p.strip()}
    bf16_units = cpu_has_bf16_units()
    if "lora" in pairs and not args.no_bf16 and bf16_units is False:
        logger.warning("this CPU has no bf16 units (avx512_bf16/amx_bf16): the bf16 sides run emulated; --no-bf16 skips them")
    logger.info("measuring matmul peaks")
    peaks = refresh_peaks(MatmulPeaks(), device, peak_names(pairs, args.no_bf16), args.quick)

    sections: list[str] = []
    failures: list[str] = []
    reft_specs = []
    for spec in [s for s in args.reft_configs.split(";") if s.strip()]:
        layers, _, positions = spec.partition(":")
        reft_specs.append((spec, layers.strip() or "8,16,24", positions.strip() or "l1"))

    # Memory first, while this process is still small: the subprocesses then have the RAM.
    memory: dict[str, dict[str, list[dict[str, float]]]] = {}
    if args.memory_repeats:
        if "lora" in pairs:
            memory["lora"] = measure_memory(lora_kinds(args, memory=True), opts, workload, steps=args.memory_steps, repeats=args.memory_repeats)
        if "reft" in pairs:
            for spec, layers, positions in reft_specs:
                spec_opts = dataclasses.replace(opts, reft_layers=layers, reft_positions=positions)
                memory[spec] = measure_memory(reft_kinds(args.heft2), spec_opts, workload, steps=args.memory_steps, repeats=args.memory_repeats)

    if "lora" in pairs:
        try:
            sections += run_lora_group(args, opts, workload, config, peaks, memory=memory.get("lora"))
        except Exception as exc:  # report and continue with the other pairs
            logger.exception("LoRA group failed")
            failures.append(f"LoRA group: {exc!r}")
    if "reft" in pairs:
        for spec, layers, positions in reft_specs:
            try:
                sections += run_reft_group(args, opts, workload, config, peaks, layers, positions, heft2=args.heft2, memory=memory.get(spec))
            except Exception as exc:
                logger.exception("ReFT group %s failed", spec)
                failures.append(f"ReFT group {spec}: {exc!r}")
    if "eval" in pairs:
        try:
            eval_load = build_workload(args.data, tokenizer, batch_size=args.batch_size, num_batches=max(1, -(-args.eval_questions // args.batch_size)), passage_tokens=args.passage_tokens, max_length=args.max_length, seed=args.seed, split="validation")
            examples = [e for chunk in eval_load.chunks for e in chunk][: args.eval_questions]
            model = load_model(args.model, dtype=torch.float32, device=device)
            result = eval_pair(model, tokenizer, examples, yes_id=workload.yes_id, no_id=workload.no_id, pad_id=workload.pad_id, batch_size=args.batch_size, device=device, repeats=args.eval_repeats, max_new_tokens=args.max_new_tokens)
            sections += eval_table(result)
            del model
            release_memory()
            first_spec = reft_specs[0] if reft_specs else ("8,16,24:l1", "8,16,24", "l1")
            reft_opts = dataclasses.replace(opts, reft_layers=first_spec[1], reft_positions=first_spec[2])
            sections += eval_table(reft_eval_group(reft_opts, tokenizer, examples, yes_id=workload.yes_id, no_id=workload.no_id, pad_id=workload.pad_id, batch_size=args.batch_size, device=device, repeats=args.eval_repeats, max_new_tokens=args.max_new_tokens))
        except Exception as exc:
            logger.exception("evaluation pair failed")
            failures.append(f"evaluation pair: {exc!r}")

    tokens = workload.real_tokens
    widths = [max(len(e.input_ids) for e in c) for c in workload.chunks]
    header = [
        f"# HEFT Studio throughput benchmark (CPU) — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1], '-m', 'bench.throughput', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine_description(device).items()],
        f"- load average (1/5/15 min) at start: {load_start}; at end: {load_average()} — other processes shared the CPU; only ratios are meaningful",
        peak_summary(peaks, device, bf16_units, args.quick),
        "",
        "## Settings",
        "",
        f"- model: {args.model} ({info.model_type}, {info.num_layers} layers, hidden {info.hidden_size}, vocab {config.vocab_size})",
        f"- data: {workload.label}; {len(workload.chunks)} batches of {args.batch_size}, built once and shared by every side; passages cut to {args.passage_tokens} tokens"
        + (f", prompts capped at {args.max_length}" if args.max_length else ""),
        f"- real prompt tokens per batch: median {median(tokens):.0f} (padded width median {median(widths):.0f}); tokens/s counts real prompt tokens, identical for both sides",
        f"- timing: {args.warmup} warmup step(s) per side, then {args.repeats} rounds × {args.steps} step(s) per side on the same batches, order rotating each round; ratio = median over rounds of (side tokens/s ÷ reference tokens/s in the same round); evaluation alternates batch by batch",
        f"- optimizer (all sides): AdamW, constant lr (LoRA {args.lora_lr:g}, ReFT {args.reft_lr:g}), no warmup, weight decay 0, grad-norm clip {MAX_GRAD_NORM}; adapter dropout 0 so that losses are comparable; same initial adapter weights (copied)",
        f"- memory: each side alone in a fresh spawn subprocess ({args.memory_repeats} run(s) per side, alternating, {args.memory_steps} step(s) each); weights copied out of their memory map, then the RSS high-water mark is reset (/proc/self/clear_refs); peak RSS = VmHWM during training (weights included); training increment = that peak − RSS before the first step",
        "- FLOPs (see `step_flops`): forward 2·P_layers·B·T + 4·L·B·T²·d + 2·d·V·(logit positions); backward = input gradients only through the layers above the lowest trainable one (1× linear, 2× attention) + head; utilisation = achieved ÷ matmul peak",
        "",
        "## Results",
        "",
    ]
    footer = ["", f"Total benchmark time: {time.perf_counter() - started:.0f} s."]
    if failures:
        footer += ["", "## Failures", "", *[f"- {f}" for f in failures]]
    report = "\n".join(header + sections + footer) + "\n"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"throughput-{dt.date.today().isoformat()}-cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    logger.info("report written to %s", out)
    return report
