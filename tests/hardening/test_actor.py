"""The driver's actor (actor.py) on a local socket pair: it must end when its peer does,
whatever step it is at. A hang here reads as a relay's stuck pair in the driver's report."""

from __future__ import annotations

import socket
import threading
import time

from tests.hardening.actor import Actor

DEADLINE = 5.0


def _reset_after_first_byte(peer: socket.socket, done: threading.Event) -> None:
    """Read nothing, wait for the actor's first byte, then close with it unread: an AF_UNIX
    stream peer that closes with unread data gives the other end ECONNRESET."""
    peer.settimeout(DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if peer.recv(1, socket.MSG_PEEK):
            break
    peer.close()
    done.set()


def test_a_reset_seen_during_a_pause_ends_the_actor_with_later_sends_dropped() -> None:
    mine, peer = socket.socketpair()
    done = threading.Event()
    closer = threading.Thread(target=_reset_after_first_byte, args=(peer, done))
    closer.start()
    try:
        # the reset arrives while the actor pauses with nothing queued; the next step queues bytes
        steps = [("send", b"x"), ("pause", 0.3), ("send", b"y" * 100_000), ("pause", 0.01), ("shut", None)]
        started = time.monotonic()
        outcome = Actor(mine, list(steps), started + DEADLINE).run()
    finally:
        closer.join(DEADLINE)
    assert done.is_set()
    assert not outcome.timed_out, "the actor hung after its peer reset"
    assert outcome.reset
    assert outcome.steps_done == len(steps)
    assert time.monotonic() - started < 2.0
