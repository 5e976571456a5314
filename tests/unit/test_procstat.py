"""harness/procstat.py: CPU read from /proc, for the bench and the scale and side runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from harness.procstat import CpuSample, CpuTrace, core_seconds, cpu_list, machine_seconds


@pytest.mark.parametrize(
    ("text", "cores"),
    [("1", [1]), ("0,1", [0, 1]), ("0-2", [0, 1, 2]), ("3, 0-1", [0, 1, 3]), ("1,1", [1])],
)
def test_a_taskset_list_names_its_cores(text: str, cores: list[int]) -> None:
    assert cpu_list(text) == cores


def test_every_core_together_is_the_machine() -> None:
    every = list(range(os.cpu_count() or 1))

    cores, machine = core_seconds(every), machine_seconds()

    assert cores["total"] == pytest.approx(machine["total"], rel=0.01)
    assert 0 < core_seconds(every[:1])["total"] <= cores["total"]
    assert core_seconds([]) == {"busy": 0.0, "total": 0.0, "irq": 0.0}


def trace_of(*samples: tuple[float, float, float]) -> CpuTrace:
    trace = CpuTrace([], [0, 1])
    trace.samples = [CpuSample(*sample) for sample in samples]
    return trace


def test_a_window_is_read_over_the_samples_that_enclose_it() -> None:
    # at, process seconds, busy seconds of two cores
    trace = trace_of((10.0, 0.0, 0.0), (11.0, 0.2, 1.0), (12.0, 1.2, 2.8), (13.0, 1.3, 3.0))

    server, busy = trace.between(11.0, 12.0) or (0, 0)
    assert (server, busy) == pytest.approx((1.0, 0.9))
    # 10.5 to 12.5: read from 10.0 to 13.0
    assert trace.between(10.5, 12.5) == pytest.approx((1.3 / 3, 3.0 / 3 / 2))


@pytest.mark.parametrize(("start", "end"), [(9.0, 12.0), (10.0, 13.5), (12.0, 11.0)])
def test_a_window_the_trace_does_not_enclose_has_no_figures(start: float, end: float) -> None:
    trace = trace_of((10.0, 0.0, 0.0), (13.0, 1.0, 1.0))

    assert trace.between(start, end) is None


def traced(code: str, core: int | None, seconds: float) -> tuple[tuple[float, float], int]:
    """Python `code` run in a process of its own (pinned to `core` when given) and traced,
    with that core, for `seconds` after a start-up of 0.3 s: what the trace read over all
    of its samples, and how many it took."""
    pin = [] if core is None else ["taskset", "-c", str(core)]
    child = subprocess.Popen([*pin, sys.executable, "-c", code])
    try:
        time.sleep(0.3)  # past its start-up
        with CpuTrace([child.pid], [] if core is None else [core], period=0.05) as trace:
            time.sleep(seconds)
    finally:
        child.kill()
        child.wait()
    used = trace.between(trace.samples[0].at, trace.samples[-1].at)
    assert used is not None
    return used, len(trace.samples)


def test_a_trace_sees_a_busy_process_and_its_core() -> None:
    used, samples = traced("while True: pass", max(os.sched_getaffinity(0)), 1.0)
    # A process spinning for a second on a core of its own: most of a core, and that core
    # mostly busy (not all, on a machine that runs other work too).
    assert used[0] > 0.5
    assert used[1] > 0.5
    assert samples > 5


def test_a_trace_of_a_sleeping_process_sees_it_idle() -> None:
    used, _ = traced("import time; time.sleep(30)", None, 0.5)
    assert used[0] < 0.1
    assert used[1] == 0.0
