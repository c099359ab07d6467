"""Peak memory of each training side, measured alone in a fresh subprocess."""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import resource
import sys
from typing import Sequence

import torch

from bench.throughput.build import BenchOptions, build_side
from bench.throughput.common import logger
from bench.throughput.sides import Side, TrainerSide
from bench.throughput.workload import Workload


def _proc_status_bytes(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux) in bytes, or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _side_modules(side: Side) -> list[torch.nn.Module]:
    if isinstance(side, TrainerSide):
        return [side.trainer.model]
    model = side.model
    return [m for m in (getattr(model, "module", None), getattr(model, "model", None), model) if isinstance(m, torch.nn.Module)]


def _make_weights_anonymous(side: Side) -> None:
    """Copy memory-mapped weights into ordinary memory.

    safetensors weights can stay file-backed (mmap); the kernel may drop such pages under
    memory pressure mid-run, which lowers RSS by up to the model's size and makes the peak
    depend on other processes. Copied weights count in RSS for every side alike.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in _side_modules(side):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if id(tensor) not in seen and tensor.device.type == "cpu":
                    seen.add(id(tensor))
                    tensor.data = tensor.data.clone()


def _memory_child(kind: str, opts: BenchOptions, workload: Workload, steps: int, threads: int) -> dict[str, float]:
    """In a fresh spawn process: build one side, reset the RSS high-water mark, train, read it.

    ``ru_maxrss`` is not used: Linux carries the RSS of the forked pre-exec copy of the parent
    into a spawned child's ``ru_maxrss``. /proc/self/status ``VmHWM`` belongs to the child's own
    address space; writing 5 to /proc/self/clear_refs resets it to the current RSS.
    """
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    side = build_side(kind, opts, workload, max_steps=steps)
    _make_weights_anonymous(side)
    build_peak = _proc_status_bytes("VmHWM")
    if build_peak is None or not _reset_peak_rss():  # not Linux: fall back to ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        side.run(steps)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        side.close()
        return {"baseline_bytes": before, "peak_bytes": after, "method": "ru_maxrss"}
    baseline = _proc_status_bytes("VmRSS") or 0
    side.run(steps)
    train_peak = _proc_status_bytes("VmHWM") or 0
    side.close()
    return {"baseline_bytes": baseline, "peak_bytes": max(train_peak, baseline), "build_peak_bytes": build_peak, "method": "VmHWM"}


def measure_memory(kinds: Sequence[str], opts: BenchOptions, workload: Workload, *, steps: int, repeats: int) -> dict[str, list[dict[str, float]]]:
    """Each side alone in its own spawn subprocess, in the order A, B, (C,) A, B, ..."""
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    context = multiprocessing.get_context("spawn")
    for repeat in range(repeats):
        for kind in kinds:
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                try:
                    result = pool.submit(_memory_child, kind, opts, workload, steps, torch.get_num_threads()).result()
                except Exception as exc:  # keep going: a failed side is reported, not fatal
                    logger.warning("memory run of %s failed: %r", kind, exc)
                    continue
            results[kind].append(result)
            logger.info("memory %s run %d: peak %.0f MiB, training increment %.0f MiB", kind, repeat + 1, result["peak_bytes"] / 2**20, (result["peak_bytes"] - result["baseline_bytes"]) / 2**20)
    return results
