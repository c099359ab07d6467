"""Timing sides in alternating chunks (A, B, A, B ...) and pairing their rounds into ratios."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from bench.throughput.build import copy_initial_weights
from bench.throughput.common import logger
from bench.throughput.peaks import synchronize
from bench.throughput.sides import Side


@dataclass
class SideTiming:
    name: str
    chunk_seconds: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_flops: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0  # untimed in the ratios; includes compiling for a compiled side
    peak_device_bytes: int | None = None  # CUDA only: max allocated during this side's chunks
    device_increment_bytes: int | None = None  # CUDA only: that peak minus what was allocated before the chunk

    @property
    def tokens_per_second(self) -> list[float]:
        return [t / s for t, s in zip(self.chunk_tokens, self.chunk_seconds)]

    @property
    def flops_per_second(self) -> list[float]:
        return [f / s for f, s in zip(self.chunk_flops, self.chunk_seconds)]


def alternate(sides: Sequence[Side], *, warmup: int, steps: int, repeats: int, device: torch.device, tokens: Sequence[int], flops: dict[str, Sequence[float]]) -> dict[str, SideTiming]:
    """Warm up every side, then ``repeats`` rounds of ``steps`` steps per side, order rotating."""
    timings = {side.name: SideTiming(side.name) for side in sides}
    for side in sides:
        logger.info("warmup %s (%d steps)", side.name, warmup)
        start = time.perf_counter()
        side.run(warmup)
        synchronize(device)
        timings[side.name].warmup_seconds = time.perf_counter() - start
    for round_index in range(repeats):
        order = list(sides[round_index % len(sides):]) + list(sides[: round_index % len(sides)])
        for side in order:
            first = side.position
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            side.run(steps)
            synchronize(device)
            seconds = time.perf_counter() - start
            timing = timings[side.name]
            timing.chunk_seconds.append(seconds)
            timing.chunk_tokens.append(sum(tokens[i % len(tokens)] for i in range(first, first + steps)))
            timing.chunk_flops.append(sum(flops[side.name][i % len(tokens)] for i in range(first, first + steps)))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                timing.peak_device_bytes = max(timing.peak_device_bytes or 0, peak)
                timing.device_increment_bytes = max(timing.device_increment_bytes or 0, peak - resident)
            logger.info("round %d %s: %d steps in %.2f s (loss %.4f)", round_index + 1, side.name, steps, seconds, side.losses[-1])
    for side in sides:
        timings[side.name].losses = list(side.losses)
    return timings


def copy_from_first(sides: Sequence[Side]) -> None:
    """Every side starts from the first side's adapter weights."""
    for index in range(1, len(sides)):
        copy_initial_weights(sides[0], sides[index])


def close_all(sides: list[Side]) -> None:
    """Close every side and drop the references, so their models can be freed."""
    while sides:
        sides.pop().close()


def paired_ratios(a: SideTiming, b: SideTiming) -> list[float]:
    """Per-round speed ratio a/b (tokens per second; same tokens per chunk on both sides)."""
    return [ta / tb for ta, tb in zip(a.tokens_per_second, b.tokens_per_second)]
