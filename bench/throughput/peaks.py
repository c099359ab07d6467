"""The machine: its description, load average, bf16 units and the peak FLOP/s of a plain matmul."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from bench.throughput.common import logger


def machine_description(device: torch.device | str = "cpu") -> dict[str, str]:
    """CPU model, cores, threads, library versions, load average, and the GPU if any."""
    from importlib import metadata

    info: dict[str, str] = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        info["cpu"] = match.group(1).strip() if match else platform.processor()
        flags = re.search(r"^Flags:\s*(.+)$", lscpu, re.M)
        if flags:
            wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags.group(1).split()]
            info["cpu features"] = ", ".join(wanted) or "no AVX-512/AMX"
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or "unknown"
    info["cores (os.cpu_count)"] = str(os.cpu_count())
    try:
        info["cores usable (affinity)"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    info["torch threads"] = str(torch.get_num_threads())
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    versions = []
    for name in ("torch", "transformers", "peft", "pyreft", "pyvene", "accelerate"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    info["libraries"] = ", ".join(versions)
    info["python"] = platform.python_version()
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], iters: int = 4, repeats: int = 3) -> float:
    """Best FLOP/s of square n x n @ n x n matmuls (2 n^3 FLOPs each) at the fixed ``sizes`` given.

    For callers that know their machine (bench/gpu_check.py on a GPU); this script itself picks
    sizes by time with :func:`timed_matmul_peak`.
    """
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                a @ b
            synchronize(device)
            best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


PEAK_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


PEAK_START_SIZE = 256


PEAK_MAX_SIZE = 8192  # saturates a data-centre GPU; a CPU stops far below it on time


PEAK_MULTIPLY_LIMIT_S = 0.2  # grow the matrices while the next multiply is predicted to stay under this


PEAK_BUDGET_S = 3.0  # per dtype and measurement (a new size costs a warm-up multiply and a timed one)


PEAK_REPEATS = 3  # timed multiplies at the final size, best kept: other load only ever slows one down


QUICK_PEAK_MULTIPLY_LIMIT_S = 0.05


QUICK_PEAK_BUDGET_S = 0.5


@dataclass(frozen=True)
class MatmulPeak:
    """One timed peak measurement."""

    flops_per_second: float
    size: int  # n of the n x n @ n x n multiply that gave the best figure
    sizes: tuple[int, ...]  # every size timed, in order
    seconds: float  # wall time of the whole measurement


class MatmulPeaks(dict[str, float]):
    """Peak FLOP/s by dtype name (``PEAK_DTYPES``), plus the matrix size each figure came from."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}


def next_peak_size(n: int) -> int:
    """256, 384, 512, 768, 1024 ...: steps of x1.5 and x4/3, so each multiply costs 2.4-3.4x the last."""
    return n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3


