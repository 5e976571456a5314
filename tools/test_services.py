"""Print shell exports pointing the tests at local PostgreSQL/Redis when they answer.

Variables already set are left alone; with neither set nor a local service, the tests fall
back to testcontainers (which needs a Docker engine).
"""

from __future__ import annotations

import os
import shlex
import socket

LOCAL = {
    "COUPON_TEST_DATABASE_URL": (
        "127.0.0.1",
        5432,
        "postgresql://postgres@127.0.0.1:5432/postgres",
    ),
    "COUPON_TEST_REDIS_URL": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0"),
}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def main() -> None:
    for name, (host, port, url) in LOCAL.items():
        if os.environ.get(name):
            continue
        if reachable(host, port):
            print(f"export {name}={shlex.quote(url)}")


if __name__ == "__main__":
    main()
