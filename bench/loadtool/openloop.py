"""Open-loop latency at a fixed rate, and idle connection holding.

Rules kept here (see `bench.loadtool.modes` for the shared ones):
- Schedule: the run has N = rate * duration ops; op i belongs to process i mod procs and is
  due at start_at + i / rate. Latency = completion - due time; lag = actual start - due time.
- At most `max_inflight` ops per process are in flight; an op due while the bound is reached is
  not sent and counts as an `overload` error (bounded memory, visible in the report).
- `op=rr` takes a persistent connection from a pool of `conns` (waiting for one counts in the
  latency); a broken connection is replaced by a new one.
- Idle: connections are opened `IDLE_RAMP_CONCURRENCY` at a time for at most `duration`
  (the rest count as `not_attempted`), then held for `duration` after the ramp, then each
  carries one 1-byte request; `established` = the ones that answered.
"""

from __future__ import annotations

import asyncio
import socket

from bench.loadtool import protocol as proto
from bench.loadtool.client import Exchange, open_exchange, recv_exactly
from bench.loadtool.modes import ERROR_PAUSE, Context, crr_once, now, sleep_until

IDLE_RAMP_CONCURRENCY = 256


class _Pool:
    """Persistent rr connections for the open loop (opened lazily, replaced when broken)."""

    def __init__(self, ctx: Context, size: int) -> None:
        self.ctx = ctx
        self.idle: asyncio.Queue[tuple[Exchange, int] | None] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(None)
        self.header = proto.rr(ctx.spec.req_size, ctx.spec.resp_size).pack()
        self.request = b"q" * ctx.spec.req_size

    async def exchange(self) -> None:
        slot = await self.idle.get()
        conn: Exchange | None = None
        try:
            async with asyncio.timeout(self.ctx.spec.timeout):
                if slot is None:
                    conn, answered = await open_exchange(self.ctx.spec.target, self.ctx.source()), 0
                    self.ctx.tally.conns_opened += 1
                    conn.send(self.header)
                else:
                    conn, answered = slot
                conn.send(self.request)
                answered += self.ctx.spec.resp_size
                await conn.received(answered)
        except BaseException:
            if conn is not None:
                conn.abort()
            self.idle.put_nowait(None)
            raise
        self.idle.put_nowait((conn, answered))

    def close(self) -> None:
        while not self.idle.empty():
            slot = self.idle.get_nowait()
            if slot is not None:
                slot[0].close()


async def latency(ctx: Context) -> None:
    spec, tally = ctx.spec, ctx.tally
    pool = _Pool(ctx, max(1, ctx.my_conns)) if spec.op == "rr" else None
    inflight: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        tally.lag.record(now() - due)
        try:
            if pool is not None:
                await pool.exchange()
            else:
                await crr_once(ctx)
            tally.latency.record(now() - due)
            tally.ops += 1
        except (OSError, TimeoutError) as exc:
            tally.error(exc)
            await asyncio.sleep(ERROR_PAUSE)

    total = int(spec.rate * spec.duration)
    if spec.max_ops:
        total = min(total, spec.max_ops)
    for i in range(ctx.index, total, spec.procs):
        due = ctx.start_at + i / spec.rate
        await sleep_until(due)
        if len(inflight) >= spec.max_inflight:
            tally.errors["overload"] = tally.errors.get("overload", 0) + 1
            continue
        task = asyncio.create_task(one(due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.wait(set(inflight), timeout=2 * spec.timeout + 1)
    tally.finish(max(now(), ctx.stop_at) if total else ctx.start_at)
    if pool is not None:
        pool.close()


async def _idle_open(ctx: Context, gate: asyncio.Semaphore, held: list[socket.socket]) -> None:
    async with gate:
        if now() >= ctx.stop_at:  # the ramp's bound
            ctx.tally.errors["not_attempted"] = ctx.tally.errors.get("not_attempted", 0) + 1
            return
        try:
            held.append(await ctx.open(proto.rr(1, 1).pack()))
        except (OSError, TimeoutError) as exc:
            ctx.tally.error(exc)


async def _idle_check(ctx: Context, gate: asyncio.Semaphore, sock: socket.socket) -> None:
    buf = memoryview(bytearray(16))
    async with gate:
        try:
            async with asyncio.timeout(ctx.spec.timeout):
                await asyncio.get_running_loop().sock_sendall(sock, b"?")
                await recv_exactly(sock, buf, 1)
            ctx.tally.ops += 1
        except (OSError, TimeoutError) as exc:
            ctx.tally.error(exc)


async def idle(ctx: Context) -> None:
    held: list[socket.socket] = []
    gate = asyncio.Semaphore(IDLE_RAMP_CONCURRENCY)
    target = ctx.my_conns
    try:
        await asyncio.gather(*(_idle_open(ctx, gate, held) for _ in range(target)))
        ramp_end = now()
        ctx.tally.extra["ramp_s_max"] = ramp_end - ctx.start_at
        ctx.tally.extra["opened"] = len(held)
        ctx.tally.extra["target"] = target
        await sleep_until(ramp_end + ctx.spec.duration)
        ctx.tally.finish(now())
        await asyncio.gather(*(_idle_check(ctx, gate, s) for s in held))
        ctx.tally.extra["established"] = ctx.tally.ops
    finally:
        for sock in held:
            sock.close()