class SquareMultiplyTimer:
    """Seconds of one warm n x n @ n x n multiply; keeps the operands of the last size asked for."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.size = 0
        self.a = self.b = None

    def __call__(self, n: int) -> float:
        if n != self.size:
            self.a = torch.randn(n, n, device=self.device).to(self.dtype)
            self.b = torch.randn(n, n, device=self.device).to(self.dtype)
            self.size = n
            self.a @ self.b  # the first multiply at a size pays for allocation and packing
            synchronize(self.device)
        start = time.perf_counter()
        self.a @ self.b
        synchronize(self.device)
        return time.perf_counter() - start


def timed_matmul_peak(
    device: torch.device, dtype: torch.dtype, *,
    budget_s: float = PEAK_BUDGET_S, multiply_limit_s: float = PEAK_MULTIPLY_LIMIT_S,
    start_size: int = PEAK_START_SIZE, max_size: int = PEAK_MAX_SIZE, repeats: int = PEAK_REPEATS,
    time_multiply: Callable[[int], float] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> MatmulPeak:
    """Best FLOP/s of square multiplies (2 n^3 FLOPs each) at sizes chosen by time, not a fixed ladder.

    Starts at ``start_size`` and grows (:func:`next_peak_size`) while the next multiply, predicted
    from the last by n^3, stays under ``multiply_limit_s`` and its warm-up plus timed multiply fit
    in what is left of ``budget_s``; then times the last size again (``repeats`` in all) while the
    budget allows. A fixed ladder up to 3072 ran for over 9 minutes on a CPU that emulates bf16;
    this stops at a few hundred there and goes on to ``max_size`` on a GPU. ``time_multiply(n)``
    (seconds of one warm multiply) and ``clock`` are parameters so that tests can fake them.
    """
    time_multiply = time_multiply or SquareMultiplyTimer(device, dtype)
    started = clock()
    timed: list[tuple[int, float]] = []  # (size, seconds of one multiply)
    size = start_size
    while True:
        seconds = time_multiply(size)
        timed.append((size, seconds))
        bigger = next_peak_size(size)
        predicted = seconds * (bigger / size) ** 3
        if bigger > max_size or predicted > multiply_limit_s or 2 * predicted > budget_s - (clock() - started):
            break
        size = bigger
    for _ in range(repeats - 1):
        if seconds > budget_s - (clock() - started):
            break
        seconds = time_multiply(size)
        timed.append((size, seconds))
    rate, best_size = max((2 * n**3 / max(s, 1e-12), n) for n, s in timed)
    return MatmulPeak(rate, best_size, tuple(dict.fromkeys(n for n, _ in timed)), clock() - started)


def peak_limits(quick: bool) -> tuple[float, float]:
    """(budget per dtype, limit per multiply) in seconds: ``--quick`` keeps the whole measurement under a second."""
    return (QUICK_PEAK_BUDGET_S, QUICK_PEAK_MULTIPLY_LIMIT_S) if quick else (PEAK_BUDGET_S, PEAK_MULTIPLY_LIMIT_S)


def refresh_peaks(
    peaks: dict[str, float], device: torch.device, names: Iterable[str], quick: bool = False,
) -> dict[str, float]:
    """Measure the matmul peaks of ``names`` (keys of ``PEAK_DTYPES``) again; keep the higher of old and new.

    Callers name only the dtypes their sides' utilisation is measured against, so that ``--no-bf16``
    measures no bf16 peak. main() measures before and after each group, so a burst of other load
    at the start does not shrink the peak (which would inflate utilisation).
    """
    for name in names:
        if name not in PEAK_DTYPES:
            raise ValueError(f"peak dtype {name!r}: expected one of {', '.join(PEAK_DTYPES)}")
        budget, limit = peak_limits(quick)
        result = timed_matmul_peak(device, PEAK_DTYPES[name], budget_s=budget, multiply_limit_s=limit)
        logger.info(
            "matmul peak %s: %.1f GFLOP/s at n=%d (sizes %s, %.1f s)",
            name, result.flops_per_second / 1e9, result.size, "/".join(map(str, result.sizes)), result.seconds,
        )
        if result.flops_per_second > peaks.get(name, 0.0):
            peaks[name] = result.flops_per_second
            if isinstance(peaks, MatmulPeaks):
                peaks.sizes[name] = result.size
    return peaks


def cpu_has_bf16_units(flags: set[str] | None = None, machine: str | None = None) -> bool | None:
    """Whether this CPU multiplies bf16 in hardware; None where that cannot be told.

    x86: ``avx512_bf16`` or ``amx_bf16``; Arm: ``bf16``/``svebf16``. Without them torch converts
    bf16 to fp32 in software, often slower than fp32 itself. ``flags``/``machine`` are for tests.
    """
    machine = (machine or platform.machine()).lower()
    if flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
        if not match:
            return None
        flags = set(match.group(1).split())
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    if machine in ("aarch64", "arm64"):
        return bool(flags & {"bf16", "svebf16"})
    return None


def peak_names(pairs: set[str], no_bf16: bool) -> list[str]:
    """The peaks main()'s selected sides are measured against: fp32 (LoRA and ReFT sides), bf16 (bf16 LoRA sides)."""
    names = ["fp32"] if pairs & {"lora", "reft"} else []
    return names + (["bf16"] if "lora" in pairs and not no_bf16 else [])


def peak_summary(peaks: dict[str, float], device: torch.device, bf16_units: bool | None, quick: bool = False) -> str:
    """The report's line on the matmul peaks: each figure with its matrix size, and what was not measured."""
    if not peaks:
        return "- plain square matmul peak: not measured (no training pair selected)"
    sizes = peaks.sizes if isinstance(peaks, MatmulPeaks) else {}
    parts = []
    for name, value in peaks.items():
        size = f" at {sizes[name]}×{sizes[name]}" if name in sizes else ""
        note = ""
        if name == "bf16" and device.type == "cpu" and bf16_units is False:
            note = " (emulated: this CPU has no bf16 units such as avx512_bf16/amx_bf16; bf16 runs in software)"
        parts.append(f"{name} {value / 1e9:,.0f} GFLOP/s{size}{note}")
    skipped = [name for name in PEAK_DTYPES if name not in peaks]
    tail = f"; {', '.join(skipped)} not measured (no side uses it)" if skipped else ""
    budget, limit = peak_limits(quick)
    return (
        f"- plain square matmul peak (sizes grown from {PEAK_START_SIZE} while one multiply takes under {limit:g} s, "
        f"about {budget:g} s per dtype at most; measured before and after each group, best kept): "
        + ", ".join(parts) + tail
    )
