"""What the bench keeps outside its processes: its database and Redis keys, the audit of
its campaigns, where a run came from, and the run file it writes."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

from bench.generators import REPO, BenchBroke
from coupon_loadtest import audit
from harness.procstat import machine_seconds

# Run files: ignored by git. A person copies the latest table into docs/performance.md.
RESULTS_DIR = REPO / "bench" / "results"

DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/coupon_bench"
ADMIN_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_PREFIX = "coupon-bench"


def server_env(source: Path | None, token: str, database_url: str = DATABASE_URL) -> dict[str, str]:
    """Servers import `coupon` from `source` when given (before the editable install), and
    `bench` from this repository."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "COUPON_REDIS_PREFIX": REDIS_PREFIX,
        "COUPON_BACKEND": "postgres",
        # A token of our own: the admin RPCs work whatever APP_ENV says.
        "COUPON_ADMIN_TOKEN": token,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(source or ""), str(REPO), os.environ.get("PYTHONPATH")])
        ),
    }


def post_campaign(url: str, token: str, name: str, total: int) -> tuple[str, datetime]:
    """CreateCampaign (Connect JSON) of a campaign that started a minute ago: its id and
    starts_at."""
    starts_at = datetime.now(UTC) - timedelta(minutes=1)
    answer = httpx.post(
        f"{url}/coupon.v1.CouponService/CreateCampaign",
        json={
            "name": name,
            "totalCoupons": total,
            "startsAt": starts_at.isoformat().replace("+00:00", "Z"),
        },
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    if answer.status_code != 200:
        raise BenchBroke(f"CreateCampaign: HTTP {answer.status_code} {answer.text[:300]}")
    return str(answer.json()["campaign"]["id"]), starts_at


def delete_redis_keys(prefix: str = REDIS_PREFIX) -> int:
    """Delete the Redis keys under `prefix:` (the bench's own) and nothing else."""
    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


async def drop_database() -> None:
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await admin.execute("DROP DATABASE IF EXISTS coupon_bench WITH (FORCE)")
    finally:
        await admin.close()


@contextmanager
def bench_state() -> Iterator[None]:
    """A fresh bench database and no bench keys in Redis; the keys go again at the end."""
    asyncio.run(drop_database())
    delete_redis_keys()
    try:
        yield
    finally:
        deleted = delete_redis_keys()
        print(f"deleted {deleted} Redis keys under '{REDIS_PREFIX}:'", flush=True)


@dataclass
class Verdict:
    name: str
    rule: str
    ok: bool
    detail: str


async def verify(campaigns: dict[str, str], acks: dict[str, int]) -> list[Verdict]:
    """I1-I4 of every bench campaign (phase key -> id) from PostgreSQL, with the auditor of
    the load tool, and every acknowledged coupon stored (rows >= 2xx answers counted)."""
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        audits = {
            key: await audit.audit_campaign(conn, cid, acknowledged=acks.get(cid, 0))
            for key, cid in campaigns.items()
        }
    finally:
        await conn.close()
    verdicts: dict[str, Verdict] = {}
    for key, found in audits.items():
        for finding in found.findings():
            verdict = verdicts.setdefault(
                finding.name, Verdict(finding.name, finding.rule, True, "")
            )
            verdict.ok = verdict.ok and finding.ok
            verdict.detail += ("; " if verdict.detail else "") + f"({key}) {finding.detail}"
    return list(verdicts.values())


# --- where a run came from ----------------------------------------------------------------


def git_commit() -> tuple[str, bool]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # What the servers run: src/ differing from the commit, new files included.
    dirty = bool(git("status", "--porcelain", "--", "src"))
    return commit, dirty


def commit_label(meta: dict[str, Any]) -> str:
    return f"{meta['commit']}" + " (+uncommitted src/ changes)" * bool(meta["dirty"])


def checkout_source(ref: str, into: Path) -> tuple[str, Path]:
    """src/ as committed at `ref`, unpacked under `into` (git archive: the repository and
    the working tree are untouched); its short commit and the directory to import from."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchBroke(f"--ref {ref}: {done.stderr.strip()}")
    commit = done.stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit, "src"], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    build_code_cipher(into / "src")
    return commit, into / "src"


def build_code_cipher(src: Path, python: str = sys.executable) -> None:
    """The code cipher's C network of the source under `src`, for the interpreter `python`,
    as `just setup` builds the working tree's (revisions from before it have none): a
    comparison must not set C against Python rounds."""
    builder = REPO / "tools" / "build_feistel.py"
    subprocess.run([python, str(builder), str(src)], check=True)


def base_meta(recipe: str, argv: list[str] | None, commit: str, dirty: bool) -> dict[str, Any]:
    """What every recorded run says of itself: when, which commit, which command, cores."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "dirty": dirty,
        "command": shlex.join(["just", recipe, *(sys.argv[1:] if argv is None else argv)]),
        "cores": os.cpu_count(),
    }


def background_load(seconds: float = 2.0) -> float:
    """Cores the machine is busy with before the bench starts anything (others' work)."""
    busy = machine_seconds()["busy"]
    time.sleep(seconds)
    return (machine_seconds()["busy"] - busy) / seconds


def allow_open_files(connections: int) -> None:
    """Room for the generators' sockets and the servers' (children inherit the limit): the
    soft limit on open files raised as far as the hard one allows, when it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def write_run(document: dict[str, Any], suffix: str = "") -> Path:
    """The run's JSON under bench/results/ (ignored by git)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}-{document['commit']}{suffix}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def new_token() -> str:
    return uuid.uuid4().hex
