"""The splice relay in pure Python: raw sockets driven by event-loop callbacks, `os.splice` for bulk.

This is the `relay: splice` data path (config `dataplane.relay`) where the compiled engine
(`engine.py`, `_native/engine.c`) is not built or `PYPROXY_PURE_PYTHON=1`: its twin, and
the engine's theory of operation too (`make_splice_relay`, at the end, picks one).
Both keep the same rules (SPEC.md §5, §8; the contract is `relay.py`) and take every
*decision* from the same pure code: the service port (`ServiceTable.routes`), the endpoint set and
source policy (`plan_connection`), the endpoint (`Balancer.pick`, affinity included), and
which timeout applies (`pair_timeout`). What differs is only how bytes move.

Theory of operation:
- Accepting: `loop.add_reader` on the transparent listener; each wake-up accepts a bounded
  batch. The accepted socket's local address is the original destination (TPROXY).
- Readiness of the proxied sockets comes from an epoll set of the relay's own (`poller.py`),
  itself one fd in the event loop: one EPOLL_CTL_ADD per socket, a MOD when its interest
  changes, nothing at close (the loop's add_reader/remove_reader cost a dozen syscalls per
  connection).
- Dialing: a non-blocking `connect_ex`, EPOLLOUT and a timer per attempt; no task, no
  future, no transport. A failed or timed-out endpoint is excluded and the pick is made
  again, up to `len(dial_timeouts)` attempts; then the client gets a reset. The client is
  not read until the upstream is connected, so no early bytes need buffering.
- Moving bytes, per direction (client->upstream, upstream->client): `recv_into` one
  shared buffer and `send`, while the direction has carried fewer than `splice_after`
  bytes (small exchanges: one syscall each way, no pipe). After that the direction gets a
  pipe pair and moves bytes socket -> pipe -> socket with `os.splice` (no copy through
  userspace). `splice_after = 0` splices from the first byte; a negative value never does.
- Backpressure: when the destination cannot take everything (a partial send, or bytes
  left in the pipe), the direction stops reading its source and waits for the destination
  to be writable; at most one buffer (or one pipe) per direction is ever held. A pipe starts
  at 64 KiB and grows only while its destination keeps up, within a budget per relay
  (PIPE_BUDGET): a slow reader pins 64 KiB of pipe, not 1 MiB.
- Half-close: EOF from a source becomes `shutdown(SHUT_WR)` on its destination once
  everything read has been written; the pair closes when both directions are shut, on any
  socket error, or when idle past `pair_timeout` (shorter once half-closed), which one
  sweep timer per relay checks (not a timer per pair: idle pairs cost no timer).
- Urgent data (MSG_OOB) is passed in band, as the engine does (engine.c's "Urgent data"):
  every socket has SO_OOBINLINE (the listener's accepted sockets inherit it; each upstream;
  each adopted socket). A splice never steps over the urgent mark (EAGAIN there, or 0 once
  the FIN has come), only a read does: a splicing direction whose source reports EPOLLPRI
  empties its pipe and copies, and a splice's 0 is the EOF only if the source is not at the
  mark (SIOCATMARK).
- Every socket is forgotten by the poller before it is closed.
- `connections()` hands out read-only copies (`ConnectionInfo`) of the open pairs for the
  inspection API.
- Moving to a successor (`detach_pairs`, `adopt_pair`): an established pair is taken out
  of the poller's set (unregistered: the kernel sockets live on in the dups, so closing
  this process's fds would not remove them) and handed out with its state: per direction
  the bytes still held (`pending`), the pipe's two fds and how much it holds, EOF and
  shutdown flags (the copy/splice policy's counters start again from zero). Nothing is in flight in userspace otherwise, so every established pair
  moves; a pair still dialing drains here. The successor rebuilds the two Directions and
  restarts each where it was: writing what is held, forwarding a pending EOF, or reading.
- No socket outlives its pair: while dialing, the client is watched for errors and
  hang-ups only (mask 0), so a client that resets mid-dial closes the pair and its
  upstream attempt at once; an unexpected error in a handler closes that pair. Out of
  file descriptors, accepting pauses briefly instead of spinning. Errors are counted and
  logged at a bounded rate (errors.py), never a line per connection.

Why one module this long: accepting, dialing and the two byte directions are one
connection's life and share its state; split over files they would all reach into each other.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from pyproxy.dataplane.errors import ErrorLog, error_name
from pyproxy.dataplane.copystep import BUFFER_SIZE as COPY_BUFFER
from pyproxy.dataplane.copystep import copy_once, take_rest
from pyproxy.dataplane.poller import ERR_HUP, IN, IN_RDHUP, OUT, PRI, RDHUP, Poller
from pyproxy.dataplane.relay import (
    IP_BIND_ADDRESS_NO_PORT,
    LINGER_RESET,
    RelayConfig,
    TcpRelay,
    drain_pairs,
    pair_timeout,
    reset_fds,
)
from pyproxy.dataplane.sockets import IP_TRANSPARENT, IPV6_TRANSPARENT, transparent_listener
from pyproxy.dataplane.stats import ConnectionInfo, DataplaneStats, PortStats
from pyproxy.dataplane.connstate import DirectionState, TcpState, movable
from pyproxy.model.copymode import SPLICE_NOW, CopyPolicy
from pyproxy.model.endpoints import Endpoint, EndpointSets
from pyproxy.model.family import host_port
from pyproxy.model.source import SourcePolicy
from pyproxy.model.table import PortState, Route, ServiceTable, plan_connection, source_matters

log = logging.getLogger("pyproxy.splice")

Sock = _socket.socket  # the C socket type (socket.socket's base): cheaper to make and to close
AF_INET, AF_INET6, SOCK_STREAM, IPPROTO_TCP, TCP_NODELAY, SOL_IP, IPPROTO_IPV6, IPV6_V6ONLY = (
    socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.TCP_NODELAY, socket.SOL_IP,
    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
SOL_SOCKET, SO_OOBINLINE = socket.SOL_SOCKET, socket.SO_OOBINLINE
SOCK_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK

ACCEPT_BATCH = 64
# Pipes (engine.c's "Pipes" too): a new pipe is the kernel's default, PIPE_BASE; once a splice
# round filled it and its destination took it all, it grows to the first of PIPE_SIZES the
# kernel grants (1 MiB is the default fs.pipe-max-size and moved a stream with ~16 % less proxy
# CPU per Gbit/s than 256 KiB: about half the splices and wake-ups per GB; 256 KiB where 1 MiB is
# refused), while the relay's pipes hold at most PIPE_BUDGET bytes above PIPE_BASE together.
PIPE_BASE = 64 * 1024
PIPE_SIZES = (1024 * 1024, 256 * 1024)
PIPE_SIZE = PIPE_SIZES[0]  # bytes asked of each splice (a smaller pipe simply takes less)
PIPE_BUDGET = 32 * 1024 * 1024
F_GETPIPE_SZ = 1032
SPLICE_SLOTS = (0,) * 4  # splice rounds per readable event before yielding to the loop
STATS_CACHE_LIMIT = 65536
READ_SLOTS = (0,) * 4  # copy-mode reads per readable event (a tuple: no range() per event)
F_SETPIPE_SZ = 1031
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
DEFAULT_SPLICE_AFTER = 64 * 1024
IN_ERR_HUP = IN | ERR_HUP
OUT_ERR_HUP = OUT | ERR_HUP
SIOCATMARK = 0x8905  # <linux/sockios.h>: is the next byte the urgent one?
ACCEPT_PAUSE = 0.1  # seconds without accepting after EMFILE/ENFILE/ENOBUFS (the listener stays readable)


@dataclass
class FastRelay:
    kind: ClassVar[str] = "splice, pure Python"
    label: ClassVar[str] = "twin"  # pyproxy_tcp_relay_info{relay="twin"}
    table: ServiceTable
    is_local_source: Callable[[str], bool]
    stats: DataplaneStats
    config: RelayConfig = field(default_factory=RelayConfig)
    clock: Callable[[], float] = time.monotonic
    splice_after: int = DEFAULT_SPLICE_AFTER
    pairs: set[FastPair] = field(default_factory=set)
    listener: socket.socket | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _sweeper: asyncio.TimerHandle | None = None
    draining: bool = False
    _stats_cache: dict[tuple[str, str, int], tuple[Route, PortStats]] = field(default_factory=dict)
    errors: ErrorLog = field(init=False)
    _accept_paused: asyncio.TimerHandle | None = None
    sources: Callable[[], SourcePolicy] = SourcePolicy  # whose address endpoints see (model/source.py)
    pipe_grown: int = 0  # bytes of pipe above PIPE_BASE the directions hold (at most PIPE_BUDGET)

    def __post_init__(self) -> None:
        self.errors = ErrorLog(self.stats.connection_errors, log)
        self.policy = CopyPolicy(splice_after=self.splice_after)

    policy: CopyPolicy = field(init=False)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.listener = sock if sock is not None else transparent_listener(host, port)
        self.listener.setblocking(False)
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # urgent data in band: these too
        self.poller = Poller(self._loop)
        self._loop.add_reader(self.listener.fileno(), self._accept)
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep_interval(self) -> float:
        return max(0.01, min(1.0, self.config.idle_timeout / 4, self.config.half_close_timeout / 4))

    def _sweep(self) -> None:
        """Close pairs idle past their bound: one timer for all pairs, not one each."""
        now = self.clock()
        for pair in [p for p in self.pairs if p.idle_expired(now)]:
            self.errors.note("idle", None, "closing connections idle past their timeout")
            pair.close(abort=True)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    def connections(self) -> Iterator[ConnectionInfo]:
        """A read-only picture of every open pair (for the inspection API)."""
        for pair in list(self.pairs):
            yield pair.info()

    def stop_accepting(self) -> None:
        """Draining: new connections are reset at once (a closed TPROXY listener would make
        their SYNs vanish, so clients would wait for a timeout instead of trying elsewhere)."""
        self.draining = True

    def release_listener(self) -> None:
        """A successor holds the listener now (pyproxy/lifecycle): stop accepting, close this copy."""
        self._close_listener()

    def _close_listener(self) -> None:
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None
        elif self.listener is not None and self._loop is not None:
            self._loop.remove_reader(self.listener.fileno())
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # moving to a successor

    async def detach_pairs(self) -> list[tuple[TcpState, list[int]]]:
        """Take every established pair out of this process: its state and its fds (dups
        the caller sends and closes). Pairs still dialing stay and drain here."""
        leaving = [p for p in self.pairs if movable(p.up is not None and p.down is not None, p.closed, 0) is None]
        moved: list[tuple[TcpState, list[int]]] = []
        try:  # all or nothing: every pair's dups first (EMFILE, say, leaves every pair here)
            for pair in leaving:
                moved.append(pair.export())
        except BaseException:
            for _, fds in moved:
                for fd in fds:
                    os.close(fd)
            raise
        for pair in leaving:  # then they leave, which cannot fail
            pair.leave()
        return moved

    async def adopt_pair(self, state: TcpState, fds: list[int]) -> None:
        """Go on relaying a pair another process detached (`fds`: client, upstream, then
        the read and write ends of each direction's pipe that came along, up first). The
        relay owns `fds` from the call on: on any failure they are closed (the sockets with a
        reset) and the error raised."""
        sockets: list[socket.socket] = []
        try:
            if self._loop is None:
                raise RuntimeError("adopt_pair before start")
            if len(fds) != state.fd_count:
                raise ValueError(f"{len(fds)} fds for a pair whose state needs {state.fd_count}")
            for fd in fds[:2]:  # the two sockets must be what they claim: sockets
                sockets.append(socket.socket(fileno=fd))
            for sock in sockets:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)  # urgent data in band
        except BaseException:
            for sock in sockets:
                _reset(sock)
            reset_fds(fds[len(sockets):])
            raise
        frontend = (state.frontend[0], "TCP", state.frontend[1])
        route = self.table.routes.get(frontend)
        if route is None or route.port.name != state.port:  # gone meanwhile: the pair still lives
            route = Route(PortState(state.port, EndpointSets((), (), ()), None, False, False), external=False)
        client, upstream = sockets
        pair = FastPair(self, self._loop, client, state.client, route, self.stats.port(state.port), state.frontend)
        try:
            pair.adopt(upstream, state, fds[2:])
        except BaseException:  # its directions took none of the pipes, or closed them with the pair
            taken = {fd for d in (pair.up, pair.down) if d is not None and d.pipe is not None for fd in d.pipe}
            pair.close(abort=True)
            for fd in fds[2:]:
                if fd not in taken:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise

    async def drain(self, timeout: float) -> int:
        """Wait for open connections to finish, up to `timeout`; abort the rest. Returns how many were cut."""
        cut = await drain_pairs(self.pairs, timeout, self.clock)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._close_listener()
        self.poller.close()
        self.errors.close()
        return cut

    poller: Poller = field(init=False)

    def _accept(self) -> None:
        listener = self.listener
        if listener is None:
            return
        family = listener.family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, client = listener._accept()  # type: ignore[attr-defined]  # accept() converts enums each call
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE, ENFILE, ENOBUFS: leave the rest queued, and pause
                self.errors.note("accept", err, f"accept failed: {err}; pausing accepts for {ACCEPT_PAUSE}s",
                                 level=logging.WARNING)
                self._pause_accepting()
                return
            conn = _socket.socket(family, SOCK_STREAM, 0, fd)  # the C type: no Python-level __init__/close
            client = host_port(client)
            if self.draining:
                _reset(conn)
                continue
            try:
                self._serve(conn, client)
            except Exception as err:  # a bug costs this connection and a rate-limited line, never a socket
                self.errors.note("internal", err, f"splice relay: unexpected error serving a connection: {err!r}",
                                 level=logging.ERROR)
                self._abandon(conn)

    def _pause_accepting(self) -> None:
        """A listener that cannot accept stays readable: stop watching it for a moment
        rather than spin (the queued connections wait in the backlog)."""
        if self.listener is None or self._loop is None or self._accept_paused is not None:
            return
        self._loop.remove_reader(self.listener.fileno())
        self._accept_paused = self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = None
        if self.listener is not None and self._loop is not None:
            self._loop.add_reader(self.listener.fileno(), self._accept)

    def _abandon(self, conn: Sock) -> None:
        """Close `conn` and whatever pair it got (the pair closes it too)."""
        pair = next((p for p in self.pairs if p.client is conn), None)
        if pair is not None:
            pair.close(abort=True)
        elif conn.fileno() >= 0:
            self.poller.forget(conn.fileno())
            _reset(conn)

    def _serve(self, conn: Sock, client: tuple[str, int]) -> None:
        conn.setblocking(False)
        try:
            destination = host_port(conn.getsockname())
        except OSError as err:
            self.errors.note("client", err, "clients reset their connections before they were served")
            conn.close()
            return
        frontend = (destination[0], "TCP", destination[1])
        route = self.table.routes.get(frontend)
        if route is None:
            self.stats.unknown_destination += 1
            _reset(conn)
            return
        port_stats = self._port_stats(frontend, route)
        plan = plan_connection(route, source_matters(route) and self.is_local_source(client[0]))
        if not plan.candidates:
            port_stats.refused += 1
            _reset(conn)
            return
        assert self._loop is not None
        pair = FastPair(self, self._loop, conn, client, route, port_stats, destination)
        pair.dial(plan.candidates, plan.transparent)

    def _port_stats(self, frontend: tuple[str, str, int], route: Route) -> PortStats:
        """The port's counters, cached per frontend while its route object stays the same
        (hashing the service port name per connection costs more than the lookup)."""
        cached = self._stats_cache.get(frontend)
        if cached is not None and cached[0] is route:
            return cached[1]
        stats = self.stats.port(route.port.name)
        if len(self._stats_cache) >= STATS_CACHE_LIMIT:
            self._stats_cache.clear()
        self._stats_cache[frontend] = (route, stats)
        return stats

def _moved_endpoint(address: tuple[str, int]) -> Endpoint:
    return Endpoint(address[0], address[1], ready=True, serving=True, terminating=False, is_local=False)


def _restore(direction: Direction, state: DirectionState, pipe: tuple[int, int] | None) -> None:
    """Set a moved direction's fields from its state. A pipe the new Direction made for
    itself (splice from the first byte) gives way to the moved one, or to held bytes
    (which are written in copy mode: a direction holds bytes or a pipe, never both)."""
    if direction.pipe is not None and (pipe is not None or state.held):
        direction._to_copy()
    direction.eof, direction.shut = state.eof, state.shut
    direction.pending = state.held or None
    if pipe is not None:
        direction.pipe, direction.in_pipe = pipe, state.in_pipe
        size = fcntl.fcntl(pipe[1], F_GETPIPE_SZ)  # as it is: it may have grown in the predecessor
        direction.pipe_cap = PIPE_BASE if size <= PIPE_BASE else 0
        direction.pipe_extra = max(0, size - PIPE_BASE)
        direction.pair.relay.pipe_grown += direction.pipe_extra


def _restart(direction: Direction) -> None:
    """Go on where the old process stopped: write what is held, forward an EOF, or read."""
    if direction.pending is not None or direction.in_pipe:
        direction._wait_for_dst()
    elif direction.eof:
        direction._shut()  # nothing once shut
    else:
        direction._watch_src()


def _snapshot(direction: Direction) -> DirectionState:
    held = bytes(direction.pending) if direction.pending is not None else b""
    return DirectionState(direction.eof, direction.shut, held, direction.pipe is not None, direction.in_pipe)


def _dial_socket(source_ip: str | None, ipv6: bool = False) -> Sock:
    """A non-blocking upstream socket of one family (SOCK_NONBLOCK: no extra syscall; an IPv6
    one is V6ONLY, as sockets.family_socket makes them), TCP_NODELAY, and bound to the client's
    address when it is to be kept (transparent)."""
    sock = _socket.socket(AF_INET6 if ipv6 else AF_INET, SOCK_STREAM_NONBLOCK)
    try:
        if ipv6:
            sock.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 1)
        sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        sock.setsockopt(SOL_SOCKET, SO_OOBINLINE, 1)  # urgent data in band
        if source_ip is not None:
            if ipv6:
                sock.setsockopt(IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _at_urgent_mark(fd: int) -> bool:
    """Whether the next byte to read from fd is the urgent one (a splice stops in front of it)."""
    try:
        return fcntl.ioctl(fd, SIOCATMARK, bytes(4)) != bytes(4)  # an int, nonzero at the mark
    except OSError:
        return False


def _reset(sock: Sock) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()


class Direction:
    """One direction of a pair: bytes from `src` to `dst`, copied or spliced (model/copymode.py)."""

    __slots__ = ("pair", "src", "dst", "src_fd", "dst_fd", "pending", "pipe", "in_pipe", "pipe_cap", "pipe_extra",
                 "eof", "shut", "streak", "small", "policy", "count_in", "reading", "writing")

    def __init__(self, pair: FastPair, src: Sock, dst: Sock, count_in: bool) -> None:
        self.pair = pair
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.pending: bytes | None = None  # copy mode: bytes read but not yet written
        self.pipe: tuple[int, int] | None = None  # splice mode: (read end, write end)
        self.in_pipe = 0
        self.pipe_cap = 0  # the pipe's capacity (PIPE_BASE until it grows; 0: it will not grow)
        self.pipe_extra = 0  # its bytes above PIPE_BASE, counted in the relay's pipe_grown
        self.eof = False
        self.shut = False
        self.policy = pair.relay.policy
        self.streak = 0  # copy mode: bytes of bulk reads in a row
        self.small = 0  # splice mode: small rounds in a row
        self.count_in = count_in  # client -> upstream
        self.reading = False  # src is watched for reading
        self.writing = False  # dst is watched for writing
        if self.policy.splice_first:
            self._to_splice()

    def _watch_src(self) -> None:
        if not self.reading:
            self.reading = True
            self.pair.interest(self.src_fd)

    def _unwatch_src(self) -> None:
        if self.reading:
            self.reading = False
            self.pair.interest(self.src_fd)

    def on_readable(self, bits: int) -> None:
        """The poller's handler for src while this direction only reads it (the other
        direction is not waiting to write there): one frame per event, not two."""
        if self.pair.closed:
            return
        try:
            self.readable(bits)
        except Exception as err:
            self.pair._internal(err)

    def readable(self, bits: int = 0) -> None:
        """Move what src has. A read shorter than the buffer drained the socket, unless the
        peer's FIN is there too (EPOLLRDHUP): then read on, to see the EOF now."""
        if self.pipe is not None:
            if not bits & PRI:
                self._splice_in()
                return
            if not self._flush_pipe():  # urgent data waits: empty the pipe, then copy over the mark
                return
            if self.in_pipe:
                self._wait_for_dst()
                return
            self._to_copy()
        copy = copy_once
        policy = self.policy
        for _ in READ_SLOTS:
            try:
                n = copy(self.src_fd, self.dst_fd)
            except OSError as err:
                self.pair.failed(err)
                return
            if n <= 0:
                if n == -1:  # drained
                    break
                if n == 0:
                    self._ended()
                    return
                self._account(-1 - n)  # dst is full: keep the rest, wait for it to drain
                self.pending = take_rest()
                self.streak = 0
                self._wait_for_dst()
                return
            pair = self.pair  # self._account(n), inlined: this is the per-message path
            pair.last_activity = pair.relay.clock()
            if self.count_in:
                pair.stats.bytes_in += n
                pair.bytes_in += n
            else:
                pair.stats.bytes_out += n
                pair.bytes_out += n
            if n >= policy.bulk_read or self.streak:  # a short read only ever resets the streak
                streak = policy.copy_read(self.streak, n)
                if streak == SPLICE_NOW:
                    self.streak = 0
                    self._to_splice()
                    break
                self.streak = streak
            if n < COPY_BUFFER and not bits & RDHUP:
                break
        if not self.reading:
            self._watch_src()

    def _account(self, n: int) -> None:
        pair = self.pair
        pair.last_activity = pair.relay.clock()
        if self.count_in:
            pair.stats.bytes_in += n
            pair.bytes_in += n
        else:
            pair.stats.bytes_out += n
            pair.bytes_out += n

    def _to_splice(self) -> None:
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of fds: keep copying (the next bulk streak tries again)
        self.pipe = (r, w)
        self.pipe_cap = PIPE_BASE  # grown by _grow_pipe
        self.small = 0

    def _grow_pipe(self) -> None:
        """A round filled the pipe and dst took it all: grow it, within the relay's budget (once)."""
        assert self.pipe is not None
        relay = self.pair.relay
        cap, self.pipe_cap = self.pipe_cap, 0
        for size in PIPE_SIZES:
            if size <= cap or relay.pipe_grown + size - PIPE_BASE > PIPE_BUDGET:
                continue
            try:
                got = fcntl.fcntl(self.pipe[1], F_SETPIPE_SZ, size)
            except OSError:
                continue  # refused: a smaller size, else the pipe stays as it is (it still works)
            self.pipe_extra = max(0, got - PIPE_BASE)
            relay.pipe_grown += self.pipe_extra
            return

    def _close_pipe(self) -> None:
        assert self.pipe is not None
        os.close(self.pipe[0])
        os.close(self.pipe[1])
        self.pipe = None
        self.pair.relay.pipe_grown -= self.pipe_extra
        self.pipe_extra = 0

    def _to_copy(self) -> None:
        """Back to copying (the pipe is empty): small messages again."""
        assert self.pipe is not None and not self.in_pipe
        self._close_pipe()
        self.streak = 0

    def _splice_in(self) -> None:
        assert self.pipe is not None
        policy = self.policy
        for _ in SPLICE_SLOTS:
            try:
                n = os.splice(self.src_fd, self.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self.pair.failed(err)
                return
            if n == 0:
                if _at_urgent_mark(self.src_fd):  # not the EOF: a splice stops there; read over it
                    self._to_copy()
                    self.readable(PRI)
                    return
                self._ended()
                return
            self.in_pipe += n
            self._account(n)
            if not self._flush_pipe():
                return
            if self.in_pipe:
                self._wait_for_dst()
                return
            if self.pipe_cap and n >= self.pipe_cap:
                self._grow_pipe()
            self.small = policy.splice_round(self.small, n)
            if policy.back_to_copy(self.small):
                self._to_copy()
                break
        self._watch_src()

    def _flush_pipe(self) -> bool:
        """Move what the pipe holds to dst; False if the pair failed."""
        assert self.pipe is not None
        while self.in_pipe:
            try:
                n = os.splice(self.pipe[0], self.dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as err:
                self.pair.failed(err)
                return False
            self.in_pipe -= n
        return True

    def _wait_for_dst(self) -> None:
        self._unwatch_src()
        if not self.writing:
            self.writing = True
            self.pair.interest(self.dst_fd)

    def writable(self) -> None:
        if self.pipe is not None:
            if not self._flush_pipe() or self.in_pipe:
                return
        elif self.pending is not None:
            try:
                sent = self.dst.send(self.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.pair.failed(err)
                return
            self.pending = self.pending[sent:] if sent < len(self.pending) else None
            if self.pending is not None:
                return
        self.writing = False
        self.pair.interest(self.dst_fd)
        if self.eof:
            self._shut()
        else:
            self._watch_src()

    def _ended(self) -> None:
        """The source sent EOF: forward it once everything read has been written."""
        self.eof = True
        if self.pending is None and not self.in_pipe and self._other_shut():
            self.reading = False
            self._shut()  # the last direction: the pair closes, no interest change needed
            return
        self._unwatch_src()
        if self.pending is None and not self.in_pipe:
            self._shut()

    def _other_shut(self) -> bool:
        other = self.pair.down if self.count_in else self.pair.up
        return other is not None and other.shut

    def _shut(self) -> None:
        if self.shut:
            return
        self.shut = True
        if self._other_shut():
            # Both directions are done: close() sends this FIN (both receive queues are read
            # to their EOF, so it is a FIN, not a reset); a shutdown first would be one more call.
            self.pair.close()
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as err:
            if err.errno != errno.ENOTCONN:
                self.pair.failed(err)
                return
        self.pair.direction_done()

    def stop(self) -> None:
        """Release the pipe (the pair forgets and closes the sockets)."""
        self.reading = self.writing = False
        if self.pipe is not None:
            self._close_pipe()


class FastPair:
    """One proxied connection on the fast path: dial, then two `Direction`s."""

    def __init__(
        self, relay: FastRelay, loop: asyncio.AbstractEventLoop, client: Sock,
        client_address: tuple[str, int], route: Route, stats: PortStats, frontend: tuple[str, int],
    ) -> None:
        self.relay = relay
        self.loop = loop
        self.client = client
        self.client_address = client_address
        self.route = route
        self.stats = stats
        self.frontend = frontend
        self.bytes_in = 0  # this pair's own share of stats.bytes_in / bytes_out
        self.bytes_out = 0
        self.upstream: Sock | None = None
        self.endpoint: Endpoint | None = None
        self.up: Direction | None = None  # client -> upstream
        self.down: Direction | None = None  # upstream -> client
        self.candidates: tuple[Endpoint, ...] = ()
        self.transparent = False
        self.failed_endpoints: set[tuple[str, int]] = set()
        self.attempt = 0
        self.closed = False
        self.shared = False  # adopted: the predecessor may still hold dups of its sockets (see close)
        self.last_activity = self.started = relay.clock()
        self.timer: asyncio.TimerHandle | None = None
        relay.pairs.add(self)
        stats.active += 1
        stats.total += 1

    # dialing

    def dial(self, candidates: tuple[Endpoint, ...], transparent: bool) -> None:
        self.candidates, self.transparent = candidates, transparent
        # errors and hang-ups only: a client that resets while we dial ends the pair at once
        self.relay.poller.watch(self.client.fileno(), 0, self._client_event)
        self._dial_next()

    def _dial_next(self) -> None:
        timeouts = self.relay.config.dial_timeouts
        balancer = self.relay.table.balancers.get(self.route.port.name)
        endpoint = None
        if balancer is not None and self.attempt < len(timeouts):
            endpoint = balancer.pick(self.client_address[0], self.candidates, self.relay.clock(),
                                     exclude=self.failed_endpoints)
        if endpoint is None:
            self.stats.refused += 1
            self.relay.poller.forget(self.client.fileno())
            _reset(self.client)
            self._finish()
            return
        timeout = timeouts[self.attempt]
        self.attempt += 1
        self.endpoint = endpoint
        sources, client_ip = self.relay.sources(), self.client_address[0]
        keep = sources.keeps_client(sources.target_source(self.transparent, endpoint.ip), client_ip, endpoint.ip)
        try:
            sock = _dial_socket(client_ip if keep else None, ipv6=":" in endpoint.ip)
        except OSError as err:  # out of file descriptors, say: not the endpoint's fault
            self.relay.errors.note("upstream", err, f"cannot make an upstream socket: {err}")
            self.stats.refused += 1
            self.close(abort=True)
            return
        self.upstream = sock
        code = sock.connect_ex(endpoint.address)
        if code == 0:
            self._connected()
        elif code == errno.EINPROGRESS:
            self.relay.poller.watch(sock.fileno(), OUT, self._upstream_event)
            self.timer = self.loop.call_later(timeout, self._dial_timed_out)
        else:
            self._dial_failed(OSError(code, os.strerror(code)))

    def _dial_done(self, bits: int) -> None:
        """The connect finished: writable alone is success (no SO_ERROR call); an error or
        hang-up bit is a failure, whose reason SO_ERROR gives."""
        sock = self.upstream
        assert sock is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if bits & ERR_HUP else 0
        if err or bits & ERR_HUP:
            err = err or errno.ECONNREFUSED
            self._dial_failed(OSError(err, os.strerror(err)))
        else:
            self._connected()

    def _dial_timed_out(self) -> None:
        self.timer = None
        self._dial_failed(None)

    def _dial_failed(self, err: OSError | None) -> None:
        if self.upstream is not None:
            self.relay.poller.forget(self.upstream.fileno())
            self.upstream.close()
            self.upstream = None
        assert self.endpoint is not None
        self.failed_endpoints.add(self.endpoint.address)
        self.relay.stats.dial_failed(self.route.port.name, self.endpoint.address)
        self.relay.errors.note("dial", err, f"dial {self.endpoint} for {self.route.port.name} failed: {err or 'timeout'}",
                               key=f"dial {self.endpoint} {error_name(err)}")
        self.endpoint = None
        self._dial_next()

    def _connected(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        self.up = Direction(self, self.client, upstream, count_in=True)
        self.down = Direction(self, upstream, self.client, count_in=False)
        self.down._watch_src()
        self.up.readable()  # the client's request is usually there already: no wait for a wake-up

    def info(self) -> ConnectionInfo:
        up, down = self.up, self.down
        endpoint = self.endpoint.address if self.endpoint is not None and up is not None else None  # None: dialing
        return ConnectionInfo("TCP", self.route.port.name, self.client_address, self.frontend, endpoint,
                              self.bytes_in, self.bytes_out, self.started, self.last_activity,
                              up is not None and up.eof, down is not None and down.eof)

    # moving to a successor

    def export(self) -> tuple[TcpState, list[int]]:
        """This pair's state and dups of its sockets and pipes (the pair is not touched: it
        ends here only with `leave`)."""
        up, down, upstream, endpoint = self.up, self.down, self.upstream, self.endpoint
        assert up is not None and down is not None and upstream is not None and endpoint is not None
        owned = [self.client.fileno(), upstream.fileno()]
        for direction in (up, down):
            if direction.pipe is not None:
                owned.extend(direction.pipe)
        fds: list[int] = []
        try:
            for fd in owned:
                fds.append(os.dup(fd))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        now = self.relay.clock()
        state = TcpState(self.route.port.name, self.client_address, self.frontend, endpoint.address,
                         now - self.started, now - self.last_activity, self.bytes_in, self.bytes_out,
                         _snapshot(up), _snapshot(down))
        return state, fds

    def leave(self) -> None:
        """End here without a FIN or RST, once `export` made the dups (the kernel objects live
        on in them)."""
        assert self.upstream is not None
        for fd in (self.client.fileno(), self.upstream.fileno()):  # out of the epoll set: closing
            self.relay.poller.park(fd)  # our fd would not take it out
        self.close()

    def adopt(self, upstream: socket.socket, state: TcpState, pipe_fds: list[int]) -> None:
        """Take up a moved pair: its connected upstream, its directions' state and pipes."""
        self.upstream, self.endpoint = upstream, _moved_endpoint(state.endpoint)
        self.shared = True
        now = self.relay.clock()
        self.started, self.last_activity = now - state.age, now - state.idle
        self.bytes_in, self.bytes_out = state.bytes_in, state.bytes_out
        self.up = Direction(self, self.client, upstream, count_in=True)
        self.down = Direction(self, upstream, self.client, count_in=False)
        pipes = iter(zip(pipe_fds[::2], pipe_fds[1::2]))
        for direction, moved in ((self.up, state.up), (self.down, state.down)):
            _restore(direction, moved, next(pipes) if moved.pipe else None)
        for direction in (self.up, self.down):
            if not self.closed:
                _restart(direction)

    # closing

    def direction_done(self) -> None:
        if self.up is not None and self.down is not None and self.up.shut and self.down.shut:
            self.close()

    def failed(self, err: OSError) -> None:
        self.relay.errors.note("relay", err, f"connections ended by a socket error: {err}")
        self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        for direction in (self.up, self.down):
            if direction is not None:
                direction.stop()
        # Closing an fd takes it out of the epoll set only with the socket's last reference: an
        # adopted pair's sockets may live on in the predecessor's dups, so they leave the set
        # first (else their events would reach the next socket given the same fd number).
        poller = self.relay.poller
        let_go = poller.park if self.shared else poller.forget
        if self.upstream is not None:
            let_go(self.upstream.fileno())
            (_reset if abort else Sock.close)(self.upstream)
        let_go(self.client.fileno())
        (_reset if abort else Sock.close)(self.client)
        self._finish()
        self.up = self.down = None  # no cycle left: the pair is freed by its refcount, not the GC

    # readiness: one epoll registration per socket (poller.py)

    def interest(self, fd: int) -> None:
        """Re-state what `fd` (the client's or the upstream's) is watched for."""
        up, down = self.up, self.down
        assert up is not None and down is not None
        if fd == up.src_fd:  # the client
            mask = (IN_RDHUP if up.reading else 0) | (OUT if down.writing else 0)
            self.relay.poller.watch(fd, mask, up.on_readable if mask == IN_RDHUP else self._client_event)
        else:
            mask = (IN_RDHUP if down.reading else 0) | (OUT if up.writing else 0)
            self.relay.poller.watch(fd, mask, down.on_readable if mask == IN_RDHUP else self._upstream_event)

    def _client_event(self, bits: int) -> None:
        try:
            up, down = self.up, self.down
            if self.closed:
                return
            if up is None or down is None:  # dialing: only errors and hang-ups are watched
                if bits & ERR_HUP:
                    self.relay.errors.note("client", OSError(errno.ECONNRESET, "reset"),
                                           "clients reset their connections while the endpoint was dialed")
                    self.close(abort=True)
                return
            if not (up.reading or down.writing):
                self._hung_up(up.src_fd, bits)
                return
            if up.reading and bits & IN_ERR_HUP:
                up.readable(bits)
            if down.writing and not self.closed and bits & OUT_ERR_HUP:
                down.writable()
        except Exception as err:
            self._internal(err)

    def _upstream_event(self, bits: int) -> None:
        try:
            up, down = self.up, self.down
            if self.closed:
                return
            if up is None or down is None:
                if self.upstream is not None and bits & OUT_ERR_HUP:
                    self._dial_done(bits)
                return
            if not (down.reading or up.writing):
                self._hung_up(down.src_fd, bits)
                return
            if down.reading and bits & IN_ERR_HUP:
                down.readable(bits)
            if up.writing and not self.closed and bits & OUT_ERR_HUP:
                up.writable()
        except Exception as err:
            self._internal(err)

    def _internal(self, err: Exception) -> None:
        """A bug in a handler: this pair ends (sockets and pipes closed), the loop goes on."""
        self.relay.errors.note("internal", err, f"splice relay: unexpected error in a connection: {err!r}",
                               level=logging.ERROR)
        self.close(abort=True)

    def _hung_up(self, fd: int, bits: int) -> None:
        """An error or hang-up on an fd nobody is waiting on: fail, or stop it spinning."""
        if bits & select.EPOLLERR:
            self.failed(OSError(errno.ECONNRESET, "socket error"))
        elif bits & select.EPOLLHUP:
            self.relay.poller.park(fd)

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.pairs.discard(self)
        self.stats.active -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _half_closed(self) -> bool:
        return any(d is not None and d.eof for d in (self.up, self.down))

    def idle_expired(self, now: float) -> bool:
        """Whether the pair has been idle past its bound (checked by the relay's sweep)."""
        if self.up is None or self.down is None:  # still dialing: the dial timer bounds it
            return False
        half_closed = self.up.eof or self.down.eof
        return now - self.last_activity >= pair_timeout(self.relay.config, half_closed)


def make_splice_relay(
    table: ServiceTable, is_local_source: Callable[[str], bool], stats: DataplaneStats,
    config: RelayConfig | None = None, splice_after: int = DEFAULT_SPLICE_AFTER,
    sources: Callable[[], SourcePolicy] = SourcePolicy,
) -> TcpRelay:
    """The `relay: splice` byte path: the compiled engine (engine.py) when it is built and
    PYPROXY_PURE_PYTHON is not 1, else this module's pure-Python FastRelay (same behaviour)."""
    from pyproxy.dataplane import engine  # here: engine.py imports this module's neighbours

    config = config or RelayConfig()
    if engine.AVAILABLE:
        return engine.NativeRelay(table, is_local_source, stats, config, splice_after=splice_after, sources=sources)
    return FastRelay(table, is_local_source, stats, config, splice_after=splice_after, sources=sources)
