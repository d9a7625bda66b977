"""The splice relay's copy-or-splice decision (model/copymode.py) and the pure-Python twin's
copy step (dataplane/copystep.py; the engine's is C, held to the same rules end to end)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from pyproxy.dataplane import copystep
from pyproxy.model.copymode import SPLICE_NOW, CopyPolicy

KIB = 1024


def feed(policy: CopyPolicy, reads: list[int]) -> int | None:
    """The read (1-based) after which the direction splices, or None."""
    streak = 0
    for i, n in enumerate(reads, 1):
        streak = policy.copy_read(streak, n)
        if streak == SPLICE_NOW:
            return i
    return None


def test_small_messages_never_splice_however_many() -> None:
    assert feed(CopyPolicy(), [200] * 100_000) is None  # 20 MB of 200-byte messages


def test_a_bulk_streak_splices_once_it_reaches_splice_after() -> None:
    assert feed(CopyPolicy(splice_after=64 * KIB), [64 * KIB]) == 1
    assert feed(CopyPolicy(splice_after=64 * KIB), [16 * KIB] * 8) == 4


def test_a_short_read_ends_the_streak() -> None:
    reads = [32 * KIB, 100, 32 * KIB, 100, 32 * KIB, 32 * KIB]
    assert feed(CopyPolicy(splice_after=64 * KIB), reads) == 6


def test_negative_splice_after_never_splices_and_zero_splices_first() -> None:
    assert feed(CopyPolicy(splice_after=-1), [64 * KIB] * 100) is None
    assert CopyPolicy(splice_after=0).splice_first and not CopyPolicy().splice_first


def test_small_splice_rounds_in_a_row_go_back_to_copy() -> None:
    policy = CopyPolicy(copy_after=4)
    small = 0
    for _ in range(3):
        small = policy.splice_round(small, 300)
    assert not policy.back_to_copy(small)
    assert policy.back_to_copy(policy.splice_round(small, 300))
    assert policy.splice_round(3, 200 * KIB) == 0  # a bulk round resets the count


def test_splicing_from_the_first_byte_stays_spliced() -> None:
    policy = CopyPolicy(splice_after=0)
    small = 0
    for _ in range(100):
        small = policy.splice_round(small, 10)
    assert not policy.back_to_copy(small)


@pytest.mark.parametrize("field,value", [("bulk_read", 0), ("copy_after", 0)])
def test_nonsense_policies_are_refused_with_their_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        CopyPolicy(**{field: value})  # type: ignore[arg-type]


Impl = tuple[Callable[[int, int], int], Callable[[], bytes]]
IMPLS: dict[str, Impl] = {"python": (copystep.copy_once, copystep.take_rest)}


@pytest.fixture
def pairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    a, b = socket.socketpair()  # a -> b is the source
    c, d = socket.socketpair()  # c -> d is the destination
    for s in (a, b, c, d):
        s.setblocking(False)
    yield a, b, c, d
    for s in (a, b, c, d):
        s.close()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_copy_step_moves_bytes_reports_empty_eof_and_a_full_destination(
        impl: str, pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket]) -> None:
    copy, take_rest = IMPLS[impl]
    a, b, c, d = pairs
    assert copy(b.fileno(), c.fileno()) == -1  # nothing to read
    a.send(b"hello")
    assert copy(b.fileno(), c.fileno()) == 5
    assert d.recv(100) == b"hello"
    # fill the destination until a copy cannot write everything it read
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = bytearray()
    read_total = 0
    rest = b""
    for i in range(1000):
        chunk = bytes([i % 251]) * (16 * KIB)
        a.send(chunk)
        sent += chunk
        n = copy(b.fileno(), c.fileno())
        if n < -1:
            read_total += -1 - n
            rest = take_rest()
            assert 0 < len(rest) <= -1 - n
            break
        assert n > 0
        read_total += n
    else:
        pytest.fail("the destination never filled up")
    assert take_rest() == b""  # handed out once
    got = bytearray()
    while True:
        try:
            got += d.recv(1 << 20)
        except BlockingIOError:
            break
    assert bytes(got) + rest == bytes(sent[:read_total])  # in order, nothing lost or doubled
    a.shutdown(socket.SHUT_WR)
    while (n := copy(b.fileno(), c.fileno())) > 0 or n < -1:
        take_rest()
    assert copy(b.fileno(), c.fileno()) == 0  # EOF


@pytest.mark.parametrize("impl", list(IMPLS))
def test_copy_step_raises_on_a_broken_destination(
        impl: str, pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket]) -> None:
    copy, _ = IMPLS[impl]
    a, b, c, d = pairs
    d.close()
    a.send(b"x" * 10)
    with pytest.raises(OSError):
        for _ in range(3):
            a.send(b"x" * 10)
            copy(b.fileno(), c.fileno())
