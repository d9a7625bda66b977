"""Urgent data (MSG_OOB) through both relays: every byte arrives, in order, with a clean end.

A read stops at the urgent mark, and `splice` never steps over it (even with SO_OOBINLINE:
only a `recv` does), so a relay that took the short read at the mark for "drained", or the
splice's 0 there for the EOF, lost the rest of the stream and then reset the connection
(measured through `pyproxy --manifests`: "AAAA", one urgent byte, "CCCC", FIN gave back only
"AAAA"; 1 MiB, an urgent byte, 1 MiB, FIN lost the second MiB). The relays pass the urgent
byte in band (docs/behaviour.md). tests/kernel/urgent.py plays each case, both ways at once,
in copy mode, copy-then-splice and splice from the first byte, with and without a FIN, in a
namespace of this test's own.
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
def test_urgent_data_arrives_in_band_in_order_with_a_clean_end(relay: str) -> None:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"pyproxy-urgent-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        done = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "tests.kernel.urgent", relay],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    cases = json.loads(done.stdout)
    assert len(cases) == 18
    wrong = {}
    for case, seen in cases.items():
        end = "eof" if case.endswith("-fin") else "none"
        if seen != {**seen, "client_bytes_ok": True, "backend_bytes_ok": True,
                    "client_end": end, "backend_end": end} or any("error" in key for key in seen):
            wrong[case] = seen
    assert not wrong, wrong
