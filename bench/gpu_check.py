"""GPU check: heft_core's training and evaluation at Llama-2-7B shape, nothing downloaded.

A randomly initialised ``LlamaForCausalLM`` with Llama-2-7B's shape (32 layers, hidden 4096,
intermediate 11008, 32 heads, vocab 32000) is built in bf16 directly on the GPU, and trained
on random token batches (default 8 x 512). Sections, each in its own try/except so that one
failure is reported and the rest still run:

1. environment and the bf16 (and tf32) matmul peak;
2. LoRA: heft_core vs a transformers Trainer (bf16) with the causal-LM loss;
3. ReFT: heft_core vs pyreft's recipe, plus heft_core's HEFT stage 2 (ReFT on a frozen LoRA
   model), for layers 8,16,24 at l1 and for all layers at f7+l7;
4. evaluation: heft_core ``predict`` vs greedy generation (speed only: the model is random).

Throughput (tokens/s), peak memory (``torch.cuda.max_memory_allocated``; the increment over
what was resident before each side's chunk) and utilisation (model FLOPs / bf16 matmul peak)
come from bench/throughput.py's machinery: sides alternate in chunks, ratios are medians of
paired rounds. The Markdown report is rewritten after every section to ``$OUT/gpu_check.md``
(if ``$OUT`` is set) or bench/results/gpu_check-<date>.md, and printed at the end.

Test the code paths anywhere with ``python -m bench.gpu_check --device cpu --tiny`` (from the repository root).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.gpu_check")

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


class Report:
    """Markdown sections, rewritten to disk after each one so a timeout still leaves a report."""

    def __init__(self, path: Path, header: list[str]):
        self.path = path
        self.header = header
        self.sections: list[str] = []
        self.failures: list[str] = []
        self.started = time.perf_counter()

    def add(self, lines: Sequence[str]) -> None:
        self.sections.extend(lines)
        self.write()

    def fail(self, name: str, exc: BaseException) -> None:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self.failures.append(f"- **{name}**: `{exc!r}`\n\n  ```\n" + "".join(tb[-6:]).rstrip().replace("\n", "\n  ") + "\n  ```")
        logger.error("%s failed: %r", name, exc)
        self.write()

    def text(self) -> str:
        lines = self.header + self.sections + ["", f"Elapsed: {time.perf_counter() - self.started:.0f} s."]
        if self.failures:
            lines += ["", "## Failures", "", *self.failures]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())


def random_workload(vocab: int, batch_size: int, length: int, num_batches: int, seed: int, lengths: str = "full") -> Any:
    """Random token batches: ``num_batches`` x ``batch_size`` rows of ``length`` tokens, random yes/no labels."""
    from bench.throughput import Workload
    from heft_core.prompt import EncodedExample

    rng = random.Random(seed)
    chunks = []
    for b in range(num_batches):
        chunk = []
        for r in range(batch_size):
            n = length if lengths == "full" else rng.randint(length // 2, length)
            chunk.append(EncodedExample(f"b{b}-r{r}", [1] + [rng.randrange(3, vocab) for _ in range(n - 1)], rng.randint(0, 1)))
        chunks.append(chunk)
    yes_id, no_id = 3 + (vocab // 3), 3 + (vocab // 2)
    return Workload(chunks, yes_id, no_id, pad_id=0, label=f"random tokens ({batch_size} x {length})")


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (code-path test)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 7B shape (code-path test)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-questions", type=int, default=64)
    parser.add_argument("--reft-configs", default=None, help="';'-separated layers:positions (default '8,16,24:l1;all:f7+l7', tiny '1,2:l1;all:f2+l2')")
    parser.add_argument("--sections", default="lora,reft,eval")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this many seconds")
    parser.add_argument("--out", default=None, help="report path (default: $OUT/gpu_check.md or bench/results/gpu_check-<date>.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out_dir = os.environ.get("OUT")
    path = Path(args.out) if args.out else (Path(out_dir) / "gpu_check.md" if out_dir else ROOT / "bench" / "results" / f"gpu_check-{dt.date.today().isoformat()}.md")
    if args.tiny:
        args.batch_size, args.length = min(args.batch_size, 2), min(args.length, 32)
        args.warmup, args.steps, args.repeats = 1, 1, 2
        args.eval_questions = min(args.eval_questions, 4)
    shape = TINY if args.tiny else LLAMA2_7B
    reft_configs = args.reft_configs or ("1,2:l1;all:f2+l2" if args.tiny else "8,16,24:l1;all:f7+l7")
    report = Report(path, [
        f"# HEFT Studio GPU check — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", "",
        f"Command: `python -m bench.gpu_check {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
    ])

    # --- 1. environment --------------------------------------------------------------------
    try:
        import torch

        from bench.throughput import machine_description, matmul_peak

        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available to this Python")
        peaks = {"bf16": matmul_peak(device, torch.bfloat16, sizes=(256,) if args.tiny else (8192,), iters=3 if args.tiny else 20)}
        if device.type == "cuda":
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                peaks["tf32"] = matmul_peak(device, torch.float32, sizes=(8192,), iters=10)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        report.add([
            "## Environment", "",
            *[f"- {k}: {v}" for k, v in machine_description(device).items()],
            f"- model: random LlamaForCausalLM {'(tiny)' if args.tiny else '(Llama-2-7B shape)'}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, {shape['num_attention_heads']} heads, vocab {shape['vocab_size']}; bf16 weights",
            f"- batches: {args.batch_size} × {args.length} random tokens; {args.warmup} warmup + {args.repeats} rounds × {args.steps} steps per side",
            "- matmul peak: " + ", ".join(f"{k} {v / 1e12:,.1f} TFLOP/s" for k, v in peaks.items()),
            "- optimizer (all sides): AdamW, constant lr, clip 1.0; heft_core trains under bf16 autocast with fp32 adapter weights (its GPU default), the Trainer with bf16=True, pyreft with its default bf16 interventions under autocast", "",
        ])
    except Exception as exc:
        report.fail("environment", exc)
        print(report.text())
        return report.text()

    from bench import throughput as tp

    sections = {s.strip() for s in args.sections.split(",")}
    opts = tp.BenchOptions(model="random-llama", device=args.device, dtype="bfloat16", seed=42, lora_rank=8, lora_lr=2e-4, reft_rank=4, reft_lr=2e-3, bf16_autocast_ref=True, tiny_config=shape)
    num_batches = args.warmup + args.steps * args.repeats
    workload = random_workload(shape["vocab_size"], args.batch_size, args.length, num_batches, seed=0)
    from transformers import LlamaConfig

    config = LlamaConfig(**shape)
    run_args = argparse.Namespace(warmup=args.warmup, steps=args.steps, repeats=args.repeats, memory_repeats=0, memory_steps=0, no_bf16=True, quick=args.tiny, compile_probe=False)

    def guarded(name: str, fn: Callable[[], list[str]]) -> None:
        elapsed = time.perf_counter() - report.started
        if elapsed > args.budget_s:
            report.add([f"### {name}", "", f"skipped: {elapsed:.0f} s elapsed, over the {args.budget_s:.0f} s budget", ""])
            return
        logger.info("=== %s ===", name)
        try:
            report.add(fn())
        except Exception as exc:
            report.fail(name, exc)
        finally:
            free_memory()

    report.add(["## Training (bf16)", ""])
    if "lora" in sections:
        guarded("LoRA pair", lambda: tp.run_lora_group(run_args, opts, workload, config, peaks, peak_name="bf16"))
    if "reft" in sections:
        for spec in [s for s in reft_configs.split(";") if s.strip()]:
            layers, _, positions = spec.partition(":")
            guarded(f"ReFT pair {spec}", lambda layers=layers, positions=positions: tp.run_reft_group(run_args, opts, workload, config, peaks, layers.strip(), positions.strip(), heft2=True, peak_name="bf16"))
    if "eval" in sections:
        def eval_section() -> list[str]:
            model = tp.load_base(opts, ours=True)
            questions = [e for chunk in random_workload(shape["vocab_size"], args.batch_size, args.length, -(-args.eval_questions // args.batch_size), seed=1, lengths="mixed").chunks for e in chunk][: args.eval_questions]
            result = tp.eval_pair(model, None, questions, yes_id=workload.yes_id, no_id=workload.no_id, pad_id=workload.pad_id, batch_size=args.batch_size, device=device, repeats=args.repeats, max_new_tokens=32, autocast=tp.bf16_autocast(device))
            del model
            lines = tp.eval_table(result)
            lines.append("(Random model: the accuracies are meaningless here; the speed ratio is the point.)")
            return lines + [""]

        guarded("Evaluation pair", eval_section)

    text = report.text()
    report.write()
    print(text)
    logger.info("report written to %s", path)
    return text


if __name__ == "__main__":
    main()
