"""The compiled engine (and, where it shares the flaw, its pure-Python twin) at the edges an
outside review of engine.c found: each case is played by tests/kernel/engine_edges.py in a
namespace of this test's own, removed afterwards, and failed before its fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import private_netns, privileged_reason, skip_or_fail

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]


def play(case: str, *args: str) -> Any:
    reason = privileged_reason()
    if reason:
        skip_or_fail(reason)
    with private_netns(f"pyproxy-edges-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        done = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "tests.kernel.engine_edges", case,
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"rc={done.returncode} " + done.stdout[-1000:] + done.stderr[-2000:]
    return json.loads(done.stdout)


def test_an_event_of_the_old_socket_never_reaches_the_redialed_one() -> None:
    """Before the fix the pair went OPEN on the second attempt's socket, still connecting:
    redials [1], and the client's bytes went nowhere."""
    assert play("stale-redial") == {"redials": [1, 2], "echo": "hello"}


def test_the_twins_poller_never_hands_an_old_sockets_event_to_a_new_one() -> None:
    assert play("stale-poller") == {"calls": ["first", "reused True"]}


@pytest.mark.parametrize("relay", ["engine", "twin"])
def test_a_detach_that_fails_part_way_leaves_every_pair_relayed(relay: str) -> None:
    """Before the fix the pairs handed out before the failure were lost: closed here, their
    dups dropped unclosed, so their peers saw neither data nor an end (engine: 7 of 8)."""
    seen = play("detach-emfile", relay)
    assert seen == {"before": ["before"] * 8, "failed": "EMFILE", "fd_change": 0, "after": ["after"] * 8,
                    "moved": 8}, seen


def test_the_engine_stops_at_its_last_dial_attempt_whatever_redial_answers() -> None:
    """Before the fix the attempt counter indexed the dial queues past their end: the
    engine crashed (SIGSEGV) once a redial() kept answering."""
    assert play("dial-bound") == {"redials": [1, 2], "client": "ConnectionResetError"}


def test_a_callback_cannot_reenter_the_engine() -> None:
    """Before the fix nothing stopped it: close() from closed() closed the epoll set in the
    middle of a batch (and run() from decide() handled events inside a batch)."""
    refused = {"sweep", "flush", "run", "detach", "close_pair", "close_all", "close"}
    expected = {name: "RuntimeError" if name in refused else "ok"
                for name in ("ids", "connections", *sorted(refused))}
    seen = play("reenter")
    assert seen == {"echoes": ["hello", "hello"], "decide": expected, "closed": expected}, seen


@pytest.mark.parametrize("relay", ["engine", "twin"])
def test_a_refused_adoption_closes_every_fd_it_was_given_and_resets_the_peers(relay: str) -> None:
    """Before the fix both relays leaked the fds on these errors (closed 0, the peers left
    waiting), although their caller counts on the relay closing them."""
    reset = "ConnectionResetError"
    expected: dict[str, object] = {
        "pipe-not-brought": {"error": "ValueError", "closed": 2, "peers": [reset, reset]},
        "pipe-as-socket": {"error": "OSError", "closed": 2, "peers": [reset]},
        "not-started": {"error": "RuntimeError", "closed": 2, "peers": [reset, reset]},
    }
    if relay == "engine":
        expected["malformed-direction"] = {"error": "ValueError", "closed": 2, "peers": [reset, reset]}
    assert play("adopt-errors", relay) == expected


@pytest.mark.parametrize("relay", ["engine", "twin"])
def test_sigpipe_at_its_default_does_not_kill_the_relay(relay: str) -> None:
    """Before the fix both died of SIGPIPE (rc 141) at the first splice into the reset
    upstream: they lived only because CPython ignores it."""
    seen = play("sigpipe", relay)
    assert seen["alive"] is True and len(seen["cuts"]) == 5, seen
    assert set(seen["cuts"]) <= {"BrokenPipeError", "ConnectionResetError"}, seen  # each stream was cut


@pytest.mark.parametrize("relay", ["engine", "twin"])
def test_pipes_of_stalled_streams_stay_within_the_budget(relay: str) -> None:
    """Before the fix every splicing direction had a 1 MiB pipe: 6 stalled streams held
    6 MiB of pipe (2.6 to 4.4 MiB filled) where the bound is 2 MiB + 6 x 64 KiB."""
    seen = play("pipes", relay)
    assert seen["pipes"] == 6 and seen["within"] and seen["grown_within_budget"] and seen["grown_after"] == 0, seen


@pytest.mark.parametrize("splice_after", ["-1", "0"])
def test_urgent_data_queued_with_the_fin_is_read_over(splice_after: str) -> None:
    """The review's case, queued whole before the engine reads: before the fix only "AAAA"
    came out (the short read at the urgent mark, with the FIN reported, ended the direction)."""
    assert play("urgent-queued", splice_after) == {"got": "AAAA!CCCC", "end": "eof"}
