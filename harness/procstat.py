"""CPU time and memory of processes, read from /proc (Linux only, no dependencies)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads so far (0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / TICKS


def all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def command_name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker, which the server's worker start-up leaves beside
    the workers."""
    try:
        return b"resource_tracker" in (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def workers(root: int) -> list[int]:
    """The server's worker processes below its main process `root`."""
    return [pid for pid in descendants(root) if not is_resource_tracker(pid)]


def named(prefix: str) -> list[int]:
    """Processes whose command name starts with `prefix` (e.g. every PostgreSQL backend)."""
    return [pid for pid in all_pids() if command_name(pid).startswith(prefix)]


def memory_mib(pid: int) -> dict[str, float]:
    """Resident set now (VmRSS) and its peak (VmHWM), in MiB."""
    values: dict[str, float] = {}
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values["rss" if key == "VmRSS" else "peak"] = int(rest.split()[0]) / 1024
    return values


def _seconds(fields: list[str]) -> dict[str, float]:
    """`busy`, `total` and `irq` CPU seconds of a /proc/stat cpu line's fields."""
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return {
        "busy": (total - ticks[3] - ticks[4]) / TICKS,
        "total": total / TICKS,
        "irq": (ticks[5] + ticks[6]) / TICKS,
    }


def machine_seconds() -> dict[str, float]:
    """CPU seconds of the whole machine since boot, over all cores: `busy`, `total`, and
    `irq` (hard and soft interrupts, where loopback networking partly runs)."""
    return _seconds((PROC / "stat").read_text().splitlines()[0].split()[1:])


def core_seconds(cores: list[int]) -> dict[str, float]:
    """The same as `machine_seconds`, summed over the given cores only (`cpu<N>` lines)."""
    wanted = {f"cpu{core}" for core in cores}
    summed = {"busy": 0.0, "total": 0.0, "irq": 0.0}
    for line in (PROC / "stat").read_text().splitlines()[1:]:
        name, _, rest = line.partition(" ")
        if name in wanted:
            for key, value in _seconds(rest.split()).items():
                summed[key] += value
    return summed


def cpu_list(text: str) -> list[int]:
    """The cores of a `taskset -c` list such as '1' or '0,2-3'."""
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return sorted(cores)


@dataclass
class CpuSnapshot:
    """CPU seconds so far of every process (and of named groups of them), and of the
    machine."""

    groups: dict[str, list[int]]
    processes: dict[int, float]
    machine: dict[str, float]

    @classmethod
    def take(cls, groups: dict[str, list[int]]) -> CpuSnapshot:
        machine = machine_seconds()
        processes = {pid: cpu_seconds(pid) for pid in all_pids()}
        return cls(groups, processes, machine)

    def _since(self, start: CpuSnapshot, pid: int) -> float:
        return max(0.0, self.processes.get(pid, 0.0) - start.processes.get(pid, 0.0))

    def cores_used_since(
        self, start: CpuSnapshot, wall_seconds: float, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Average cores each group used between `start` and this snapshot (processes that
        appeared in between count from zero, processes that ended in between are missed;
        `extra` adds CPU seconds measured otherwise, e.g. a reaped child's rusage).
        `other` is what no group accounts for: other processes and interrupts."""
        used = {name: seconds / wall_seconds for name, seconds in (extra or {}).items()}
        for name, pids in self.groups.items():
            used[name] = sum(self._since(start, pid) for pid in pids) / wall_seconds
        machine = (self.machine["busy"] - start.machine["busy"]) / wall_seconds
        used["other"] = max(0.0, machine - sum(used.values()))
        used["machine"] = machine
        # Interrupt time: on this kernel already inside the processes' times, so only told.
        used["irq"] = (self.machine["irq"] - start.machine["irq"]) / wall_seconds
        # Two readings of /proc/stat a tick apart can leave a hair below zero: none idle.
        used["idle"] = max(
            0.0, (self.machine["total"] - start.machine["total"]) / wall_seconds - machine
        )
        return used

    def top_others(
        self, start: CpuSnapshot, wall_seconds: float, count: int = 3
    ) -> list[tuple[str, float]]:
        """The biggest users of CPU outside the groups: (command[pid], cores)."""
        grouped = {pid for pids in self.groups.values() for pid in pids}
        users = [
            (f"{command_name(pid) or '?'}[{pid}]", self._since(start, pid) / wall_seconds)
            for pid in self.processes
            if pid not in grouped
        ]
        users.sort(key=lambda item: item[1], reverse=True)
        return [(name, cores) for name, cores in users[:count] if cores >= 0.01]


@dataclass(frozen=True)
class CpuSample:
    at: float  # wall clock, time.time()
    processes: float  # CPU seconds so far of the traced processes
    cores: float  # busy seconds so far of the traced cores


class CpuTrace:
    """Samples the CPU of some processes and how busy some cores are, every `period`
    seconds from a thread of its own while in its `with` block, so that a window learnt
    only afterwards (from a report's timestamps) can be read: `between(start, end)`."""

    def __init__(self, pids: list[int], cores: list[int], period: float = 0.1) -> None:
        self._pids = pids
        self._cores = cores
        self._period = period
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-trace", daemon=True)

    def sample(self) -> None:
        self.samples.append(
            CpuSample(
                time.time(),
                sum(cpu_seconds(pid) for pid in self._pids),
                core_seconds(self._cores)["busy"],
            )
        )

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.sample()

    def __enter__(self) -> CpuTrace:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def between(self, start: float, end: float) -> tuple[float, float] | None:
        """Over the samples that enclose [start, end] (the last at or before `start` to the
        first at or after `end`): the cores the processes used, and the share of the
        traced cores that was busy. None when the trace does not enclose the window."""
        before = [s for s in self.samples if s.at <= start]
        after = [s for s in self.samples if s.at >= end]
        if not before or not after or end <= start:
            return None
        first, last = before[-1], after[0]
        wall = last.at - first.at
        return (
            (last.processes - first.processes) / wall,
            (last.cores - first.cores) / wall / max(1, len(self._cores)),
        )
