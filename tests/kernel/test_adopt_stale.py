"""A pair taken up in a hand-over ends while the predecessor still holds its sockets: nothing
of it may reach the next connection.

Found as a rare reset of a new connection during hand-overs (test_handover.py, the twin):
closing an fd takes it out of an epoll set only with the socket's last reference, and an
adopted pair's sockets live on in the predecessor's dups until it hears "done" (for good,
after a refused hand-over). The pair's registrations outlived it, and an error on the old
client's socket reached the next socket given the same fd number (the twin) or the next pair
given the same struct (the engine). tests/kernel/adopt_stale.py plays that story 20 times
per relay in a namespace of this test's own: before the fix, 19 of 20 new connections of the
twin were reset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import private_netns, privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("relay", ["engine", "twin"])
def test_the_next_connection_never_sees_an_adopted_pairs_sockets(relay: str) -> None:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"pyproxy-stale-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        done = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "tests.kernel.adopt_stale", relay],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    rounds = json.loads(done.stdout)
    assert len(rounds) == 20
    for seen in rounds:
        assert (seen["old_echo"], seen["first"], seen["second"]) == ("old\n", "first\n", "second\n"), seen
