"""Whether a file can be written where a command was told to write it, asked before the
command does any work: `coupon campaigns export -o` and `coupon loadtest --report/--chart`
refuse a missing folder (rather than create it: a typo then costs nothing) in one line."""

from __future__ import annotations

from pathlib import Path


def cannot_write(target: Path) -> str | None:
    """Why `target` cannot become a file in an existing folder, naming it; None if it can."""
    if target.is_dir():
        return f"cannot write {target}: it is a directory"
    parent = target.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        return f"cannot write {target}: its directory {parent} {problem}"
    return None
