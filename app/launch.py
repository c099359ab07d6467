"""How a training process starts: one Python process, or N data-parallel ones through ``accelerate launch``.

Shared by the local worker (``app.worker``, which gives a run of N processes N GPU slots) and the
Ray task (``app.ray_task``, which asks Ray for N GPUs on one node). The training loop splits each
epoch's batches between the processes and averages gradients (``heft_core.train``); on a machine
without GPUs the processes train on the CPU over gloo. Standard library only.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now, for the processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def training_command(module: str, arguments: Sequence[str], processes: int, *, on_gpus: bool,
                     environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``python -m module arguments`` in ``processes`` processes.

    One process: plain ``python -m``. More: ``accelerate launch`` (torch's elastic launcher underneath)
    with every process on this machine; ``on_gpus`` False trains them on the CPU (gloo backend).
    """
    env = dict(os.environ if environ is None else environ)
    if processes <= 1:
        return [sys.executable, "-m", module, *arguments], env
    if not on_gpus:
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's MULTI_CPU mode: gloo between the processes
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_ip", LOOPBACK, "--main_process_port", str(free_port()),
        # The training loop picks its own precision (RunConfig.precision); no compilation.
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *arguments,
    ]
    return command, env


def device_label(gpu_ids: Sequence[str], processes: int) -> str:
    """A run's devices as the Run row stores them: "cuda:0,1", "cpu", or "cpu × 2 processes"."""
    if gpu_ids:
        return "cuda:" + ",".join(gpu_ids)
    return "cpu" if processes <= 1 else f"cpu × {processes} processes"


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank among a run's processes (0 when it trains alone)."""
    return int((environ if environ is not None else os.environ).get("RANK", "0") or 0)


def _parent_of(pid: int) -> int | None:
    try:
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def supervised_by(owner_pid: int) -> bool:
    """True while ``owner_pid`` is this process's parent, or its grandparent when a launcher sits between."""
    parent = os.getppid()
    if parent == owner_pid:
        return True
    return "LOCAL_RANK" in os.environ and _parent_of(parent) == owner_pid


def exit_with_owner(owner_pid: int, interval: float = 1.0, exit_code: int = 4) -> None:
    """A run whose supervisor died must not train on unobserved: end this process when it goes."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not supervised_by(owner_pid):
                logger.error("supervising process %d is gone; stopping this run", owner_pid)
                os._exit(exit_code)

    threading.Thread(target=watch, daemon=True, name="owner-watch").start()
