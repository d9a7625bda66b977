"""The TCP relay: one transparent listener, one upstream connection per client connection.

Rules kept here (SPEC.md §5, §8):
- The accepted socket's local address *is* the original destination (TPROXY); the service
  table maps it to a service port. One listener serves one address family (127.0.0.1 or
  ::1, IPV6_V6ONLY); socket addresses are cut to (host, port) as they are read. An unknown destination, or a service port with no
  endpoint for this client, is answered with a TCP reset.
- Which endpoint, in which order, and whether the client's source address is kept are
  decided by the pure model (`plan_connection`, `Balancer.pick`); this module only dials.
- Dialing tries up to `len(dial_timeouts)` endpoints, one timeout each; a failed endpoint
  is excluded and the pick (and the affinity entry) is made again.
- Bytes are copied as they come; a side whose peer's write buffer is full stops being
  read (backpressure both ways). The client's first bytes are held until the upstream
  is connected (uvloop may deliver them before reading can be paused).
- EOF on one side becomes `write_eof()` (shutdown SHUT_WR) on the other; the pair closes
  when both directions are done, or when it has been idle past its timeout (shorter once
  half-closed), so nothing leaks.
- `connections()` hands out read-only copies (`ConnectionInfo`) of the open pairs for the
  inspection API; each pair counts its own bytes beside its port's counters.
- Moving to a successor (`detach_pairs`, `adopt_pair`; pyproxy/lifecycle/connections.py):
  an established pair stops reading both sides, waits until both transports' write
  buffers are empty (all pairs at once, at most MOVE_FLUSH_BOUND), and is handed out as
  dup'd fds plus its state; closing the transports then closes only this process's copy
  of each socket, so the kernel sends no FIN or RST. A pair still dialing, or whose write buffer did not empty in time
  ("mid-write": a transport's buffer cannot be taken out), resumes and drains here.
  The successor wraps the fds in new transports paused from their first callback
  (`Holding`), writes the bytes the old process still held, and goes on reading only the
  directions that have not ended; the idle timer fires after the time that was left.
- No socket outlives its pair: an upstream socket belongs to the dial attempt until a
  transport owns it, and the attempt closes it on every way out (failure, timeout, the
  client gone meanwhile, cancellation). A client already gone when its connection is
  handled (no peer address any more) is aborted at once. An unexpected error in a
  callback closes that pair. Errors are counted and logged at a bounded rate (errors.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, cast

from pyproxy.dataplane.errors import ErrorLog, error_name
from pyproxy.dataplane.sockets import LISTEN_BACKLOG, family_socket, set_transparent, transparent_listener
from pyproxy.dataplane.stats import ConnectionInfo, DataplaneStats, PortStats
from pyproxy.lifecycle.connstate import DirectionState, TcpState, movable
from pyproxy.model.endpoints import Endpoint
from pyproxy.model.family import host_port
from pyproxy.model.objects import ServicePortName
from pyproxy.model.table import Route, ServiceTable, plan_connection, source_matters

log = logging.getLogger("pyproxy.relay")

IP_BIND_ADDRESS_NO_PORT = 24
LINGER_RESET = struct.pack("ii", 1, 0)
EARLY_BUFFER_LIMIT = 256 * 1024
ACCEPT_BATCH = 16  # accepts per wake-up of an asyncio listener
MOVE_FLUSH_BOUND = 0.2  # seconds the pairs being moved may take to empty their write buffers (reads paused)


@dataclass(frozen=True)
class RelayConfig:
    dial_timeouts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    idle_timeout: float = 3600.0
    half_close_timeout: float = 300.0
    write_buffer_high: int = 256 * 1024
    write_buffer_low: int = 64 * 1024


def pair_timeout(config: RelayConfig, half_closed: bool) -> float:
    """Idle bound of a pair: the half-close one once either direction has ended."""
    return config.half_close_timeout if half_closed else config.idle_timeout


class Closable(Protocol):
    def close(self, abort: bool = False) -> None: ...


async def drain_pairs(pairs: Set[Closable], timeout: float, clock: Callable[[], float]) -> int:
    """Wait until `pairs` (which closing pairs leave) is empty, up to `timeout` seconds;
    abort the pairs still open then. Returns how many were cut."""
    deadline = clock() + timeout
    while pairs and clock() < deadline:
        await asyncio.sleep(min(0.05, max(0.0, deadline - clock())))
    cut = len(pairs)
    for pair in list(pairs):
        pair.close(abort=True)
    return cut


def reset(transport: asyncio.Transport) -> None:
    """Close a TCP connection with RST: the client sees 'connection refused/reset' at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
    transport.abort()


