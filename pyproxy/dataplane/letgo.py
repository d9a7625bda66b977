"""Letting go of a TCP listener without resetting what waits in its accept queue.

Closing a listening socket resets every connection still in its accept queue and every
handshake still half done on it. When a process must give its port up to another that
binds it afresh (a successor refused for its hand-over protocol version binds once the port
is free: pyproxy/lifecycle), it does this first.

Rules kept here:
- New handshakes are refused by a classic BPF socket filter on the listener that drops
  segments with SYN set and ACK clear: the client's stack retransmits its SYN (after 1 s,
  Linux's initial RTO) and meets whoever holds the port by then. Nothing is reset.
- Every other segment passes, so handshakes already answered complete into the queue
  (`HANDSHAKE_GRACE` covers a client's round trip), and the process accepts what is queued
  until the queue is empty (`tcp_info.tcpi_unacked` of a listener is its queue length),
  bounded by `EMPTY_WITHIN`. Only then may it close the listener.
- The filter is on the socket, not the descriptor: copies held elsewhere (a supervisor's)
  see it too, which is right, since the port is being given up.
- `program()` and `queue_length()`'s decoding are pure; the setsockopt calls are the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Sequence

from pyproxy.dataplane import cbpf
from pyproxy.dataplane.cbpf import (
    BPF_ABS,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_RET,
    SO_ATTACH_FILTER,
    Instruction,
    assemble,
)

log = logging.getLogger("pyproxy")

HANDSHAKE_GRACE = 0.25  # seconds for a SYN-ACK already sent to be answered
EMPTY_WITHIN = 2.0  # seconds at most to accept what is queued
POLL = 0.005

TCP_FLAGS_OFFSET = 13  # in the TCP header, where a socket filter's data starts
SYN, ACK = 0x02, 0x10
TCP_INFO_UNACKED = struct.Struct("=I")  # tcpi_unacked, at byte 24 of struct tcp_info
TCP_INFO_UNACKED_AT = 24
TCP_INFO_SIZE = 104


def instructions() -> list[Instruction]:
    """Drop (return 0) a segment whose flags have SYN without ACK; keep anything else whole."""
    return [
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, TCP_FLAGS_OFFSET),
        (BPF_ALU | BPF_AND | BPF_K, 0, 0, SYN | ACK),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, SYN),
        (BPF_RET | BPF_K, 0, 0, 0),
        (BPF_RET | BPF_K, 0, 0, 0xFFFFFFFF),
    ]


def program() -> bytes:
    return assemble(instructions())


def passes(flags: int) -> bool:
    """What the program decides for a segment with these TCP flags (for tests)."""
    return (flags & (SYN | ACK)) != SYN


def refuse_handshakes(sock: socket.socket) -> None:
    """Attach the filter: from now on new SYNs to `sock` are dropped (and retransmitted)."""
    cbpf.attach(sock, SO_ATTACH_FILTER, program())


def unacked(info: bytes) -> int:
    return int(TCP_INFO_UNACKED.unpack_from(info, TCP_INFO_UNACKED_AT)[0])


def queue_length(sock: socket.socket) -> int:
    """Connections waiting in a listener's accept queue."""
    return unacked(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE))


async def empty_the_queues(listeners: Sequence[socket.socket], grace: float = HANDSHAKE_GRACE,
                           within: float = EMPTY_WITHIN) -> int:
    """Refuse new handshakes on `listeners`, let the answered ones complete and wait until the
    process (still accepting meanwhile) has taken every queued connection; returns how many
    were still queued when the wait ended (0 unless `within` passed)."""
    live = [sock for sock in listeners if sock.fileno() >= 0]
    for sock in live:
        refuse_handshakes(sock)
    await asyncio.sleep(grace)
    deadline = time.monotonic() + within
    while True:
        left = sum(queue_length(sock) for sock in live if sock.fileno() >= 0)
        if left == 0 or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL)
    if left:
        log.warning("letting go of the listeners with %d connections still queued: they are reset", left)
    return left
