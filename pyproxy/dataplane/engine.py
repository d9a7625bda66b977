"""The splice relay on its compiled engine: `NativeRelay`, a TcpRelay like `splice.FastRelay`.

`pyproxy/dataplane/_native/engine.c` (the C extension `_engine<EXT_SUFFIX>`, setup.py) runs
the whole life of a connection in C: accept, the original destination, dial, copy or splice
each direction, half-close, close. It asks this module for every decision, once per
connection, through callbacks:

- `_decide`: a connection arrived for (dst_ip, dst_port): the service port
  (`ServiceTable.routes`), the endpoint set and source policy (`plan_connection`), and the
  endpoint (`Balancer.pick`, affinity included) — the same pure code `FastRelay` calls.
  It counts what the pair counts (total, active, refused, unknown destination).
  Where that answer depends on nothing but the route (`Balancer.uniform`: no affinity; no
  client-dependent endpoint set, `source_matters`), it also hands the engine a plan: the
  route, the targets and the port's counters. The engine then serves the next connections
  to that address by a uniform draw of its own and counts them as `_decide` and `_closed`
  would, for as long as `table.routes` holds the same Route object for the address (a sync
  makes a new one for every change, and the engine looks it up at every connection), so
  no Python runs per connection there.
- `_redial`: a dial failed or timed out: count it, pick again without the failed endpoints,
  up to `len(dial_timeouts)` attempts.
- `_closed` / `_moved`: bytes relayed, reported when the pair closes, and for open pairs when
  the metrics are read (`DataplaneStats.refreshers`), so a long stream shows in /metrics.
- `_note`: errors, counted and logged at a bounded rate (errors.py).

The callbacks only decide and count: the engine refuses (RuntimeError) any of its methods that
change its state (run, sweep, close, detach, ...) called from within one of them.

The copy/splice policy's numbers come from `model/copymode.py`'s CopyPolicy (the engine's
`policy()` is held to the model's answers by a unit test). `splice.FastRelay` is the
pure-Python twin with the same behaviour; `make_splice_relay` picks this one when the
compiled engine imports and `PYPROXY_PURE_PYTHON` is not 1.

Where the engine differs from the twin in how, never in what: dial deadlines live on one
timerfd (no timer object per attempt), and during the first dial attempt the client socket
is not watched (one epoll_ctl fewer per connection): a client that resets then is noticed
when that attempt ends (connected, failed, or at its timeout, whose expiry checks the client
first); from the second attempt on it is watched, as in the twin. And the engine's sockets are
edge-triggered in its epoll set, so a connection's interest is set once per socket rather than
changed at each turn (engine.c's header says what stays registered and why). A short read
from a socket whose event reported the peer's FIN (EPOLLRDHUP) ends its direction at once:
the twin reads once more to see the EOF.

Moving to a successor goes through the same TcpState as the other relays
(`dataplane/connstate.py`), so pairs move between this engine and its twin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple
from typing import Any

from pyproxy.dataplane.errors import ErrorLog, error_name
from pyproxy.dataplane.relay import RelayConfig, reset_fds
from pyproxy.dataplane.sockets import transparent_listener
from pyproxy.dataplane.stats import ConnectionInfo, DataplaneStats, PortStats
from pyproxy.dataplane.connstate import DirectionState, TcpState
from pyproxy.model.copymode import CopyPolicy
from pyproxy.model.family import join_host_port
from pyproxy.model.objects import ServicePortName
from pyproxy.model.affinity import Balancer
from pyproxy.model.source import SourcePolicy
from pyproxy.model.table import Plan, Route, ServiceTable, plan_connection, source_matters

log = logging.getLogger("pyproxy.splice")

PIPE_SIZE = 1024 * 1024  # what a splice pipe grows to (engine.c's "Pipes"; else 256 KiB): splice.PIPE_SIZES
PIPE_BUDGET = 32 * 1024 * 1024  # bytes of pipe above 64 KiB the engine holds at most: splice.PIPE_BUDGET
STATS_CACHE_LIMIT = 65536
DEFAULT_SPLICE_AFTER = 64 * 1024

Context = tuple[PortStats, ServicePortName]  # what the engine hands back about a pair
Target = tuple[str, int, int, Context]  # dial (ip, port) with a model.source.Source mode
EnginePlan = tuple[tuple[str, str, int], Route, tuple[Target, ...], PortStats]  # engine.c's "Plans"
Modes = dict[str, int]  # an endpoint's address -> its Source mode under a plan
Prepared = tuple[Route, Context, "Balancer | None", Plan, "Plan | None", "EnginePlan | None", Modes, Modes]


def _load() -> Any:
    if os.environ.get("PYPROXY_PURE_PYTHON") == "1":
        return None
    try:
        from pyproxy.dataplane import _engine  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _engine


native = _load()
AVAILABLE = native is not None


class _Pair:
    """A handle on one open pair (what `pairs` yields): enough to close it."""

    __slots__ = ("_engine", "_id")

    def __init__(self, engine: Any, pair_id: int) -> None:
        self._engine, self._id = engine, pair_id

    def close(self, abort: bool = False) -> None:
        self._engine.close_pair(self._id, abort)


class _Pairs:
    """The open pairs as a collection (len, iteration): they live in the engine."""

    def __init__(self, relay: NativeRelay) -> None:
        self._relay = relay

    def __len__(self) -> int:
        engine = self._relay.engine
        return 0 if engine is None else int(engine.count)

    def __iter__(self) -> Iterator[_Pair]:
        engine = self._relay.engine
        if engine is None:
            return iter(())
        return iter([_Pair(engine, i) for i in engine.ids()])

    def __contains__(self, item: object) -> bool:
        engine = self._relay.engine
        return isinstance(item, _Pair) and engine is not None and item._engine is engine and item._id in engine.ids()


class NativeRelay:
    kind = "splice, compiled engine"
    label = "engine"  # pyproxy_tcp_relay_info{relay="engine"}

    def __init__(
        self, table: ServiceTable, is_local_source: Callable[[str], bool], stats: DataplaneStats,
        config: RelayConfig | None = None, clock: Callable[[], float] = time.monotonic,
        splice_after: int = DEFAULT_SPLICE_AFTER, sources: Callable[[], SourcePolicy] = SourcePolicy,
    ) -> None:
        # `clock` must read CLOCK_MONOTONIC (time.monotonic does): the engine stamps pairs with it
        if native is None:
            raise RuntimeError("the compiled engine is not available (cmd/setup builds it)")
        self.table = table
        self.is_local_source = is_local_source
        self.sources = sources  # whose address endpoints see (model/source.py); read as routes change
        self._sources: SourcePolicy | None = None  # the policy the engine and _contexts were made with
        self.stats = stats
        self.config = config or RelayConfig()
        self.clock = clock
        self.policy = CopyPolicy(splice_after=splice_after)
        self.errors = ErrorLog(stats.connection_errors, log)
        self.engine: Any = None
        self.listener: socket.socket | None = None
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._contexts: dict[tuple[str, str, int], Prepared] = {}
        self._pairs = _Pairs(self)

    @property
    def pairs(self) -> _Pairs:
        return self._pairs

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.listener = sock if sock is not None else transparent_listener(host, port)
        self.listener.setblocking(False)
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        policy = self.policy
        self.engine = native.Engine(
            self._decide, self._redial, self._closed, self._moved, self._note,
            dial_timeouts=tuple(self.config.dial_timeouts), splice_after=policy.splice_after,
            bulk_read=policy.bulk_read, copy_after=policy.copy_after, pipe_size=PIPE_SIZE,
            routes=self.table.routes, pipe_budget=PIPE_BUDGET)
        if self.draining:
            self.engine.set_draining(True)
        self.engine.add_listener(self.listener.fileno())
        self._loop.add_reader(self.engine.fileno(), self.engine.run)  # the C method is the callback
        self.stats.refreshers.append(self.engine.flush)
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    # the decisions (called by the engine)

    def _prepared(self, frontend: tuple[str, str, int], route: Route) -> Prepared:
        """What every connection to `frontend` shares while its route object stays the same
        (a sync makes a new Route for every change; a port's Balancer lives as long as the
        port, so it is the route's for the route's whole life): the port's counters and name,
        its balancer, and `plan_connection`'s answers (the second only where the source
        matters: an external frontend of a Local port); and the engine's plan where the pick
        needs nothing but the route (engine.c's "Plans")."""
        sources = self.sources()
        if sources is not self._sources:
            self._contexts.clear()
            if self.engine is not None:
                self.engine.set_pod_networks(sources.prefixes())
                self._sources = sources
        cached = self._contexts.get(frontend)
        if cached is not None and cached[0] is route:
            return cached
        port = route.port
        context = (self.stats.port(port.name), port.name)
        balancer = self.table.balancers.get(port.name)
        plan = plan_connection(route, False)
        local_plan = plan_connection(route, True) if source_matters(route) else None
        modes = {e.ip: int(sources.target_source(plan.transparent, e.ip)) for e in plan.candidates}
        local_modes = {} if local_plan is None else {
            e.ip: int(sources.target_source(local_plan.transparent, e.ip)) for e in local_plan.candidates}
        engine_plan = None
        if local_plan is None and balancer is not None and balancer.uniform and plan.candidates:
            targets = tuple((e.ip, e.port, modes[e.ip], context) for e in plan.candidates)
            engine_plan = (frontend, route, targets, context[0])
        prepared = (route, context, balancer, plan, local_plan, engine_plan, modes, local_modes)
        if len(self._contexts) >= STATS_CACHE_LIMIT:
            self._contexts.clear()
        self._contexts[frontend] = prepared
        return prepared

    def _context(self, frontend: tuple[str, str, int], route: Route) -> Context:
        return self._prepared(frontend, route)[1]

    def _decide(self, client_ip: str, client_port: int, dst_ip: str,
                dst_port: int) -> Target | tuple[str, int, int, Context, EnginePlan] | None:
        frontend = (dst_ip, "TCP", dst_port)
        route = self.table.routes.get(frontend)
        if route is None:
            self.stats.unknown_destination += 1
            return None
        _, context, balancer, plan, local_plan, engine_plan, modes, local_modes = self._prepared(frontend, route)
        if local_plan is not None and self.is_local_source(client_ip):
            plan, modes = local_plan, local_modes
        stats = context[0]
        if not plan.candidates:
            stats.refused += 1
            return None
        stats.active += 1
        stats.total += 1
        endpoint = None if balancer is None else balancer.pick(client_ip, plan.candidates, self.clock())
        if endpoint is None:
            stats.refused += 1
            stats.active -= 1
            return None
        if engine_plan is not None:
            return endpoint.ip, endpoint.port, modes[endpoint.ip], context, engine_plan
        return endpoint.ip, endpoint.port, modes[endpoint.ip], context

    def _redial(self, context: Context, client_ip: str, client_port: int, dst_ip: str, dst_port: int,
                failed: list[tuple[str, int]], code: int, attempt: int) -> Target | None:
        stats, name = context
        address = failed[-1]
        self.stats.dial_failed(name, address)
        err = OSError(code, os.strerror(code)) if code else None
        self.errors.note("dial", err, f"dial {join_host_port(*address)} for {name} failed: {err or 'timeout'}",
                         key=f"dial {join_host_port(*address)} {error_name(err)}")
        frontend = (dst_ip, "TCP", dst_port)
        route = self.table.routes.get(frontend)
        endpoint = None
        modes: Modes = {}
        if attempt < len(self.config.dial_timeouts) and route is not None and route.port.name == name:
            _, _, balancer, plan, local_plan, _, modes, local_modes = self._prepared(frontend, route)
            if local_plan is not None and self.is_local_source(client_ip):
                plan, modes = local_plan, local_modes
            if balancer is not None:
                endpoint = balancer.pick(client_ip, plan.candidates, self.clock(), exclude=set(failed))
        if endpoint is None:
            stats.refused += 1
            return None
        return endpoint.ip, endpoint.port, modes[endpoint.ip], context

    @staticmethod
    def _closed(context: Context, bytes_in: int, bytes_out: int) -> None:
        stats = context[0]
        stats.active -= 1
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out

    @staticmethod
    def _moved(context: Context, bytes_in: int, bytes_out: int) -> None:
        stats = context[0]
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out

    def _note(self, stage: str, code: int | BaseException) -> None:
        if isinstance(code, BaseException):
            self.errors.note("internal", code, f"splice relay: unexpected error serving a connection: {code!r}",
                             level=logging.ERROR)
            return
        err = OSError(code, os.strerror(code))
        if stage == "relay":
            self.errors.note("relay", err, f"connections ended by a socket error: {err}")
        elif stage == "client":
            self.errors.note("client", err, "clients reset their connections before they were served")
        elif stage == "client-dial":
            self.errors.note("client", err, "clients reset their connections while the endpoint was dialed")
        elif stage == "upstream":
            self.errors.note("upstream", err, f"cannot make an upstream socket: {err}")
        elif stage == "accept":
            self.errors.note("accept", err, f"accept failed: {err}; pausing accepts for 0.1s", level=logging.WARNING)
        else:
            self.errors.note(stage, err, f"splice relay: {stage}: {err}")

    # timers

    def _sweep_interval(self) -> float:
        return max(0.01, min(1.0, self.config.idle_timeout / 4, self.config.half_close_timeout / 4))

    def _sweep(self) -> None:
        """Close pairs idle past their bound: one timer for all pairs, not one each."""
        if self.engine is None or self._loop is None:
            return
        closed = self.engine.sweep(self.config.idle_timeout, self.config.half_close_timeout)
        for _ in range(min(closed, 1000)):
            self.errors.note("idle", None, "closing connections idle past their timeout")
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    # what the app asks of a relay

    def connections(self) -> Iterator[ConnectionInfo]:
        """A read-only picture of every open pair (for the inspection API)."""
        if self.engine is None:
            return
        for (_, context, client, frontend, endpoint, bytes_in, bytes_out, started, last,
             client_done, endpoint_done) in self.engine.connections():
            yield ConnectionInfo("TCP", context[1], client, frontend, endpoint, bytes_in, bytes_out, started, last,
                                 client_done, endpoint_done)

    def stop_accepting(self) -> None:
        """Draining: new connections are reset at once (a closed TPROXY listener would make
        their SYNs vanish, so clients would wait for a timeout instead of trying elsewhere)."""
        self.draining = True
        if self.engine is not None:
            self.engine.set_draining(True)

    def release_listener(self) -> None:
        """A successor holds the listener now (pyproxy/lifecycle): stop accepting, close this copy."""
        self._close_listener()

    def _close_listener(self) -> None:
        if self.listener is not None:
            if self.engine is not None:
                self.engine.remove_listener(self.listener.fileno())
            self.listener.close()
            self.listener = None

    async def detach_pairs(self) -> list[tuple[TcpState, list[int]]]:
        """Take every established pair out of this process: its state and its fds (dups
        the caller sends and closes). Pairs still dialing stay and drain here."""
        if self.engine is None:
            return []
        now = self.clock()
        moved = []
        for info, up, down, fds in self.engine.detach():
            _, context, client, frontend, endpoint, bytes_in, bytes_out, started, last = info[:9]
            state = TcpState(context[1], client, frontend, endpoint, now - started, now - last, bytes_in, bytes_out,
                             DirectionState(*up), DirectionState(*down))
            moved.append((state, fds))
        return moved

    async def adopt_pair(self, state: TcpState, fds: list[int]) -> None:
        """Go on relaying a pair another process detached (`fds`: client, upstream, then
        the read and write ends of each direction's pipe that came along, up first). The
        relay owns `fds` from the call on: on any failure they are closed (the sockets with a
        reset, so their peers learn at once) and the error raised."""
        engine = self.engine
        try:
            if engine is None:
                raise RuntimeError("adopt_pair before start")
            for fd in fds[:2]:  # the two sockets must be what they claim: sockets
                socket.socket(fileno=fd).detach()
            for fd in fds:
                os.set_blocking(fd, False)
            frontend = (state.frontend[0], "TCP", state.frontend[1])
            route = self.table.routes.get(frontend)
            context = self._context(frontend, route) if route is not None and route.port.name == state.port \
                else (self.stats.port(state.port), state.port)
        except BaseException:
            reset_fds(fds)
            raise
        context[0].active += 1
        context[0].total += 1
        try:
            engine.adopt(context, list(fds), state.client, state.frontend, state.endpoint, state.age, state.idle,
                         state.bytes_in, state.bytes_out, astuple(state.up), astuple(state.down))
        except BaseException:  # the engine closed the fds
            context[0].active -= 1
            raise

    async def drain(self, timeout: float) -> int:
        """Wait for open connections to finish, up to `timeout`; abort the rest. Returns how many were cut."""
        deadline = self.clock() + timeout
        engine = self.engine
        while engine is not None and engine.count and self.clock() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - self.clock())))
        cut = 0 if engine is None else int(engine.count)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._close_listener()
        if engine is not None:
            engine.close_all(True)
            if self._loop is not None:
                self._loop.remove_reader(engine.fileno())
            if engine.flush in self.stats.refreshers:
                self.stats.refreshers.remove(engine.flush)
            engine.close()
        self.errors.close()
        return cut

