"""The hardening driver (driver.py) through each relay: the compiled engine on uvloop, and its
pure-Python twin on uvloop and on asyncio. Thousands of seeded random connections (every
byte compared), resets at every stage, dead and slow endpoints, redials, hand-overs under a
squeezed fd limit, bad adopts; no fd or memory growth after. Each run makes and removes a
network namespace of its own.

PYPROXY_HARDENING_SECONDS (default 30) and PYPROXY_HARDENING_SEED (default 1) set the
length and the seed; a failure prints the command that replays it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("PYPROXY_HARDENING_SECONDS", "30"))
SEED = int(os.environ.get("PYPROXY_HARDENING_SEED", "1"))
VARIANTS = {
    "engine-uvloop": ("--relay", "engine", "--loop", "uvloop"),
    "twin-uvloop": ("--relay", "twin", "--loop", "uvloop"),
    "twin-asyncio": ("--relay", "twin", "--loop", "asyncio"),
}


def run_driver(args: tuple[str, ...], seconds: float, cwd: Path = ROOT,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.hardening.driver", *args, "--seconds", str(seconds),
                           "--seed", str(SEED)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=seconds + 400)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_connections_deliver_every_byte_and_leave_nothing_behind(variant: str) -> None:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    if variant.startswith("engine"):
        from pyproxy.dataplane import engine
        if not engine.AVAILABLE:
            skip_or_fail("the compiled engine is not built (python pyproxy/dataplane/_native/build.py)")
    done = run_driver(VARIANTS[variant], SECONDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
