"""Builds the compiled helpers of `pyproxy/dataplane` (run by cmd/setup, with the venv's python).

`python pyproxy/dataplane/_native/build.py` compiles `engine.c` into
`pyproxy/dataplane/_engine<EXT_SUFFIX>` with gcc (or $CC) when the library is missing or
older than its source; prints what it did. Without a compiler it says so and exits 0: the
relay is then the engine's pure-Python twin (splice.py), which is slower, not different.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = {"_engine": HERE / "engine.c"}


def build(force: bool = False) -> int:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        print("[native] no C compiler: the relay is the engine's pure-Python twin", file=sys.stderr)
        return 0
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for name, source in SOURCES.items():
        target = HERE.parent / f"{name}{suffix}"
        if not force and target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        tmp = target.with_suffix(".tmp")
        argv = [cc, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{include}", str(source), "-o", str(tmp)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"[native] building {name} failed:\n{done.stderr}", file=sys.stderr)
            tmp.unlink(missing_ok=True)
            return 1
        tmp.replace(target)
        print(f"[native] built {target.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(build("--force" in sys.argv[1:]))
