"""Build the code cipher's C network (src/coupon/domain/_feistel.c) next to its source.

    python tools/build_feistel.py [SRC_DIR]

`just setup` runs it after `uv sync`, the image's build stage before installing the
project, and the bench on each revision it unpacks. It compiles only when the extension
for this interpreter is missing or older than its source. Without a C compiler, or if the
compiler fails, it says so and exits 0: codes.py then runs the same network in Python,
with the same codes, about five times slower per code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCE = Path("coupon") / "domain" / "_feistel.c"


def extension_path(src_dir: Path) -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return (src_dir / SOURCE).with_name("_feistel" + suffix)


def build(src_dir: Path) -> str | None:
    """What happened, in a few words (built, or why not); None: nothing to do."""
    source = src_dir / SOURCE
    if not source.exists():
        return None  # an older revision, from before the C network
    target = extension_path(src_dir)
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc): codes are made by the Python rounds"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"no Python.h in {include}: codes are made by the Python rounds"
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # two setups at once
    command = [compiler, "-O2", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return f"the C build failed, codes are made by the Python rounds:\n{done.stderr}"
    partial.replace(target)  # never a half-written module for an import to find
    return f"built {target.name}"


def main(argv: list[str]) -> int:
    src_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "src"
    said = build(src_dir)
    if said is not None:
        print(f"code cipher: {said}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
