"""The connection budget's arithmetic, and the open files limit raised at start."""

from __future__ import annotations

import subprocess
import sys

from uvicorn.server import ServerState

from coupon.entrypoints.http.budget import ConnectionBudget, reserve_of


def test_a_tenth_is_kept_for_the_worker_itself_and_at_least_256() -> None:
    assert reserve_of(20_000) == 2_000
    assert reserve_of(1_024) == 256
    assert ConnectionBudget(ServerState(), 20_000).size == 18_000
    assert ConnectionBudget(ServerState(), 1_024).size == 768


def test_so_few_files_leave_half_to_connections() -> None:
    assert ConnectionBudget(ServerState(), 300).size == 150


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "from coupon.entrypoints.http.budget import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        ["prlimit", "--nofile=100:400", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["400", "400"]
