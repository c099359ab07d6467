"""What the machine can do: bf16 support, and the precision a run trains in.

Importing this module does not import torch (the app reads ``cpu_has_native_bf16`` at start-up);
``resolve_precision`` imports it when called (heavy: deferred).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays.

    Elsewhere bf16 on CPU is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> tuple[str, Any]:
    """accelerate's mixed-precision mode and the torch dtype to hold base weights in.

    "auto" is bf16 on GPUs that have it and fp32 on CPUs: bf16 autocast is faster on CPUs
    with AMX (see bench/results) but its losses drift from fp32's, so it is opt-in there.
    On GPUs the base weights are held in the half dtype (memory); on CPUs they stay fp32 and
    autocast runs the matrix products in bf16, because bf16 elementwise work (norms, residual
    adds, rotary) is slower than fp32 on CPUs: fp32 weights + autocast trained 1.17x faster than
    bf16 weights + autocast on this project's 2-core AMX machine (bench/README.md).
    """
    import torch  # heavy: deferred

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
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
