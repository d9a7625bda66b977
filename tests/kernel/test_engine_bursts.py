"""A burst that is already queued when the compiled engine reads comes out whole.

The engine's sockets are edge-triggered (engine.c's header): a burst that lands while the
engine is busy elsewhere brings one edge, whatever its size. A read that stops with bytes
left must therefore look again by itself; each case below stops at one of the three places
where it does (tests/kernel/engine_bursts.py drives the engine by hand, in a namespace of
this test's own, removed afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import private_netns, privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]
BURST = 1 << 20

CASES = {
    # a fresh direction copies; its first full read starts splicing and ends the read
    "copy-then-splice": (64 * 1024, 1 << 20),
    # copying only: the read stops after its four rounds of 64 KiB
    "copy-only": (-1, 1 << 20),
    # splicing from the start through 64 KiB pipes: the read stops after its four rounds
    "splice-only": (0, 64 * 1024),
}


@pytest.fixture
def netns() -> Iterator[str]:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"pyproxy-bursts-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        yield name


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_queued_burst_comes_out_whole(netns: str, case: str) -> None:
    splice_after, pipe_size = CASES[case]
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.kernel.engine_bursts",
                           str(splice_after), str(pipe_size), str(BURST)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"up": BURST, "down": BURST, "eof": False}, done.stdout


# Replies that end with the endpoint's FIN, queued with it: one short read, a full read then
# a short one, and a burst through the splice path. The engine ends a direction on a short
# read when the event reported the FIN: every byte must still come out first, then the EOF.
FIN_CASES = {"one-read": (-1, 1000), "full-then-short": (-1, 64 * 1024 + 4321), "splice": (0, BURST)}


@pytest.mark.parametrize("case", sorted(FIN_CASES))
def test_a_reply_queued_with_its_fin_comes_out_whole_then_ends(netns: str, case: str) -> None:
    splice_after, size = FIN_CASES[case]
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.kernel.engine_bursts",
                           str(splice_after), str(1 << 20), str(size), "fin"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"up": size, "down": size, "eof": True}, done.stdout
