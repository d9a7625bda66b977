"""The compiled helpers' report (dataplane/compiled.py) and the fallback it makes visible:
a library that does not load leaves its pure-Python twin running (splice.py's FastRelay)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyproxy.dataplane import compiled, engine

SUFFIX = compiled.ext_suffix()
PACKAGE = Path(compiled.__file__).resolve().parents[1]


def test_the_engine_built_by_setup_loads_and_is_the_one_used() -> None:
    helpers = {h.file: h for h in compiled.scan()}
    assert helpers == {f"_engine{SUFFIX}": compiled.Helper(f"_engine{SUFFIX}", True, "")}
    assert engine.AVAILABLE is (os.environ.get("PYPROXY_PURE_PYTHON") != "1")


def test_a_library_that_does_not_load_is_reported_with_the_loaders_reason(tmp_path: Path) -> None:
    (tmp_path / f"_broken{SUFFIX}").write_bytes(b"not a shared object")
    (tmp_path / "_other.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    broken, other = compiled.scan(tmp_path)
    assert (broken.file, broken.loaded) == (f"_broken{SUFFIX}", False)
    assert broken.reason.startswith("ImportError: ") and "_broken" in broken.reason
    assert (other.loaded, other.reason) == (False, f"built for another Python (this one loads *{SUFFIX})")


def test_require_fails_on_none_or_a_broken_one_and_passes_on_the_built_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compiled.main(["--require"], tmp_path) == 1
    assert compiled.main([], tmp_path) == 0
    assert "no compiled helpers in" in capsys.readouterr().out
    shutil.copy2(PACKAGE / "dataplane" / f"_engine{SUFFIX}", tmp_path)
    assert compiled.main(["--require"], tmp_path) == 0
    assert capsys.readouterr().out == f"compiled helper _engine{SUFFIX}: loaded\n"
    (tmp_path / f"_broken{SUFFIX}").write_bytes(b"\x7fELF truncated")
    assert compiled.main(["--require"], tmp_path) == 1
    assert "_broken" in capsys.readouterr().out


def test_the_relay_falls_back_to_its_twin_when_the_engine_does_not_load(tmp_path: Path) -> None:
    """A tree like an install whose _engine was built for a C library it does not have."""
    pkg = tmp_path / "pyproxy"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("_*.so", "__pycache__"))
    (pkg / "dataplane" / f"_engine{SUFFIX}").write_bytes(b"\x7fELF truncated")
    env = {k: v for k, v in os.environ.items() if k != "PYPROXY_PURE_PYTHON"}
    script = ("from pyproxy.dataplane import engine, splice\n"
              "from pyproxy.dataplane.stats import DataplaneStats\n"
              "from pyproxy.model.table import ServiceTable\n"
              "relay = splice.make_splice_relay(ServiceTable('n'), lambda ip: False, DataplaneStats())\n"
              "print(engine.__file__, engine.AVAILABLE, type(relay).__name__)")
    out = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert out == [str(pkg / "dataplane" / "engine.py"), "False", "FastRelay"]
