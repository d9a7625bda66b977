"""The load modes, as coroutines run by one load process (see `bench.loadtool.load` for the fan-out).

Rules kept here:
- All processes start together at `ctx.start_at` (a CLOCK_MONOTONIC instant shared by the
  processes) and stop issuing work at `ctx.stop_at`; every loop also checks the count bound.
- Closed-loop modes (stream, rr, crr) keep `conns` workers busy; `latency` is open-loop: op i
  (all processes together) is scheduled at start + i/rate and its latency is measured from that
  *scheduled* instant, so a slow system cannot slow the schedule (no coordinated omission).
  How late ops actually started is recorded too (`lag`): uvloop timers tick in milliseconds.
- An error is counted by class and the worker carries on (after a 1 ms pause) until the end.
- `idle` opens its connections, holds them until stop_at, then proves each one still carries
  a request end to end; only those count as established.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.loadtool import protocol as proto
from bench.loadtool.addrs import split_evenly
from bench.loadtool.client import Exchange, Tally, connect, open_exchange, recv_exactly
from bench.loadtool.loadargs import LoadSpec
from bench.loadtool.results import EarlyEOF

now = time.monotonic
ERROR_PAUSE = 0.001


@dataclass
class Context:
    spec: LoadSpec
    index: int  # this process among spec.procs
    sources: tuple[str, ...]
    start_at: float
    tally: Tally
    max_ops: int | None = None  # this process's share of the count bound (None: no bound)
    _next_source: int = 0
    _issued: int = 0
    buf: memoryview = field(default_factory=lambda: memoryview(bytearray(256 * 1024)))

    @property
    def stop_at(self) -> float:
        return self.start_at + self.spec.duration

    @property
    def my_conns(self) -> int:
        return split_evenly(self.spec.conns, self.index, self.spec.procs)

    def source(self) -> str | None:
        if not self.sources:
            return None
        src = self.sources[self._next_source % len(self.sources)]
        self._next_source += 1
        return src

    def more(self) -> bool:
        """True while time and the count bound allow another operation; True reserves it,
        so concurrent workers never overshoot the count bound."""
        if now() >= self.stop_at or (self.max_ops is not None and self._issued >= self.max_ops):
            return False
        self._issued += 1
        return True

    async def open(self, header: bytes) -> socket.socket:
        async with asyncio.timeout(self.spec.timeout):
            sock = await connect(self.spec.target, self.source())
        self.tally.conns_opened += 1
        try:
            if header:
                await asyncio.get_running_loop().sock_sendall(sock, header)
        except BaseException:
            sock.close()
            raise
        return sock


async def sleep_until(t: float) -> None:
    delay = t - now()
    if delay > 0:
        await asyncio.sleep(delay)


async def _stream_one(ctx: Context) -> None:
    spec, loop, sock = ctx.spec, asyncio.get_running_loop(), None
    try:
        if spec.direction == "up":
            sock = await ctx.open(proto.sink().pack())
            chunk = memoryview(b"x" * spec.chunk)
            while now() < ctx.stop_at:
                async with asyncio.timeout(spec.timeout):
                    await loop.sock_sendall(sock, chunk)
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(spec.timeout):
                await recv_exactly(sock, ctx.buf, proto.COUNT.size)
            ctx.tally.bytes += proto.COUNT.unpack(ctx.buf[: proto.COUNT.size])[0]
        else:
            sock = await ctx.open(proto.source(spec.chunk).pack())
            while now() < ctx.stop_at:
                async with asyncio.timeout(spec.timeout):
                    n = await loop.sock_recv_into(sock, ctx.buf)
                if n == 0:
                    raise ConnectionResetError("backend closed the stream")
                ctx.tally.bytes += n
        ctx.tally.ops += 1
        ctx.tally.finish(now())
    except (OSError, TimeoutError) as exc:
        ctx.tally.error(exc)
    finally:
        if sock is not None:
            sock.close()


async def stream(ctx: Context) -> None:
    await asyncio.gather(*(_stream_one(ctx) for _ in range(ctx.my_conns)))
    ctx.tally.finish(min(now(), ctx.stop_at) if ctx.spec.direction == "down" else ctx.start_at)


async def _rr_one(ctx: Context) -> None:
    spec = ctx.spec
    request = b"q" * spec.req_size
    conn: Exchange | None = None
    answered = 0
    while ctx.more():
        try:
            t0 = now()
            async with asyncio.timeout(spec.timeout):
                if conn is None:
                    conn, answered = await open_exchange(spec.target, ctx.source()), 0
                    ctx.tally.conns_opened += 1
                    conn.send(proto.rr(spec.req_size, spec.resp_size).pack())
                    t0 = now()
                conn.send(request)
                answered += spec.resp_size
                await conn.received(answered)
            ctx.tally.latency.record(now() - t0)
            ctx.tally.ops += 1
        except (OSError, TimeoutError) as exc:
            ctx.tally.error(exc)
            if conn is not None:
                conn.abort()
                conn = None
            await asyncio.sleep(ERROR_PAUSE)
    if conn is not None:
        conn.close()


async def crr_once(ctx: Context) -> None:
    """One connect-request-response-close; raises on failure."""
    spec = ctx.spec
    async with asyncio.timeout(spec.timeout):
        conn = await open_exchange(spec.target, ctx.source())
        try:
            ctx.tally.conns_opened += 1
            conn.send(proto.crr(spec.req_size, spec.resp_size).pack() + b"q" * spec.req_size)
            await conn.closed()  # the backend closes after its response: one wake-up, not two
            if conn.got < spec.resp_size:
                raise EarlyEOF(f"response cut at {conn.got} of {spec.resp_size} bytes")
        except BaseException:
            conn.abort()
            raise
        conn.close()


async def _crr_one(ctx: Context) -> None:
    while ctx.more():
        t0 = now()
        try:
            await crr_once(ctx)
            ctx.tally.latency.record(now() - t0)
            ctx.tally.ops += 1
        except (OSError, TimeoutError) as exc:
            ctx.tally.error(exc)
            await asyncio.sleep(ERROR_PAUSE)


async def closed_loop(ctx: Context, one: Callable[[Context], Awaitable[None]]) -> None:
    await asyncio.gather(*(one(ctx) for _ in range(ctx.my_conns)))
    ctx.tally.finish(now())


async def rr(ctx: Context) -> None:
    await closed_loop(ctx, _rr_one)


async def crr(ctx: Context) -> None:
    await closed_loop(ctx, _crr_one)
