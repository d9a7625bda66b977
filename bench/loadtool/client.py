"""Client-side socket primitives for the load modes, and the per-process tally.

Rules kept here:
- A connection is a non-blocking socket with TCP_NODELAY; with a source address it binds
  `(src, 0)` with IP_BIND_ADDRESS_NO_PORT first, so the port is picked at connect time and
  many sources share the ephemeral range per destination.
- Small-message paths (rr, crr) use an `Exchange` protocol on a uvloop transport: about twice
  the rate of the `loop.sock_*` calls, which re-arm the fd watcher on every await. Its socket
  binds `(src, 0)` through `local_addr` (no IP_BIND_ADDRESS_NO_PORT there); that suffices
  because the backend closes first in crr, so the client never holds ports in TIME_WAIT.
- Every await on the network sits under `asyncio.timeout(spec.timeout)` in the caller; these
  helpers only move bytes and raise (`EarlyEOF` when the peer closes short).
- The `Tally` is the only mutable state of a load process: counts, errors by class, HDR
  histograms. It becomes an immutable `Result` at the end.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import cast

from bench.loadtool import results as res

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connect(target: tuple[str, int], source: str | None) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await loop.sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_exactly(sock: socket.socket, buf: memoryview, size: int) -> None:
    """Fill buf[:size] (size may exceed len(buf): the excess is read and dropped)."""
    loop = asyncio.get_running_loop()
    got = 0
    while got < size:
        view = buf[: min(len(buf), size - got)]
        n = await loop.sock_recv_into(sock, view)
        if n == 0:
            raise res.EarlyEOF(f"peer closed after {got} of {size} bytes")
        got += n


async def recv_until_eof(sock: socket.socket, buf: memoryview, limit: int = 1 << 20) -> int:
    loop = asyncio.get_running_loop()
    total = 0
    while total <= limit:
        n = await loop.sock_recv_into(sock, buf)
        if n == 0:
            return total
        total += n
    raise res.EarlyEOF("peer sent more than expected")


class Exchange(asyncio.Protocol):
    """Counts received bytes; wakes one waiter at a cumulative byte count, or at EOF.

    Waking passes no exception unless the wait failed: raising through a future costs more
    than a whole crr exchange's worth of Python on this path.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.got = 0
        self.eof = False
        self.lost: BaseException | None = None  # a connection error (reset), not a clean EOF
        self._want: int | None = 0  # None: waiting for EOF
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self._waiter is not None:
            self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self.lost is not None:
            waiter.set_exception(self.lost)
        elif self._want is None:
            if not self.eof:
                return
            waiter.set_result(None)
        elif self.got >= self._want:
            waiter.set_result(None)
        elif self.eof:
            waiter.set_exception(res.EarlyEOF(f"peer closed after {self.got} of {self._want} bytes"))
        else:
            return
        self._waiter = None

    async def _wait(self, want: int | None) -> None:
        self._want = want
        self._waiter = asyncio.get_running_loop().create_future()
        self._wake()
        if self._waiter is not None:
            await self._waiter

    async def received(self, total: int) -> None:
        """Wait until `total` bytes have arrived on this connection, all told."""
        if self.got < total:
            await self._wait(total)

    async def closed(self) -> None:
        """Wait for the peer's EOF (a reset raises)."""
        if self.lost is not None:
            raise self.lost
        if not self.eof:
            await self._wait(None)

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise self.lost or ConnectionResetError("connection is closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_exchange(target: tuple[str, int], source: str | None) -> Exchange:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        Exchange, target[0], target[1], local_addr=(source, 0) if source else None
    )
    return proto


@dataclass
class Tally:
    """What one load process counts while it runs."""

    mode: str
    ops: int = 0
    bytes: int = 0
    conns_opened: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: res.Recorder = field(default_factory=res.Recorder)
    lag: res.Recorder = field(default_factory=res.Recorder)
    extra: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0
    cpu_started: float = field(default_factory=time.process_time)

    def error(self, exc: BaseException) -> None:
        kind = res.classify(exc)
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def begin(self, at: float) -> None:
        self.started = at
        self.cpu_started = time.process_time()

    def finish(self, at: float) -> None:
        self.ended = max(self.ended, at)

    def result(self) -> res.Result:
        return res.Result(
            mode=self.mode, procs=1, window_s=max(0.0, self.ended - self.started), ops=self.ops,
            bytes=self.bytes, conns_opened=self.conns_opened, errors=dict(self.errors),
            latency=self.latency.encoded(), lag=self.lag.encoded(),
            client_cpu_s=time.process_time() - self.cpu_started, extra=dict(self.extra),
        )
