"""Which process is this, is that one still alive, and did the kernel's OOM killer act.

A worker records a *worker id* on every run it claims instead of a bare PID: in a container the
app is PID 1 after every restart, so "PID 1 is alive" says nothing about the worker that claimed
a run before the restart. The id is ``<boot id>:<host>:<pid namespace>:<pid>:<start ticks>:<instance>``:

- the boot id changes when the machine reboots;
- the host name and the PID namespace say whether a PID can be looked up from here at all;
- the process start time (clock ticks since boot, ``/proc/<pid>/stat``) tells a restarted process
  that reused the PID from the one that claimed the run;
- the instance part is random per worker, so two workers in one process never share an id.

:func:`worker_alive` answers True / False where this process can tell, and None where it cannot
(another host, or a PID namespace it cannot see into, e.g. the previous life of a restarted
container); callers then go by the run's heartbeat. Imports only the standard library; on systems
without ``/proc`` every answer is None.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class WorkerId:
    """The parts of a worker id; empty strings where this system does not provide them."""

    boot_id: str
    host: str
    pid_namespace: str
    pid: int
    start_ticks: str
    instance: str

    def __str__(self) -> str:
        return ":".join((self.boot_id, self.host, self.pid_namespace, str(self.pid), self.start_ticks, self.instance))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """The kernel's boot id (a new one after every reboot); "" where there is none."""
    return _read(_PROC / "sys/kernel/random/boot_id")


def pid_namespace(pid: int | str = "self") -> str:
    """The inode of a process's PID namespace ("" if unknown): PIDs mean the same only within one."""
    try:
        return str(os.stat(_PROC / str(pid) / "ns/pid").st_ino)
    except OSError:
        return ""


def process_start_ticks(pid: int | str = "self") -> str:
    """When a process started, in clock ticks since boot (field 22 of /proc/<pid>/stat); "" if unknown."""
    stat = _read(_PROC / str(pid) / "stat")
    # The command name (field 2) is in parentheses and may contain spaces: split after its closing one.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def worker_identity(pid: int | None = None, instance: str | None = None) -> WorkerId:
    """The id of a worker in this process (``pid`` defaults to this one; ``instance`` to a fresh random one)."""
    pid = os.getpid() if pid is None else pid
    return WorkerId(
        boot_id=boot_id(), host=socket.gethostname().replace(":", "_"), pid_namespace=pid_namespace(),
        pid=pid, start_ticks=process_start_ticks(pid), instance=instance or uuid.uuid4().hex[:8],
    )


def parse_worker_id(text: str | None) -> WorkerId | None:
    """A stored worker id back as its parts; None for anything that is not one."""
    parts = (text or "").split(":")
    if len(parts) != 6 or not parts[3].isdigit():
        return None
    return WorkerId(parts[0], parts[1], parts[2], int(parts[3]), parts[4], parts[5])


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists here (signal 0 probes without touching it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def worker_alive(worker_id: str | None) -> bool | None:
    """Whether the worker that wrote ``worker_id`` still runs: True, False, or None when this process cannot tell."""
    theirs = parse_worker_id(worker_id)
    if theirs is None:
        return None
    mine = worker_identity(instance="-")
    if not theirs.host or theirs.host != mine.host:
        return None  # another machine or container: only its heartbeat can say
    if theirs.boot_id and mine.boot_id and theirs.boot_id != mine.boot_id:
        return False  # same host, rebooted since: every process of that boot is gone
    if not theirs.pid_namespace or theirs.pid_namespace != mine.pid_namespace:
        return None  # its PIDs are not ours (a restarted container's previous life, a sibling namespace)
    # The same namespace number: ours, or one that is gone and whose number the kernel reused (a live
    # namespace keeps its number), so looking the PID up here is right either way.
    if not theirs.start_ticks or not mine.start_ticks:
        return None  # no /proc here
    # The same PID started at another time is another process (PID 1 after a restart, a reused PID).
    return pid_alive(theirs.pid) and process_start_ticks(theirs.pid) == theirs.start_ticks


# --------------------------------------------------------------------------- the OOM killer


def _memory_cgroup_files() -> list[Path]:
    """Where this process's memory cgroup keeps its OOM-kill counter (cgroup v2, then v1)."""
    candidates: list[Path] = []
    for line in _read(_PROC / "self/cgroup").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates += [_CGROUP_ROOT / relative / "memory.events",
                           _CGROUP_ROOT / "unified" / relative / "memory.events"]
        elif "memory" in controllers.split(","):
            candidates.append(_CGROUP_ROOT / "memory" / relative / "memory.oom_control")
    # Inside a container the cgroup namespace shows "/" while the files sit at the mount's root.
    candidates += [_CGROUP_ROOT / "memory.events", _CGROUP_ROOT / "memory" / "memory.oom_control"]
    return candidates


def oom_kill_count(files: list[Path] | None = None) -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup; None if unknown.

    Read before a child starts and after it died of SIGKILL: only a larger count means "out of memory".
    """
    for path in files if files is not None else _memory_cgroup_files():
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None
