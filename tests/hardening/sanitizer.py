"""The compiled engine under AddressSanitizer and UndefinedBehaviorSanitizer, kept apart.

Rules kept here:
- The sanitized engine never touches the normal build: `sanitized_tree` copies `pyproxy/`,
  `tests/` and `pyproject.toml` into a temporary directory (no `*.so`, no caches) and
  compiles `engine.c` there with gcc, the normal build's flags (`NORMAL_FLAGS`, those of
  `pyproxy/dataplane/_native/build.py`) plus `SANITIZER_FLAGS`. `compile_engine` is the one
  step to repoint when the engine is built by setuptools.
- CPython is not instrumented: every process runs with gcc's own libasan preloaded
  (`gcc -print-file-name=libasan.so`), which `sanitizer_env` puts in LD_PRELOAD with the
  sanitizer options; the variables are inherited by every process a test spawns
  (`ip netns exec ... python -m pyproxy` included), so children run sanitized too.
- Leaks: LeakSanitizer does not run at exit (CPython leaves much allocated there, and tools
  such as `ip` and `nft` inherit the preload). Instead `sitecustomize.py`, written into the
  tree, registers an atexit hook in the Python processes that ask for it with
  `PYPROXY_LEAK_CHECK=1` (the driver's relay processes, tests/hardening/peer.py): a full
  `gc.collect()`, then `__lsan_do_recoverable_leak_check()` while the interpreter is still
  whole. With `PYTHONMALLOC=malloc` every Python object lives in malloc'd memory that
  LeakSanitizer scans, so what is reachable from the interpreter is not reported, and a
  block the engine allocated and lost (a pair, a held buffer, a plan, or a Python object
  whose reference it leaked) is. No suppressions file: any leak report fails. Why not in
  every process: CPython 3.11 keeps frames in mmap'd chunks LeakSanitizer does not scan, so
  objects held only by a live thread's locals (a test's daemon echo thread at exit) look
  lost; the relay processes end with no thread left running. Stacks are unwound fast
  (frame pointers: CPython has none, so a report's stack is short); to read a report,
  replay with `fast_unwind_on_malloc=0` in ASAN_OPTIONS (about 7x slower).
- Every report goes to a file under the log directory (`log_path`); `reports` reads them
  all, and any file there fails the tier, whatever the exit codes said.
- `python -m tests.hardening.sanitizer [--keep] -- COMMAND...` builds a tree, runs COMMAND
  in it under the sanitizers and exits 1 if it failed or anything was reported (the way
  to run the driver sanitized for longer: see docs/tests.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SOURCE = Path("pyproxy/dataplane/_native/engine.c")
NORMAL_FLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Werror")  # pyproxy/dataplane/_native/build.py's
SANITIZER_FLAGS = ("-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined")
COPIED = ("pyproxy", "tests", "pyproject.toml")

SITECUSTOMIZE = '''\
"""Written by tests/hardening/sanitizer.py: a leak check at exit, while the interpreter is whole."""
import atexit
import ctypes
import gc
import os


def _leak_check():
    try:
        check = ctypes.CDLL(None).__lsan_do_recoverable_leak_check
    except AttributeError:  # no sanitizer runtime in this process
        return
    gc.collect()
    check()


if os.environ.get("PYPROXY_LEAK_CHECK") == "1":
    atexit.register(_leak_check)
'''


@dataclass(frozen=True)
class SanitizedTree:
    root: Path  # the copy: run tests and the driver from here
    logs: Path  # the sanitizers' reports land here
    env: dict[str, str]


def runtime_library(name: str = "libasan.so") -> Path | None:
    """gcc's sanitizer runtime, or None when gcc or the library is missing."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    done = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True, timeout=30)
    path = Path(done.stdout.strip())
    return path.resolve() if done.returncode == 0 and path.is_absolute() and path.exists() else None


def missing_reason() -> str | None:
    """Why the sanitized engine cannot be built here (None: it can)."""
    if shutil.which("gcc") is None:
        return "needs gcc (apt-get install gcc)"
    for name in ("libasan.so", "libubsan.so"):
        if runtime_library(name) is None:
            return f"needs gcc's {name} (apt-get install libasan8 libubsan1, which gcc pulls in)"
    return None


def compile_engine(source: Path, target: Path) -> None:
    """engine.c -> a sanitized extension module at `target` (raises with gcc's output)."""
    include = sysconfig.get_paths()["include"]
    argv = ["gcc", *NORMAL_FLAGS, *SANITIZER_FLAGS, f"-I{include}", str(source), "-o", str(target)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"building the sanitized engine failed: {' '.join(argv)}\n{done.stderr}")


def sanitizer_env(root: Path, logs: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    asan = runtime_library("libasan.so")
    assert asan is not None, missing_reason()
    env.update({
        "LD_PRELOAD": str(asan),
        "ASAN_OPTIONS": ":".join([
            f"log_path={logs}/asan", "detect_leaks=1", "leak_check_at_exit=0", "halt_on_error=1",
            "abort_on_error=0", "exitcode=66", "detect_stack_use_after_return=0", "malloc_context_size=30",
            "fast_unwind_on_malloc=1", "allocator_may_return_null=1",
        ]),
        "LSAN_OPTIONS": "report_objects=0:exitcode=0",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={logs}/ubsan",
        "PYTHONMALLOC": "malloc",
        "PYTHONPATH": str(root),
        "PYPROXY_SANITIZED": "1",
    })
    return env


def sanitized_tree(where: Path | None = None) -> SanitizedTree:
    """A copy of the package and its tests with the sanitized engine built in (see the header)."""
    base = Path(tempfile.mkdtemp(prefix="pyproxy-sanitized-", dir=where))
    root, logs = base / "tree", base / "logs"
    logs.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.tmp", ".mypy_cache", ".pytest_cache")
    root.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    compile_engine(root / ENGINE_SOURCE, root / "pyproxy" / "dataplane" / f"_engine{suffix}")
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return SanitizedTree(root, logs, sanitizer_env(root, logs))


def reports(logs: Path) -> list[str]:
    """Every sanitizer report written under `logs` (a file per process that reported)."""
    found = []
    for path in sorted(logs.glob("*")):
        text = path.read_text(errors="replace").strip()
        if text:
            found.append(f"--- {path.name}\n{text}")
    return found


def remove(tree: SanitizedTree) -> None:
    shutil.rmtree(tree.root.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    keep = "--keep" in args[: args.index("--")] if "--" in args else False
    command = args[args.index("--") + 1:] if "--" in args else []
    if not command:
        print("usage: python -m tests.hardening.sanitizer [--keep] -- COMMAND...", file=sys.stderr)
        return 2
    reason = missing_reason()
    if reason:
        print(f"cannot build the sanitized engine: {reason}", file=sys.stderr)
        return 2
    tree = sanitized_tree()
    print(f"[sanitizer] tree {tree.root}, reports in {tree.logs}", file=sys.stderr, flush=True)
    try:
        code = subprocess.run(command, cwd=tree.root, env=tree.env).returncode
        found = reports(tree.logs)
        for report in found:
            print(report, file=sys.stderr)
        print(f"[sanitizer] exit code {code}, {len(found)} sanitizer report(s)", file=sys.stderr)
        return 1 if code or found else 0
    finally:
        if not keep:
            remove(tree)


if __name__ == "__main__":
    sys.exit(main())
