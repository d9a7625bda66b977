"""pyproxy's compiled engine as a C extension; every other piece of metadata is in pyproject.toml.

Rules it keeps:
- The engine (`pyproxy/dataplane/_native/engine.c`) is the extension module
  `pyproxy.dataplane._engine`, built by setuptools' build_ext with the compiler it finds
  ($CC, else the one Python was built with), by every way of installing: `pip install .`,
  `pip install -e .` (cmd/setup; the library lands beside engine.py in the checkout),
  `pip wheel .`, an sdist (engine.c is in it: MANIFEST.in) and the Dockerfile's builder stage.
- A missing compiler or missing Python headers fail the install with a message that says
  what to install: never a silent install of the slower pure-Python twin (splice.py).
- The one way to install without the engine is asking for it: PYPROXY_BUILD_ENGINE=0 (the
  twin then serves, `python -m pyproxy.dataplane.compiled` says so, and /metrics shows
  `pyproxy_tcp_relay_info{relay="twin"}`).
- Warnings are errors: -Wall -Wextra -Werror (minus two -Wextra checks that CPython's own
  idioms trip: unused `self`/`args` parameters, and the partial initialisers of PyModuleDef
  and friends). CFLAGS from the environment come first, so CFLAGS="-fsanitize=address" and
  the like add to these; they cannot turn -Werror off.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

OPT_OUT = "PYPROXY_BUILD_ENGINE"
SOURCE = "pyproxy/dataplane/_native/engine.c"
WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Werror"]
HOW_TO_FIX = (
    "Install a C compiler and Python's headers, then install pyproxy again:\n"
    "  Debian/Ubuntu: apt-get install gcc python3-dev\n"
    "  Fedora/RHEL:   dnf install gcc python3-devel\n"
    "  Alpine:        apk add gcc musl-dev python3-dev\n"
    "(a Python built from source, e.g. by pyenv or the python:3.x images, has its headers; it needs gcc).\n"
    f"To install without the engine, set {OPT_OUT}=0: the pure-Python twin then carries every\n"
    "TCP connection (the same behaviour, about 0.6x the engine's connection rate)."
)


class EngineBuildError(PlatformError):
    """The engine cannot be built here; the message says why and what to install."""


def _failure(reason: str) -> EngineBuildError:
    return EngineBuildError(f"pyproxy: cannot build its C engine ({SOURCE}): {reason}.\n{HOW_TO_FIX}")


class BuildEngine(build_ext):
    """build_ext that checks for a compiler and Python.h first, and explains any failure."""

    def build_extension(self, ext: Any) -> None:
        compiler = getattr(self.compiler, "compiler_so", None) or ["cc"]
        if shutil.which(compiler[0]) is None:
            raise _failure(f"no C compiler: {compiler[0]!r} was not found (set by $CC or by Python's build)")
        include = Path(sysconfig.get_paths()["include"])
        if not (include / "Python.h").is_file():
            raise _failure(f"no Python headers: {include / 'Python.h'} is missing")
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError) as err:
            raise _failure(f"the compiler failed ({err}); its output is above") from err


def engine_extensions() -> list[Extension]:
    if os.environ.get(OPT_OUT, "1") == "0":
        return []
    return [Extension("pyproxy.dataplane._engine", sources=[SOURCE], extra_compile_args=WARNINGS)]


setup(ext_modules=engine_extensions(), cmdclass={"build_ext": BuildEngine})
