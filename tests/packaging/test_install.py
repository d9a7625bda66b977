"""A plain install of pyproxy builds the compiled engine and loads it, or fails saying why.

What a user does, offline: the project's files as a clean checkout has them (no library built
in the tree) -> an sdist (setuptools' PEP 517 hook) -> `pip wheel` of that sdist with the
venv's setuptools (--no-build-isolation --no-deps: no index needed) -> `pip install` of the
wheel into a fresh venv with nothing else in it -> `python -m pyproxy.dataplane.compiled
--require` there. compiled.py needs only the standard library, so the fresh venv needs none of
the dependencies. A compiler that is not there (CC naming no program) fails `pip install`
with setup.py's message; PYPROXY_BUILD_ENGINE=0 is the one way to a wheel without the engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
PACKAGED = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "pyproxy", "bench")
ENGINE_SOURCE = "pyproxy/dataplane/_native/engine.c"
TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CC", "PYPROXY_BUILD_ENGINE", "PYPROXY_PURE_PYTHON", "PYTHONPATH") and not k.startswith("PIP_")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", **extra}


def _run(argv: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The sdist of a clean copy of this checkout."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    for name in PACKAGED:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.so", "*.egg-info", "out", "results"))
        else:
            shutil.copy2(path, src / name)
    made = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                 "print(b.build_sdist(sys.argv[1]))", str(root / "dist")], src)
    assert made.returncode == 0, made.stderr[-3000:]
    yield root / "dist" / made.stdout.split()[-1]


def _wheel(sdist: Path, out: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out),
                 str(sdist)], out.parent, **extra)


def _fresh_venv_with(wheel: Path, where: Path) -> Path:
    """A venv with no packages but this wheel (installed by the test venv's pip); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=TIMEOUT)
    python = where / "bin" / "python"
    done = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)], where)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def test_the_sdist_carries_the_engine_source_and_no_library(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {ENGINE_SOURCE, "setup.py", "MANIFEST.in", "pyproject.toml"} <= names
    assert not [n for n in names if n.endswith(".so")]


def test_a_plain_install_builds_the_engine_and_it_loads(sdist: Path, tmp_path: Path) -> None:
    compiler = str(sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        skip_or_fail(f"needs a C compiler ({compiler}; apt-get install gcc)")
    built = _wheel(sdist, tmp_path / "wheels")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("pyproxy-*.whl")
    assert "-cp3" in wheel.name and "linux" in wheel.name, wheel.name  # a platform wheel, not py3-none-any
    with zipfile.ZipFile(wheel) as zf:
        libraries = [n for n in zf.namelist() if n.endswith(".so")]
        assert not [n for n in zf.namelist() if "_native" in n]  # the C source stays in the sdist
    assert [n.split(".")[0] for n in libraries] == ["pyproxy/dataplane/_engine"], libraries
    python = _fresh_venv_with(wheel, tmp_path / "venv")
    report = _run([str(python), "-I", "-m", "pyproxy.dataplane.compiled", "--require"], tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert report.stdout.startswith("compiled helper _engine.") and report.stdout.endswith(": loaded\n"), report.stdout
    where = _run([str(python), "-I", "-c", "import pyproxy; print(pyproxy.__file__)"], tmp_path).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where  # the installed copy, not this checkout


def test_a_missing_compiler_fails_the_install_saying_what_to_install(sdist: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                      "--target", str(target), str(sdist)], tmp_path, CC=str(tmp_path / "no-such-cc"))
    output = installed.stdout + installed.stderr
    assert installed.returncode != 0, output[-3000:]
    assert not (target / "pyproxy").exists()  # nothing installed: no twin in place of the engine
    assert f"pyproxy: cannot build its C engine ({ENGINE_SOURCE}): no C compiler: " in output, output[-3000:]
    assert "no-such-cc" in output
    assert "apt-get install gcc python3-dev" in output and "PYPROXY_BUILD_ENGINE=0" in output


def test_the_explicit_opt_out_installs_the_twin_and_says_so(sdist: Path, tmp_path: Path) -> None:
    built = _wheel(sdist, tmp_path / "wheels", CC=str(tmp_path / "no-such-cc"), PYPROXY_BUILD_ENGINE="0")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("pyproxy-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    python = _fresh_venv_with(wheel, tmp_path / "venv")
    required = _run([str(python), "-I", "-m", "pyproxy.dataplane.compiled", "--require"], tmp_path)
    assert required.returncode == 1 and "the pure-Python twins run" in required.stdout, required.stdout
