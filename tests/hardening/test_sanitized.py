"""The compiled engine built with -fsanitize=address,undefined (sanitizer.py), under the kernel
tier's engine tests and the hardening driver: both must pass with no sanitizer report.

The kernel tests run in a copy of the tree that holds the sanitized engine, with gcc's
libasan preloaded into every process they start (their pyproxy processes included), and
only their engine variants (the twins run no C). The driver's relay processes also run
LeakSanitizer's check at exit. Any report file fails the test, whatever the exit codes.
PYPROXY_HARDENING_SANITIZED_SECONDS (default 45) sets the driver's length.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import privileged_reason, skip_or_fail
from tests.hardening import sanitizer
from tests.hardening.test_driver import run_driver

pytestmark = pytest.mark.privileged

SECONDS = float(os.environ.get("PYPROXY_HARDENING_SANITIZED_SECONDS", "45"))
# the kernel tier's tests of the engine; -k keeps their engine variants
KERNEL_TESTS = ("tests/kernel/test_engine_bursts.py", "tests/kernel/test_engine_plans.py",
                "tests/kernel/test_adopt_stale.py", "tests/kernel/test_move_relays.py", "tests/kernel/test_relay.py")
ENGINE_ONLY = "not twin and not pure"


@pytest.fixture(scope="module")
def tree() -> Iterator[sanitizer.SanitizedTree]:
    reason = privileged_reason() or sanitizer.missing_reason()
    if reason:
        skip_or_fail(reason)
    built = sanitizer.sanitized_tree()
    try:
        yield built
    finally:
        sanitizer.remove(built)


def no_reports(tree: sanitizer.SanitizedTree) -> None:
    found = sanitizer.reports(tree.logs)
    for path in tree.logs.glob("*"):
        path.unlink()
    assert not found, "\n".join(found)[-12000:]


def test_the_kernel_tiers_engine_tests_pass_sanitized(tree: sanitizer.SanitizedTree) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", ENGINE_ONLY,
                           *KERNEL_TESTS], cwd=tree.root, env=tree.env, capture_output=True, text=True, timeout=1800)
    reports = sanitizer.reports(tree.logs)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:] + "\n".join(reports)[-6000:]
    assert "passed" in done.stdout and " 0 passed" not in done.stdout, done.stdout[-2000:]
    no_reports(tree)


def test_the_driver_passes_sanitized(tree: sanitizer.SanitizedTree) -> None:
    done = run_driver(("--relay", "engine", "--loop", "uvloop"), SECONDS, cwd=tree.root, env=tree.env)
    reports = sanitizer.reports(tree.logs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:] + "\n".join(reports)[-6000:]
    no_reports(tree)
