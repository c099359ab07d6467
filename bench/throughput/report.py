"""The report's tables and number formatting."""
from __future__ import annotations

import statistics
from typing import Any, Sequence

from bench.throughput.alternation import SideTiming, paired_ratios


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_range(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    return f"{median(values):.{digits}f} (range {min(values):.{digits}f}–{max(values):.{digits}f}, n={len(values)})"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def training_table(title: str, timings: dict[str, SideTiming], reference: str, memory: dict[str, list[dict[str, float]]] | None, peaks: dict[str, float], peak_of: dict[str, str], descriptions: dict[str, str]) -> list[str]:
    """Markdown section for one group of training sides compared against ``reference``."""
    lines = [f"### {title}", ""]
    ref = timings[reference]
    on_gpu = ref.peak_device_bytes is not None
    peak_label = "peak GPU allocated MiB" if on_gpu else "peak RSS MiB"
    lines.append(f"| side | recipe | tokens/s (median) | speed ratio vs reference (median of paired rounds) | {peak_label} | training increment MiB | memory ratio (increment) | loss first → last step | achieved GFLOP/s | utilisation |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    mem_ref = _memory_summary(memory, reference) if memory else None
    for name, timing in timings.items():
        ratio = "1 (reference)" if name == reference else fmt_range(paired_ratios(timing, ref))
        mem = _memory_summary(memory, name) if memory else None
        mem_ratio = "n/a"
        if mem and mem_ref and mem_ref[1] > 0:
            mem_ratio = f"{mem[1] / mem_ref[1]:.2f}"
        if timing.peak_device_bytes is not None:  # GPU: in-process max_memory_allocated
            peak_col, inc_col = mib(timing.peak_device_bytes) + " (all resident models)", mib(timing.device_increment_bytes)
            ref_inc = ref.device_increment_bytes
            mem_ratio = f"{timing.device_increment_bytes / ref_inc:.2f}" if ref_inc else "n/a"
        else:
            peak_col = mib(mem[0]) if mem else "n/a"
            inc_col = mib(mem[1]) if mem else "n/a"
        flops = median(timing.flops_per_second)
        peak = peaks.get(peak_of.get(name, "fp32"))
        util = f"{flops / peak:.1%} of {peak_of.get(name, 'fp32')} peak" if peak else "n/a"
        losses = timing.losses
        loss_col = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "n/a"
        lines.append(f"| {name} | {descriptions.get(name, '')} | {median(timing.tokens_per_second):,.0f} | {ratio} | {peak_col} | {inc_col} | {mem_ratio} | {loss_col} | {flops / 1e9:,.1f} | {util} |")
    lines.append("")
    names = list(timings)
    if len(names) >= 2:
        final = {n: timings[n].losses[-1] for n in names if timings[n].losses}
        if final:
            spread = max(final.values()) - min(final.values())
            lines.append(f"Final loss after {len(ref.losses)} steps from the same initial weights: " + ", ".join(f"{n} {v:.5f}" for n, v in final.items()) + f" (spread {spread:.2e}).")
            lines.append("")
    return lines


def _memory_summary(memory: dict[str, list[dict[str, float]]] | None, name: str) -> tuple[float, float] | None:
    runs = (memory or {}).get(name) or []
    if not runs:
        return None
    return median([r["peak_bytes"] for r in runs]), median([r["peak_bytes"] - r["baseline_bytes"] for r in runs])


def eval_table(result: dict[str, Any]) -> list[str]:
    n = result["n"]
    reference = result["reference"]
    lines = [f"### Evaluation — heft_core scoring vs generation ({n} validation questions, {result['title']})", ""]
    lines.append("| side | questions/s (median) | speed ratio vs generation (median of paired rounds) | accuracy |")
    lines.append("|---|---|---|---|")
    for name, seconds in result["seconds"].items():
        qps = [n / s for s in seconds]
        ratio = "1 (reference)" if name == reference else fmt_range(result["ratios"][name])
        lines.append(f"| {name} | {median(qps):,.2f} | {ratio} | {result['accuracy'][name]:.1%} |")
    lines += ["", (
        f"Generation as pyreft's example evaluator does it for BoolQ: greedy, max_new_tokens={result['max_new_tokens']}, stopping when every row has "
        "produced EOS, KV cache on; the answer is the first whole word 'yes'/'no' in the lower-cased text (neither counts as wrong). "
        "heft_core compares the ' yes' and ' no' logits at the answer position."
    ), ""]
    return lines
