"""`just cluster-demo`, as the README shows it: it must run to its verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from harness.services import TestServices
from tests.cluster.conftest import needs_redis_server

pytestmark = [pytest.mark.e2e, needs_redis_server]
REPO = Path(__file__).resolve().parents[2]


def test_the_cluster_demo_runs_both_rounds_and_finds_every_invariant_held(
    services: TestServices,
) -> None:
    # The demo makes and drops a database of its own on this PostgreSQL server.
    server = urlunsplit(urlsplit(services.database_url)._replace(path="/postgres"))
    done = subprocess.run(
        [sys.executable, "-m", "tools.cluster_demo", "--postgres", server],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "master m0 is killed mid-run" in done.stdout
    assert done.stdout.rstrip().endswith("all invariants hold"), done.stdout[-2000:]
