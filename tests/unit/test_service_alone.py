"""The service is installed, imported and shipped without its load tool: `coupon serve` and
`coupon migrate` load none of it, the service declares none of its dependencies, and the
image is built from the service alone."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# pyqwest is not among them: the Connect library loads it for its client, whoever runs it.
TOOL_ONLY = ("coupon_loadtest", "numpy", "matplotlib", "hdrh", "httpx")


def loaded_modules(code: str) -> set[str]:
    """Top-level modules loaded after running `code` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_serving_loads_none_of_the_load_tool() -> None:
    loaded = loaded_modules(
        "from coupon.entrypoints.cli import build_parser\n"
        "build_parser().parse_args(['serve'])\n"
        "from coupon.entrypoints.app import create_app\n"
        "create_app()\n"
    )

    assert "coupon" in loaded and "litestar" in loaded  # the probe did build the app
    assert loaded.isdisjoint(TOOL_ONLY), loaded & set(TOOL_ONLY)


def test_migrate_loads_none_of_the_load_tool() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "coupon", "migrate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )

    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "coupon.entrypoints.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in TOOL_ONLY}


def test_coupon_loadtest_still_reaches_the_tool_when_it_is_installed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coupon", "loadtest", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: coupon loadtest")
    assert "--herd" in done.stdout


def test_the_service_declares_none_of_the_tools_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        d.split("[")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]
    }

    assert declared.isdisjoint(
        {"numpy", "matplotlib", "hdrhistogram", "pyqwest", "httpx", "protobuf", "msgspec"}
    )
    assert "coupon-loadtest" not in declared


def test_the_image_is_built_from_the_service_alone() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = [
        line.split()[1:-1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    ]

    assert {"loadtest", "harness", "bench", "tests", "tools"} <= ignored
    # Of tools/, only the script that builds the code cipher's C network, which the
    # install then carries; the runtime stage takes the virtual environment alone.
    assert "!tools/build_feistel.py" in ignored
    assert sorted(path for paths in copied for path in paths) == [
        "README.md",
        "pyproject.toml",
        "src",
        "tools/build_feistel.py",
        "uv.lock",
    ]
