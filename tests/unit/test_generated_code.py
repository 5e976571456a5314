"""The committed generated code is what `just gen` makes from proto/ today."""

from __future__ import annotations

import filecmp
from pathlib import Path

from tools.gen import TARGET, generate


def differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [f"{a}/{n}" for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.common_dirs:
        found += differences(a / sub, b / sub)
    # dircmp compares shallowly (size, mtime); compare contents to be sure.
    for name in cmp.same_files:
        if (a / name).read_bytes() != (b / name).read_bytes():
            found.append(f"{a}/{name}")
    return found


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    generate(tmp_path)
    stale = differences(TARGET, tmp_path)
    assert not stale, f"run `just gen`: {stale}"
