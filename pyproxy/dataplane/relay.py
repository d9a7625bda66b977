"""What every TCP relay of pyproxy is: the contract the app and the lifecycle rely on.

Two relays keep it, with one set of rules (SPEC.md §5, §8) and every decision taken from the
same pure model: the compiled engine (`engine.py`'s NativeRelay, `_native/engine.c`) and its
pure-Python twin (`splice.py`'s FastRelay). `splice.make_splice_relay` picks one. (Until
0.1.0 a third, the asyncio Protocol relay, lived here; it was removed: see the README's
release notes.)

Rules kept here:
- `RelayConfig` holds the numbers: dial timeouts (one per attempt, so their count bounds
  the attempts), and the idle bound of a pair and the shorter one once half-closed
  (`pair_timeout`).
- `TcpRelay` is what the process needs of a relay: start on a listener, let it go, stop
  accepting, drain, list its connections, and detach/adopt pairs for a hand-over.
- `drain_pairs` waits for a relay's pairs to close by themselves up to a bound, then cuts
  the rest: the drain of every relay.
- `adopt_pair` owns the fds it is given from the call on: on any failure it closes them
  (`reset_fds`: sockets with a reset, so their peers learn at once) before raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable, Collection, Iterator, Set
from dataclasses import dataclass
from typing import Protocol

from pyproxy.dataplane.connstate import TcpState
from pyproxy.dataplane.stats import ConnectionInfo

IP_BIND_ADDRESS_NO_PORT = 24
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@dataclass(frozen=True)
class RelayConfig:
    dial_timeouts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    idle_timeout: float = 3600.0
    half_close_timeout: float = 300.0


def pair_timeout(config: RelayConfig, half_closed: bool) -> float:
    """Idle bound of a pair: the half-close one once either direction has ended."""
    return config.half_close_timeout if half_closed else config.idle_timeout


class PairLike(Protocol):
    def close(self, abort: bool = False) -> None: ...


class TcpRelay(Protocol):
    """What the process needs of a TCP relay: `splice.FastRelay` and `engine.NativeRelay` are one."""

    @property
    def kind(self) -> str: ...  # which byte path, as the start-up log line names it

    @property
    def label(self) -> str: ...  # the same, as /metrics names it: "engine" or "twin"

    @property
    def pairs(self) -> Collection[PairLike]: ...

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None: ...

    def release_listener(self) -> None: ...

    @property
    def listener(self) -> socket.socket | None: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, timeout: float) -> int: ...

    def connections(self) -> Iterator[ConnectionInfo]: ...

    async def detach_pairs(self) -> list[tuple[TcpState, list[int]]]: ...

    async def adopt_pair(self, state: TcpState, fds: list[int]) -> None: ...


async def drain_pairs(pairs: Set[PairLike], timeout: float, clock: Callable[[], float]) -> int:
    """Wait until `pairs` (which closing pairs leave) is empty, up to `timeout` seconds;
    abort the pairs still open then. Returns how many were cut."""
    deadline = clock() + timeout
    while pairs and clock() < deadline:
        await asyncio.sleep(min(0.05, max(0.0, deadline - clock())))
    cut = len(pairs)
    for pair in list(pairs):
        pair.close(abort=True)
    return cut


def reset_fds(fds: list[int]) -> None:
    """Close fds handed over and not taken up: sockets with a reset, so their peers do not
    wait on them; anything else (a pipe end, an fd already gone) simply closed."""
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket (a pipe end)
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        with contextlib.suppress(OSError):
            if sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.close()
