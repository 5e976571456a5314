"""Whether a file can be written where a command was told to write it, asked before the
command does any work: `coupon campaigns export -o` and `coupon loadtest --report/--chart`
refuse a missing folder (rather than create it: a typo then costs nothing), a file the user
may not write, or a folder where they may not create one, in one line."""

from __future__ import annotations

import os
from pathlib import Path


def cannot_write(target: Path) -> str | None:
    """Why `target` cannot become a file in an existing folder, naming it; None if it can."""
    if target.is_dir():
        return f"cannot write {target}: it is a directory"
    parent = target.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist"
        return f"cannot write {target}: its directory {parent} {problem}"
    if target.exists():
        # A read-only file is the user's "do not overwrite" (a shell's `>` refuses it too).
        if not os.access(target, os.W_OK):
            return f"cannot write {target}: it is read-only to you (permission denied)"
    elif not can_create_in(parent):
        return directory_not_writable(target, parent)
    return None


def can_create_in(folder: Path) -> bool:
    """Whether the user may create (and rename) files in `folder`."""
    return os.access(folder, os.W_OK | os.X_OK)


def directory_not_writable(target: Path, folder: Path) -> str:
    return f"cannot write {target}: its directory {folder} is read-only to you (permission denied)"
