"""Training-step time of the CPU preset's LoRA shape under four precisions, side by side in one process.

    python -m bench.precision --data ../shared/data/boolq --rows 48 --rounds 3 --out bench/results/x.md

Sides (the same batches, the same LoRA init; rounds interleave the sides so load from other
processes falls on all of them alike):

- ``fp32``: today's CPU default (precision "no").
- ``autocast``: today's ``precision: bf16`` on CPU: fp32 weights under ``torch.autocast`` bf16, which
  re-casts every frozen weight at every call.
- ``bf16-base``: the frozen base weights cast to bf16 once; LoRA adapters and AdamW stay fp32
  (peft casts the adapter input to the adapter's dtype), no autocast.
- ``onednn-bf32``: fp32 everything with ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``
  (oneDNN may run fp32 matmuls on bf16 units); the table says whether it changed any matmul's result,
  i.e. whether bf16 kernels really ran.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

SIDES = ("fp32", "autocast", "bf16-base", "onednn-bf32")


def cpu_description() -> tuple[str, str]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return model, " ".join(wanted)


def onednn_bf32_changes_matmuls() -> bool:
    """True when the oneDNN bf16 fp32-precision mode changes an fp32 linear's result (bf16 kernels ran)."""
    a, w = torch.randn(256, 576), torch.randn(1536, 576)
    exact = F.linear(a, w)
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        return not torch.equal(F.linear(a, w), exact)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def build(side: str, model_ref: str, layers: list[int]):
    from heft_core.adapters import PlainAnswerModel, build_lora_model
    from heft_core.config import LoraSettings
    from heft_core.models import load_model, model_info

    info = model_info(model_ref)
    base = load_model(model_ref)
    if side == "bf16-base":
        base.to(torch.bfloat16)  # frozen weights once; LoRA is added after, in fp32
    torch.manual_seed(0)
    lora = build_lora_model(base, LoraSettings(rank=8, alpha=16.0, dropout=0.0, target_modules=["all-linear"],
                                              layers=layers), info.num_layers)
    for name, param in lora.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return PlainAnswerModel(lora)


def step(model, batch, targets, optimizer, side: str) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if side == "autocast" else nullcontext()
    start = time.perf_counter()
    with context:
        logits = model.answer_logits(batch)
    loss = F.cross_entropy(logits.float(), targets[batch.labels])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start



def load_warning(*loads: tuple[float, ...]) -> str:
    """A warning when the 1-minute load average passed the core count: other work shared the cores."""
    return " (above the core count: other work ran alongside)" if max(load[0] for load in loads) > (os.cpu_count() or 1) else ""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv  # the report names the exact command
    import random

    from heft_common.vocabulary import EMBEDDED_MODEL
    from heft_core import data as data_lib
    from heft_core.batching import collate, length_grouped_batches
    from heft_core.config import LoraSettings  # noqa: F401  (imported for its validation side effects)
    from heft_core.models import load_tokenizer
    from heft_core.prompt import PromptEncoder, PromptTemplate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/boolq")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    load_before = os.getloadavg()
    splits = data_lib.load_data(args.data)
    rows = data_lib.subset(splits.train, args.rows, 42)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    encoder = PromptEncoder(tokenizer, PromptTemplate(), args.max_length)
    encoded = encoder.encode_examples(rows)
    batches = [collate(c, tokenizer.pad_token_id) for c in length_grouped_batches(encoded, args.batch_size,
                                                                                     random.Random(0))]
    targets = torch.tensor([encoder.no_id, encoder.yes_id])
    layers = list(range(10, 30))
    models = {side: build(side, EMBEDDED_MODEL, layers) for side in sides}
    optimizers = {s: torch.optim.AdamW(m.trainable_parameters(), lr=1e-3) for s, m in models.items()}
    times: dict[str, list[float]] = {s: [] for s in sides}
    first_loss: dict[str, float] = {}
    for side in sides:  # warm-up step and the first batch's loss before any update
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if side == "autocast" else nullcontext():
            if side == "onednn-bf32":
                torch.backends.mkldnn.matmul.fp32_precision = "bf16"
            first_loss[side] = F.cross_entropy(models[side].answer_logits(batches[0]).float(),
                                               targets[batches[0].labels]).item()
            torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    for _ in range(args.rounds):
        for side in sides:
            torch.backends.mkldnn.matmul.fp32_precision = "bf16" if side == "onednn-bf32" else "ieee"
            seconds = sum(step(models[side], b, targets, optimizers[side], side) for b in batches)
            times[side].append(seconds / len(batches))
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    load_after = os.getloadavg()
    cpu, flags = cpu_description()
    tokens = sum(b.num_tokens for b in batches) / len(batches)
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    lines = [
        "# Training-step time by precision: the CPU preset's LoRA shape (bench/precision.py)", "",
        f"- command: `python -m bench.precision {' '.join(argv or [])}`".replace("  ", " "),
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"- CPU flags: {flags}",
        f"- load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}{load_warning(load_before, load_after)}",
        f"- workload: embedded SmolLM2-135M, LoRA rank 8 all-linear on layers 10-29, {len(rows)} BoolQ train rows "
        f"(max_length {args.max_length}), batch {args.batch_size}, {len(batches)} batches of {tokens:.0f} tokens "
        f"on average, AdamW; forward + backward + optimizer step; {args.rounds} rounds, sides interleaved",
        f"- oneDNN bf16 fp32-precision mode changes an fp32 linear's result here: "
        f"{'yes (bf16 kernels ran)' if onednn_bf32_changes_matmuls() else 'no (it runs fp32 kernels on this CPU)'}",
        "", "| side | median s/step | per round | vs fp32 | first-batch loss |", "| --- | --- | --- | --- | --- |",
    ]
    for side in sides:
        median = statistics.median(times[side])
        ratio = f"{base / median:.2f}x faster" if base else ""
        per_round = ", ".join(f"{t:.2f}" for t in times[side])
        lines.append(f"| {side} | {median:.2f} | {per_round} | {ratio} | {first_loss[side]:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
