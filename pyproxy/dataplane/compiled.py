"""Which compiled helpers this install of pyproxy has, and whether each of them loads.

The compiled helpers are the `pyproxy/dataplane/_<name><EXT_SUFFIX>` libraries: today one,
the engine, a C extension that setup.py declares and every install builds (`pip install .`,
`pip install -e .` in cmd/setup, `pip wheel .`, the Dockerfile's builder stage), or fails
saying what to install; only PYPROXY_BUILD_ENGINE=0 installs without it. Each has a pure-Python
twin that its wrapper (engine.py: splice.py's FastRelay) uses when the import fails, so a
library built for another Python, or against a newer C library than the one it runs on, costs
speed, never service. That fallback is silent by design; this module makes it visible (and
/metrics does, as `pyproxy_tcp_relay_info{relay="twin"}`):

    python -m pyproxy.dataplane.compiled [--require]

prints one line per library found, "loaded" or why not. A library whose name does not end
in this interpreter's EXT_SUFFIX was built for another Python and is never imported, so it
is reported without a try. With `--require` the exit status is 1 when there is no library at
all or any of them does not load: the Dockerfile's runtime stage always asks for that, so
that a mismatch stops the image build with its reason instead of a cluster quietly running
the twins; cmd/setup asks too after its editable install.

Loading here is a trial: each library is initialised as a module object of its own, not
entered in sys.modules, so the wrappers' own imports are unaffected.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Helper:
    file: str  # the library's file name, e.g. _engine.cpython-311-x86_64-linux-gnu.so
    loaded: bool
    reason: str  # why it did not load ("" when it did)


def ext_suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _try_load(path: Path, name: str) -> str:
    """"" when the library at path initialises as module `name`, else the reason it does not."""
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            return "not an importable library"
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # ImportError from dlopen, or anything its init raises
        return f"{type(exc).__name__}: {exc}"
    return ""


def scan(directory: Path = HERE, suffix: str | None = None) -> list[Helper]:
    """Every `_*.so` in directory, each tried (if built for this Python) and reported."""
    want = suffix if suffix is not None else ext_suffix()
    helpers = []
    for path in sorted(directory.glob("_*.so")):
        if not path.name.endswith(want):
            helpers.append(Helper(path.name, False, f"built for another Python (this one loads *{want})"))
            continue
        reason = _try_load(path, path.name[: -len(want)])
        helpers.append(Helper(path.name, not reason, reason))
    return helpers


def main(argv: Sequence[str] | None = None, directory: Path | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyproxy.dataplane.compiled",
        description="Report which compiled helpers of pyproxy's data plane load here.")
    parser.add_argument("--require", action="store_true",
                        help="exit 1 unless there is at least one and every one loads")
    args = parser.parse_args(argv)
    where = directory if directory is not None else HERE
    helpers = scan(where)
    if not helpers:
        print(f"no compiled helpers in {where} (installed with PYPROXY_BUILD_ENGINE=0, or not installed): "
              "the pure-Python twins run")
        return 1 if args.require else 0
    for h in helpers:
        state = "loaded" if h.loaded else f"does not load: {h.reason}; its pure-Python twin runs"
        print(f"compiled helper {h.file}: {state}")
    return 1 if args.require and not all(h.loaded for h in helpers) else 0


if __name__ == "__main__":
    sys.exit(main())
