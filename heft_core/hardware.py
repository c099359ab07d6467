"""What the machine can do, read without importing torch."""
from __future__ import annotations


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
