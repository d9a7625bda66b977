"""Rebuilds the engine in this checkout, in place, as pip's editable install does (a dev shortcut).

    python pyproxy/dataplane/_native/build.py [--force]

runs `python setup.py build_ext --inplace` at the checkout's root: the same Extension, flags
and checks as `pip install`/`pip install -e .` (setup.py), so that
`pyproxy/dataplane/_engine<EXT_SUFFIX>` matches engine.c after an edit, without reinstalling
the package. build_ext skips a library newer than its source; --force rebuilds anyway.
CFLAGS/LDFLAGS from the environment add to the flags (e.g. a sanitizer build). The exit
status is build_ext's: a missing compiler fails here as it fails an install.
It is not part of the package (pyproject.toml excludes `_native`); cmd/setup does not call it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def build(force: bool = False) -> int:
    argv = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", *(["--force"] if force else [])]
    return subprocess.run(argv, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(build("--force" in sys.argv[1:]))
