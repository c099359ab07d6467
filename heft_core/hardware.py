"""What the machine can do: bf16 support, and the precision a run trains in.

Importing this module does not import torch (the app reads ``cpu_has_native_bf16`` at start-up);
``resolve_precision`` imports it when called (heavy: deferred).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CPUINFO = "/proc/cpuinfo"

# "auto" on a CPU with bf16 units (AMX or AVX512-BF16): bf16 autocast, the fastest of the CPU
# precisions measured side by side (bench/precision.py, bench/results/precision-*.md), once the
# accuracy-parity runs (the CPU preset's LoRA arm, 500 questions, bf16 vs fp32) show it costs no
# accuracy. Until then "auto" stays fp32 on every CPU; flip this one constant to switch.
CPU_AUTO_BF16 = False

# bf16 on a CPU without bf16 units is emulated: the benchmarks measured it tens of times slower.
EMULATED_BF16_WARNING = (
    "precision bf16 on a CPU without bf16 units (no AMX or AVX512-BF16): bf16 is emulated here and "
    "training is expected to be many times (up to tens of times) slower than fp32; choose auto or no"
)


def read_cpu_flags(path: str = CPUINFO) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty when it cannot be read)."""
    try:
        with open(path) as fh:
            return set(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays.

    Elsewhere bf16 on CPU is emulated and slower than fp32.
    """
    flags = read_cpu_flags(CPUINFO)  # the module's path, read at call time (tests point it elsewhere)
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_cpu_precision() -> str:
    """What ``precision: auto`` trains in on a CPU: "bf16" where it has bf16 units and
    ``CPU_AUTO_BF16`` is on, else "no" (fp32). Never bf16 where it would be emulated."""
    return "bf16" if CPU_AUTO_BF16 and cpu_has_native_bf16() else "no"


def precision_warning(precision: str, on_gpu: bool = False) -> str | None:
    """The warning for an explicit bf16 on a CPU that would emulate it, else None."""
    if precision == "bf16" and not on_gpu and not cpu_has_native_bf16():
        return EMULATED_BF16_WARNING
    return None


def resolve_precision(precision: str) -> tuple[str, Any]:
    """accelerate's mixed-precision mode and the torch dtype to hold base weights in.

    "auto" is bf16 on GPUs that have it; on CPUs it is ``auto_cpu_precision()`` (fp32 until the
    bf16 parity measurement flips ``CPU_AUTO_BF16``, and never bf16 on CPUs without bf16 units).
    On GPUs the base weights are held in the half dtype (memory); on CPUs they stay fp32 and
    autocast runs the matrix products in bf16, because bf16 elementwise work (norms, residual
    adds, rotary) is slower than fp32 on CPUs: fp32 weights + autocast trained 1.17x faster than
    bf16 weights + autocast on this project's 2-core AMX machine (bench/README.md).
    """
    import torch  # heavy: deferred

    if precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "no"
        else:
            precision = auto_cpu_precision()
    dtype = torch.float32
    if torch.cuda.is_available():
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return precision, dtype


def training_memory() -> tuple[str, int | None, int]:
    """(device kind, bytes of memory a run can use there or None if unknown, bytes per base weight).

    On a GPU: its memory, weights held in the half dtype (2 bytes). On a CPU: the machine's memory or the
    container's cgroup limit if lower, weights in fp32 (4 bytes). Imports torch (heavy: deferred).
    """
    import torch  # heavy: deferred

    if torch.cuda.is_available():
        return "GPU", int(torch.cuda.get_device_properties(0).total_memory), 2
    total: int | None = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit)) if total else int(limit)
    except OSError:
        pass
    return "CPU", total, 4