@dataclass
class Relay:
    kind: ClassVar[str] = "protocol"
    table: ServiceTable
    is_local_source: Callable[[str], bool]
    stats: DataplaneStats
    config: RelayConfig = field(default_factory=RelayConfig)
    clock: Callable[[], float] = time.monotonic
    pairs: set[Pair] = field(default_factory=set)
    draining: bool = False
    _server: asyncio.AbstractServer | None = None
    _listener: socket.socket | None = None
    errors: ErrorLog = field(init=False)

    def __post_init__(self) -> None:
        self.errors = ErrorLog(self.stats.connection_errors, log)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Serve on a new transparent listener, or on `sock` (a worker's reuseport socket)."""
        loop = asyncio.get_running_loop()
        sock = sock if sock is not None else transparent_listener(host, port)
        # create_server listens again with its `backlog` (100 unless told), which asyncio also
        # uses as its accepts per wake-up, and on EMFILE asyncio (3.11) fails and schedules a
        # retry for every one of them. So: a small batch for the loop, then the kernel's queue
        # set back to LISTEN_BACKLOG (a storm's handshakes must not overflow it).
        self._server = await loop.create_server(lambda: ClientSide(self), sock=sock, backlog=ACCEPT_BATCH)
        sock.listen(LISTEN_BACKLOG)
        self._listener = sock

    @property
    def listener(self) -> socket.socket | None:
        return self._listener

    def release_listener(self) -> None:
        """A successor holds the listener now (pyproxy/lifecycle): stop accepting without
        resetting anything and close this process's copy; the queue stays the successor's."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def stop_accepting(self) -> None:
        """Refuse new connections with a reset from now on (the listener stays open while
        draining, so TPROXY still finds it: without it, new SYNs would vanish silently)."""
        self.draining = True

    async def drain(self, timeout: float) -> int:
        """Wait for open connections to finish, up to `timeout`; abort the rest and close
        the listener. Returns how many connections were cut."""
        cut = await drain_pairs(self.pairs, timeout, self.clock)
        if self._server is not None:
            self._server.close()
        self.errors.close()
        return cut

    def route(self, client: tuple[str, int], destination: tuple[str, int]) -> Route | None:
        return self.table.routes.get((destination[0], "TCP", destination[1]))

    def connections(self) -> Iterator[ConnectionInfo]:
        """A read-only picture of every open pair (for the inspection API)."""
        for pair in list(self.pairs):
            yield pair.info()

    # moving to a successor

    async def detach_pairs(self, bound: float = MOVE_FLUSH_BOUND) -> list[tuple[TcpState, list[int]]]:
        """Take every established pair out of this process: its state and its fds (dups
        the caller sends and closes). Pairs that cannot move stay and drain here."""
        held = [p for p in list(self.pairs) if movable(p.upstream is not None, p.closed, 0) is None]
        for pair in held:
            pair.hold()
        deadline = self.clock() + bound
        while any(p.write_buffered() for p in held if not p.closed) and self.clock() < deadline:
            await asyncio.sleep(0.005)
        moved: list[tuple[TcpState, list[int]]] = []
        for pair in held:
            why = movable(pair.upstream is not None, pair.closed, pair.write_buffered())
            if why is None:
                moved.append(pair.detach())
            elif not pair.closed:
                self.errors.note("move", None, f"connections left to drain here instead of moving: {why}")
                pair.release()
        return moved

    async def adopt_pair(self, state: TcpState, fds: list[int]) -> None:
        """Go on relaying a pair another process detached (`fds`: client, upstream; this
        relay has no pipes, so the caller turned pipe contents into `held` bytes)."""
        loop = asyncio.get_running_loop()
        client_sock = socket.socket(fileno=fds[0])
        upstream_sock = socket.socket(fileno=fds[1])
        client_hold: Holding | None = None
        upstream_hold: Holding | None = None
        try:
            client, client_hold = await loop.connect_accepted_socket(Holding, client_sock)
            upstream, upstream_hold = await loop.create_connection(Holding, sock=upstream_sock)
        except BaseException:
            for hold, sock in ((client_hold, client_sock), (upstream_hold, upstream_sock)):
                if hold is not None and hold.transport is not None:
                    hold.transport.abort()
                else:
                    sock.close()
            raise
        pair = Pair(self, client, state.client, self.stats.port(state.port), state.port, state.frontend)
        client_side = ClientSide(self)
        client_side.pair = pair
        client.set_protocol(client_side)
        upstream.set_protocol(UpstreamSide(pair))
        pair.adopt(upstream, moved_endpoint(state.endpoint), state)
        for hold, side in ((client_hold, client_side), (upstream_hold, upstream.get_protocol())):
            hold.replay(cast(asyncio.Protocol, side))


def moved_endpoint(address: tuple[str, int]) -> Endpoint:
    """The endpoint of a moved connection (only its address matters once connected)."""
    return Endpoint(address[0], address[1], ready=True, serving=True, terminating=False, is_local=False)


class Holding(asyncio.Protocol):
    """The first protocol of an adopted socket's transport: paused from the start, it keeps
    whatever still reaches it until the pair's own protocol takes over (`replay`)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def replay(self, protocol: asyncio.Protocol) -> None:
        for chunk in self.data:
            protocol.data_received(chunk)
        if self.eof:
            protocol.eof_received()
        if self.lost is not None:
            protocol.connection_lost(self.lost[0])


class ClientSide(asyncio.Protocol):
    """The accepted (client-facing) side of a proxied connection."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pair: Pair | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        try:
            self._serve(transport)
        except Exception as err:  # a bug costs this connection and a rate-limited log line, never a socket
            self.relay.errors.note("internal", err, f"relay: unexpected error while serving a connection: {err!r}",
                                   level=logging.ERROR)
            if self.pair is not None:
                self.pair.close(abort=True)
            else:
                transport.abort()

    def _serve(self, transport: asyncio.Transport) -> None:
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        client = host_port(peer) if peer else None
        destination = host_port(local) if local else None
        if self.relay.draining:
            reset(transport)
            return
        if client is None or destination is None:  # reset before we got to it: getpeername failed
            self.relay.errors.note("client", OSError(errno.ENOTCONN, "gone"),
                                   "clients reset their connections before they were served")
            transport.abort()
            return
        route = self.relay.route(client, destination)
        if route is None:
            self.relay.stats.unknown_destination += 1
            reset(transport)
            return
        port_stats = self.relay.stats.port(route.port.name)
        plan = plan_connection(route, source_matters(route) and self.relay.is_local_source(client[0]))
        if not plan.candidates:
            port_stats.refused += 1
            reset(transport)
            return
        self.pair = Pair(self.relay, transport, client, port_stats, route.port.name, destination)
        self.pair.start_dial(route, plan.candidates, plan.transparent)

    def data_received(self, data: bytes) -> None:
        if self.pair is not None:
            self.pair.from_client(data)

    def eof_received(self) -> bool:
        if self.pair is not None:
            return self.pair.client_eof()
        return False

    def pause_writing(self) -> None:
        if self.pair is not None:
            self.pair.pause(upstream=True)

    def resume_writing(self) -> None:
        if self.pair is not None:
            self.pair.resume(upstream=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pair is not None:
            if exc is not None and not self.pair.closed:
                if self.pair.upstream is None:
                    self.relay.errors.note("client", exc, "clients reset their connections while the endpoint was dialed")
                else:
                    self.relay.errors.note("relay", exc, f"connections ended by a socket error: {exc}")
            self.pair.lost()


class UpstreamSide(asyncio.Protocol):
    """The endpoint-facing side."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    def data_received(self, data: bytes) -> None:
        self.pair.from_upstream(data)

    def eof_received(self) -> bool:
        return self.pair.upstream_eof()

    def pause_writing(self) -> None:
        self.pair.pause(upstream=False)

    def resume_writing(self) -> None:
        self.pair.resume(upstream=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost()


class Pair:
    """One proxied connection: the client transport, the upstream transport, and their state."""

    def __init__(
        self, relay: Relay, client: asyncio.Transport, client_address: tuple[str, int], stats: PortStats,
        port_name: ServicePortName, frontend: tuple[str, int],
    ) -> None:
        self.relay = relay
        self.client = client
        self.client_address = client_address
        self.stats = stats
        self.port_name = port_name
        self.frontend = frontend
        self.bytes_in = 0  # this pair's own share of stats.bytes_in / bytes_out
        self.bytes_out = 0
        self.upstream: asyncio.Transport | None = None
        self.endpoint: Endpoint | None = None
        self.early: list[bytes] = []
        self.early_size = 0
        self.client_done = False  # client sent EOF
        self.upstream_done = False  # upstream sent EOF
        self.closed = False
        self.last_activity = self.started = relay.clock()
        self.timer: asyncio.TimerHandle | None = None
        self.dialer: asyncio.Task[None] | None = None
        self.moving = False  # reading is held while the pair is handed to a successor
        relay.pairs.add(self)
        stats.active += 1
        stats.total += 1
        client.set_write_buffer_limits(relay.config.write_buffer_high, relay.config.write_buffer_low)

    # dialing

    def start_dial(self, route: Route, candidates: tuple[Endpoint, ...], transparent: bool) -> None:
        self.dialer = asyncio.get_running_loop().create_task(
            self._dial(route, candidates, transparent), name=f"dial {self.client_address}"
        )

    async def _dial(self, route: Route, candidates: tuple[Endpoint, ...], transparent: bool) -> None:
        try:
            await self._dial_endpoints(route, candidates, transparent)
        except asyncio.CancelledError:
            raise  # the pair closed while dialing; the attempt closed its socket on the way out
        except Exception as err:
            self.relay.errors.note("internal", err, f"relay: unexpected error while dialing: {err!r}",
                                   level=logging.ERROR)
            self.close(abort=True)

    async def _dial_endpoints(self, route: Route, candidates: tuple[Endpoint, ...], transparent: bool) -> None:
        balancer = self.relay.table.balancers.get(route.port.name)
        client_ip = self.client_address[0]
        failed: set[tuple[str, int]] = set()
        for timeout in self.relay.config.dial_timeouts:
            if balancer is None or self.closed:
                break
            endpoint = balancer.pick(client_ip, candidates, self.relay.clock(), exclude=failed)
            if endpoint is None:
                break
            try:
                sock = _upstream_socket(client_ip if transparent else None, ipv6=":" in endpoint.ip)
            except OSError as err:  # out of file descriptors, say: not the endpoint's fault
                self.relay.errors.note("upstream", err, f"cannot make an upstream socket: {err}")
                break
            try:
                transport = await self._dial_one(sock, endpoint, timeout)
            except (OSError, asyncio.TimeoutError) as err:
                failed.add(endpoint.address)
                self.relay.stats.dial_failed(route.port.name, endpoint.address)
                self.relay.errors.note("dial", err, f"dial {endpoint} for {route.port.name} failed: {err or 'timeout'}",
                                       key=f"dial {endpoint} {error_name(err)}")
                continue
            if transport is None:
                return  # the client left while we dialed
            self._connected(transport, endpoint)
            return
        if not self.closed:
            self.stats.refused += 1
            reset(self.client)
            self.lost()

    async def _dial_one(self, sock: socket.socket, endpoint: Endpoint, timeout: float) -> asyncio.Transport | None:
        """Connect `sock` and wrap it in a transport; None if the pair closed meanwhile. The
        socket is closed on every way out but success (then the transport owns it)."""
        loop = asyncio.get_running_loop()
        transport: asyncio.Transport | None = None
        try:
            await asyncio.wait_for(loop.sock_connect(sock, endpoint.address), timeout)
            if self.closed:
                return None
            transport, _ = await loop.create_connection(lambda: UpstreamSide(self), sock=sock)
        finally:
            if transport is None:
                sock.close()
        if self.closed:  # closed while the transport was made: nothing will close it but us
            transport.abort()
            return None
        return transport

    def _connected(self, transport: asyncio.Transport, endpoint: Endpoint) -> None:
        self.upstream = transport
        self.endpoint = endpoint
        config = self.relay.config
        transport.set_write_buffer_limits(config.write_buffer_high, config.write_buffer_low)
        if self.early:
            transport.write(b"".join(self.early))
            self.early.clear()
            self.early_size = 0
            self.client.resume_reading()
        if self.client_done:
            transport.write_eof()
        self._arm_timer()

    # byte path

    def from_client(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        self.bytes_in += len(data)
        self.last_activity = self.relay.clock()
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > EARLY_BUFFER_LIMIT:
            self.client.pause_reading()

    def from_upstream(self, data: bytes) -> None:
        self.stats.bytes_out += len(data)
        self.bytes_out += len(data)
        self.last_activity = self.relay.clock()
        self.client.write(data)

    def pause(self, upstream: bool) -> None:
        """`upstream`: the client's write buffer is full, so stop reading the upstream."""
        if upstream:
            if self.upstream is not None:
                self.upstream.pause_reading()
        else:
            self.client.pause_reading()

    def resume(self, upstream: bool) -> None:
        if self.moving:
            return
        if upstream:
            if self.upstream is not None and not self.upstream_done:
                self.upstream.resume_reading()
        elif not self.client_done:
            self.client.resume_reading()

    def info(self) -> ConnectionInfo:
        endpoint = self.endpoint.address if self.endpoint is not None else None
        return ConnectionInfo("TCP", self.port_name, self.client_address, self.frontend, endpoint, self.bytes_in,
                              self.bytes_out, self.started, self.last_activity, self.client_done, self.upstream_done)

    # moving to a successor

    def hold(self) -> None:
        """Stop reading both sides, so what is buffered can only shrink."""
        self.moving = True
        self.client.pause_reading()
        if self.upstream is not None:
            self.upstream.pause_reading()

    def write_buffered(self) -> int:
        return sum(t.get_write_buffer_size() for t in (self.client, self.upstream) if t is not None)

    def release(self) -> None:
        """Not moving after all: read again what neither ended nor has its peer's buffer full."""
        self.moving = False
        low = self.relay.config.write_buffer_low
        if not self.client_done and (self.upstream is None or self.upstream.get_write_buffer_size() <= low):
            self.client.resume_reading()
        if self.upstream is not None and not self.upstream_done and self.client.get_write_buffer_size() <= low:
            self.upstream.resume_reading()

    def detach(self) -> tuple[TcpState, list[int]]:
        """This pair's state and dups of its two sockets; then it ends here without a FIN
        or RST (the kernel sockets live on in the dups). Write buffers must be empty."""
        assert self.upstream is not None and self.endpoint is not None
        fds: list[int] = []
        try:
            for transport in (self.client, self.upstream):
                fds.append(os.dup(transport.get_extra_info("socket").fileno()))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        now = self.relay.clock()
        state = TcpState(
            self.port_name, self.client_address, self.frontend, self.endpoint.address, now - self.started,
            now - self.last_activity, self.bytes_in, self.bytes_out,
            up=DirectionState(eof=self.client_done, shut=self.client_done),
            down=DirectionState(eof=self.upstream_done, shut=self.upstream_done),
        )
        self.close()  # buffers are empty: close() only closes this process's fds
        return state, fds

    def adopt(self, upstream: asyncio.Transport, endpoint: Endpoint, state: TcpState) -> None:
        """Take up a moved pair's state (`upstream`: its connected transport, paused)."""
        self.upstream, self.endpoint = upstream, endpoint
        config = self.relay.config
        upstream.set_write_buffer_limits(config.write_buffer_high, config.write_buffer_low)
        now = self.relay.clock()
        self.started, self.last_activity = now - state.age, now - state.idle
        self.bytes_in, self.bytes_out = state.bytes_in, state.bytes_out
        self.client_done, self.upstream_done = state.up.eof, state.down.eof
        # reading first, then the held bytes: no callback runs in between, and a full
        # buffer's pause_writing must win over the resume
        if not self.client_done:
            self.client.resume_reading()
        if not self.upstream_done:
            upstream.resume_reading()
        for transport, direction in ((upstream, state.up), (self.client, state.down)):
            if direction.held:
                transport.write(direction.held)
            if direction.eof and not direction.shut:
                transport.write_eof()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(0.0, self._timeout() - state.idle), self._check_idle)

    # closing

    def client_eof(self) -> bool:
        self.client_done = True
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()
        return self._half_closed()

    def upstream_eof(self) -> bool:
        self.upstream_done = True
        if self.client.can_write_eof():
            self.client.write_eof()
        return self._half_closed()

    def _half_closed(self) -> bool:
        """Keep a half-closed pair open until the other direction ends too."""
        if self.client_done and self.upstream_done:
            self.close()
            return False
        return True

    def lost(self) -> None:
        self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.pairs.discard(self)
        self.stats.active -= 1
        if self.timer is not None:
            self.timer.cancel()
        if self.dialer is not None and not self.dialer.done():
            self.dialer.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.abort() if abort else transport.close()

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._timeout()
        self.timer = loop.call_at(loop.time() + timeout, self._check_idle)

    def _timeout(self) -> float:
        return pair_timeout(self.relay.config, self.client_done or self.upstream_done)

    def _check_idle(self) -> None:
        if self.closed:
            return
        idle = self.relay.clock() - self.last_activity
        remaining = self._timeout() - idle
        if remaining <= 0:
            self.relay.errors.note("idle", None, "closing connections idle past their timeout")
            self.close(abort=True)
            return
        self.timer = asyncio.get_running_loop().call_later(remaining, self._check_idle)


def _upstream_socket(source_ip: str | None, ipv6: bool = False) -> socket.socket:
    """A socket towards an endpoint of one family; with `source_ip`, transparent and bound
    to it (the client's address: Local policy)."""
    sock = family_socket(ipv6, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if source_ip is not None:
        try:
            set_transparent(sock)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        except OSError:
            sock.close()
            raise
    return sock
