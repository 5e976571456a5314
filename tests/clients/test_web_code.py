"""The example page's bundle and the ECMAScript code are committed (the service and its
Docker image serve the page without Node); these tests rebuild both from their sources and
fail when what is committed has drifted: run `npm run gen` and `npm run build:example`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from coupon.entrypoints.app import EXAMPLE_PAGE
from tests.clients.conftest import ROOT, need_node_packages

BUNDLE = ROOT / "src" / "coupon" / "entrypoints" / "static" / "example" / "app.js"


def npm(*args: str) -> None:
    need_node_packages()
    path = f"{ROOT / 'node_modules' / '.bin'}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(
        ["npm", "run", "-s", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path},
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_committed_bundle_is_built_from_web_example(tmp_path: Path) -> None:
    fresh = tmp_path / "app.js"
    npm("build:example", "--", f"--outfile={fresh}")
    assert fresh.read_bytes() == BUNDLE.read_bytes(), "run `npm run build:example`"


def test_the_committed_es_code_is_generated_from_the_proto(tmp_path: Path) -> None:
    npm("gen", "--", "-o", str(tmp_path))
    committed = sorted(
        p.relative_to(ROOT / "web" / "gen") for p in (ROOT / "web/gen").rglob("*.js")
    )
    fresh = sorted(p.relative_to(tmp_path / "web" / "gen") for p in tmp_path.rglob("*.js"))
    assert fresh == committed and fresh, "run `npm run gen`"
    for path in fresh:
        assert (tmp_path / "web" / "gen" / path).read_bytes() == (
            ROOT / "web" / "gen" / path
        ).read_bytes(), f"{path}: run `npm run gen`"


def test_the_page_and_its_script_are_in_the_package() -> None:
    assert (EXAMPLE_PAGE / "index.html").is_file() and (EXAMPLE_PAGE / "app.js").is_file()
