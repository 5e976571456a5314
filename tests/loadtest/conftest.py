"""What the load tool's end-to-end tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.server import ServerProcess


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server, serving from memory, for one test."""
    with ServerProcess(env={}, in_memory=True, log_dir=tmp_path) as server:
        yield server
