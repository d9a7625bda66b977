"""The UDP relay: one transparent listener, one upstream socket per flow (SPEC.md §7).

Rules kept here:
- nftables TPROXYs every captured UDP service address to one listener per family
  (IP_TRANSPARENT bound to 127.0.0.1:udpProxyPort; IPV6_TRANSPARENT bound to
  [::1]:udpProxyPort). Each datagram's original destination, the service address, comes
  with it as IP_ORIGDSTADDR (IPV6_ORIGDSTADDR) ancillary data (`recvmsg`); asyncio and uvloop
  datagram endpoints don't surface ancillary data, so sockets are read with `add_reader`,
  non-blocking, at most `batch` datagrams per wakeup.
- A flow is (client ip:port, service address). Its first datagram looks up the route,
  plans it (`plan_connection`: Cluster or Local set, keep the client's address or not) and
  picks the endpoint (`Balancer.pick`, so ClientIP affinity applies to new flows). The flow
  gets its own socket, connected to the endpoint; when the endpoint sees the client's address
  (Local policy, a pod's own address) it is IP_TRANSPARENT and bound to the client's address
  *and port*, as DNAT leaves them, and its reply comes back through the `socket transparent`
  rule. The port matters: the client's kernel keeps that port to itself, so a datagram the
  client sends straight to the endpoint (past the Service) never leaves from it, and its
  answer cannot be taken for this flow's. Bound to a node-chosen port it could (the pod's
  own kernel knows nothing of it), once in ~28,000 per flow open. When the port is taken
  here already (the same client socket reaching two Services), the kernel picks one.
- Replies go back to the client *from the service address*, through one IP_TRANSPARENT
  socket bound to that address (shared by its flows, closed with the last of them): a
  connected resolver accepts nothing else.
- Datagrams pass whole up to 64 KiB: every receive buffer holds 65536 bytes.
- Flows live in the pure `FlowTable`: idle ones expire after `idle_timeout`, the table is
  bounded by `max_flows` (the least recently active flow is evicted), and after each sync
  flows whose endpoint left the usable set are dropped (`on_sync`). Every flow's socket is
  closed when its flow goes; nothing else holds one.
- Nothing is answered for a datagram that cannot be forwarded: it is dropped and counted
  by reason (a service port without endpoints is refused by nftables before it gets here).
- Moving to a successor (`detach_flows`, `adopt_flows`): the old process stops reading
  the listener and every flow's socket, and hands out each flow (a dup of its upstream
  socket, its key, port, endpoint, age and idle time); replies that arrive meanwhile wait
  in the socket's receive queue for the successor. The successor opens its own reply
  socket for the service address, so replies still come from it, and the flow's idle
  expiry goes on from where it was. The successor reads no client datagram until the
  flows are there, at most `HOLD_BOUND` (then it serves clients anyway: a slow hand-over
  must not leave DNS waiting). So it may have opened a flow of its own for a moved one's
  key (a datagram came first): the moved flow takes the key back (its endpoint is the one the client talks
  to), and the successor's own socket is retired, still read for `RETIRE_GRACE` seconds so
  the answers to what it sent reach the client, then closed.
- `connections()` hands out read-only copies (`ConnectionInfo`) of the flows, with each
  flow's own byte counts, for the inspection API.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyproxy.dataplane.sockets import family_socket, set_transparent, transparent_listener
from pyproxy.dataplane.stats import ConnectionInfo, DataplaneStats, PortStats
from pyproxy.dataplane.connstate import UdpState
from pyproxy.model.family import host_port, join_host_port
from pyproxy.model.flows import Address, Flow, FlowKey, FlowTable, usable_endpoints
from pyproxy.model.objects import ServicePortName
from pyproxy.model.source import SourcePolicy
from pyproxy.model.table import PortState, ServiceTable, plan_connection, source_matters

log = logging.getLogger("pyproxy.udp")

IP_ORIGDSTADDR = 20  # <linux/in.h>; IP_RECVORIGDSTADDR is the same number
IPV6_ORIGDSTADDR = 74  # <linux/in6.h>; IPV6_RECVORIGDSTADDR is the same number
SOCKADDR_IN6_SIZE = 28
RECEIVE_SIZE = 65536  # the largest UDP payload is 65507 (IPv4), 65527 (IPv6): nothing is ever cut
ANCILLARY_SIZE = socket.CMSG_SPACE(SOCKADDR_IN6_SIZE)
WARN_INTERVAL = 10.0
HOLD_BOUND = 0.25  # seconds a successor waits for the moved flows before it reads clients anyway
RETIRE_GRACE = 5.0  # seconds a flow replaced by a moved one still passes its endpoint's answers


@dataclass(frozen=True)
class UdpConfig:
    idle_timeout: float = 30.0
    max_flows: int = 16384
    batch: int = 64  # datagrams read from one socket per wakeup
    listener_buffer: int = 4 << 20
    upstream_buffer: int = 256 << 10


@dataclass
class FlowIO:
    """What the data plane attaches to a flow: its upstream socket and its port's counters."""

    upstream: socket.socket
    stats: PortStats
    started: float = 0.0
    bytes_in: int = 0  # this flow's own share of stats.bytes_in / bytes_out
    bytes_out: int = 0


def original_destination(ancillary: list[tuple[int, int, bytes]]) -> Address | None:
    """The service address a TPROXY'd datagram was sent to, from its IP_ORIGDSTADDR (a
    sockaddr_in) or IPV6_ORIGDSTADDR (a sockaddr_in6: family, port, flow info, address)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntoa(data[4:8]), int.from_bytes(data[2:4], "big")
        if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), int.from_bytes(data[2:4], "big")
    return None


def upstream_socket(source: Address | None, endpoint: Address, buffer: int) -> socket.socket:
    """A UDP socket connected to the endpoint; transparent and bound to the client's `source`
    if given (its port if free here, else one the kernel picks)."""
    sock = family_socket(":" in endpoint[0], socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        if source is not None:
            set_transparent(sock)
            try:
                sock.bind(source)
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
                sock.bind((source[0], 0))
        sock.connect(endpoint)
    except OSError:
        sock.close()
        raise
    return sock


def reply_socket(service_address: Address) -> socket.socket:
    """A socket that sends from the service address (never read: its receive buffer stays minimal)."""
    sock = family_socket(":" in service_address[0], socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        sock.bind(service_address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class UdpRelay:
    """The UDP data plane of one proxy process; sockets are opened through the two factories."""

    table: ServiceTable
    is_local_source: Callable[[str], bool]
    stats: DataplaneStats
    config: UdpConfig = field(default_factory=UdpConfig)
    clock: Callable[[], float] = time.monotonic
    open_upstream: Callable[[Address | None, Address, int], socket.socket] = upstream_socket
    open_reply: Callable[[Address], socket.socket] = reply_socket
    flows: FlowTable[FlowIO] = field(init=False)
    _listeners: list[socket.socket] = field(default_factory=list)  # one per family
    _loop: asyncio.AbstractEventLoop | None = None
    _timer: asyncio.TimerHandle | None = None
    _replies: dict[Address, socket.socket] = field(default_factory=dict)
    _planned_with: dict[ServicePortName, PortState] = field(default_factory=dict)
    _warned: dict[str, float] = field(default_factory=dict)
    _retired: set[Flow[FlowIO]] = field(default_factory=set)  # replaced by moved flows: answers only
    _held: asyncio.TimerHandle | None = None  # clients unread until the moved flows are here (or it fires)
    sources: Callable[[], SourcePolicy] = SourcePolicy  # whose address endpoints see (model/source.py)

    def __post_init__(self) -> None:
        self.flows = FlowTable(self.config.max_flows, self.config.idle_timeout)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on `host`:`port` too (called once per family: 127.0.0.1, then ::1), or on
        `sock` (a listener handed over by a predecessor, pyproxy/lifecycle)."""
        self._loop = asyncio.get_running_loop()
        ensure_fd_budget(self.config.max_flows + 2048)  # a socket per flow, a few reply sockets, the rest
        sock = sock if sock is not None else transparent_listener(host, port, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_ORIGDSTADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.listener_buffer)
            self._loop.add_reader(sock.fileno(), self._from_clients, sock)
        except OSError:
            sock.close()
            raise
        self._listeners.append(sock)

    @property
    def listeners(self) -> list[socket.socket]:
        return list(self._listeners)

    def hold_listener(self, bound: float = HOLD_BOUND) -> None:
        """A successor taking over: read no client datagram until the predecessor's flows
        are here (`read_listener`), at most `bound` seconds, or a flow's next datagram
        would open a second flow, maybe to another pod. They wait in the listener's queue."""
        if self._loop is None or self._held is not None:
            return
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._held = self._loop.call_later(bound, self.read_listener)

    def read_listener(self) -> None:
        if self._held is None or self._loop is None:
            return
        self._held.cancel()
        self._held = None
        for listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._from_clients, listener)

    def release_listener(self) -> None:
        """A successor reads the listeners now (pyproxy/lifecycle): stop reading them and
        close this process's copies; the flows open here go on until they idle out (or move)."""
        for listener in self._listeners:
            if self._loop is not None:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()

    def close(self) -> None:
        """Stop listening and close every flow and reply socket."""
        for listener in self._listeners:
            if self._loop is not None:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for flow in [*self.flows.clear(), *self._retired]:
            self._release(flow, "shutdown")
        self._retired.clear()
        for sock in self._replies.values():
            sock.close()
        self._replies.clear()

    def on_sync(self) -> None:
        """After a sync: drop flows whose endpoint left its port's usable set (or whose port is gone)."""
        for name in self.flows.ports():
            current = self.table.ports.get(name)
            if current is not None and current is self._planned_with.get(name):
                continue  # this port was not rebuilt
            for flow in self.flows.retain(name, usable_endpoints(current)):
                log.info("dropping UDP flow %s -> %s: endpoint %s is gone", join_host_port(*flow.client), name,
                         join_host_port(*flow.endpoint))
                self._release(flow, "endpoint_gone")
            if current is None:
                self._planned_with.pop(name, None)
            else:
                self._planned_with[name] = current
        for name in set(self._planned_with) - self.flows.ports():
            del self._planned_with[name]

    def connections(self) -> Iterator[ConnectionInfo]:
        """A read-only picture of every flow (for the inspection API)."""
        for flow in list(self.flows):
            io = flow.handle
            yield ConnectionInfo("UDP", flow.port, flow.client, flow.service_address, flow.endpoint,
                                 io.bytes_in, io.bytes_out, io.started, flow.last_active)

    # moving to a successor

    def detach_flows(self) -> list[tuple[UdpState, int]]:
        """Stop serving here and take every flow out: its state and a dup of its socket
        (the caller sends and closes it)."""
        if self._loop is not None:  # no new flows here from now on
            for listener in self._listeners:
                self._loop.remove_reader(listener.fileno())
        now = self.clock()
        moved: list[tuple[UdpState, int]] = []
        for flow in list(self.flows):
            io = flow.handle
            fd = os.dup(io.upstream.fileno())
            moved.append((UdpState(flow.port, flow.client, flow.service_address, flow.endpoint, now - io.started,
                                   now - flow.last_active, io.bytes_in, io.bytes_out), fd))
            self._close(flow, "moved")
        return moved

    def adopt_flows(self, moved: list[tuple[UdpState, socket.socket]]) -> int:
        """Go on serving flows another process detached; returns how many were taken up."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        now = self.clock()
        flows: dict[FlowKey, Flow[FlowIO]] = {}
        for state, sock in moved:
            key: FlowKey = (state.client, state.service)
            if key in flows:  # the same flow twice in one hand-over: the first one counts
                self.stats.udp.flows_closed["moved_duplicate"] += 1
                sock.close()
                continue
            mine = self.flows.get(key)
            if mine is not None:
                self._retire(mine)
            try:
                sock.setblocking(False)
                self._reply_socket(state.service)
            except OSError as err:
                self._warn("socket", "cannot take up a moved UDP flow from %s:%s: %s", *state.client, err)
                self.stats.udp.flows_closed["moved_failed"] += 1
                sock.close()
                if not any(f.service_address == state.service for f in flows.values()):
                    self._close_reply_if_unused(state.service)
                continue
            port_stats = self.stats.port(state.port)
            flow = Flow(key, state.port, state.endpoint, FlowIO(sock, port_stats, now - state.age, state.bytes_in,
                                                                state.bytes_out), last_active=now - state.idle)
            flows[key] = flow
            self._loop.add_reader(sock.fileno(), self._from_endpoint, flow)
            route = self.table.routes.get((state.service[0], "UDP", state.service[1]))
            if route is not None and route.port.name == state.port:
                self._planned_with.setdefault(state.port, route.port)
            self.stats.udp.flows_active += 1
            self.stats.udp.flows_total += 1
            port_stats.active += 1
            port_stats.total += 1
        for old in self.flows.adopt(list(flows.values())):
            self._release(old, "evicted")
        if self._timer is not None:  # a moved flow may expire before the timer set for the others
            self._timer.cancel()
            self._timer = None
        self._arm_timer()
        return len(flows)

    def _retire(self, flow: Flow[FlowIO]) -> None:
        """Out of the table, but still passing its endpoint's answers for a while."""
        self.flows.remove(flow.key)
        self._retired.add(flow)
        assert self._loop is not None
        self._loop.call_later(RETIRE_GRACE, self._end_retired, flow)

    def _end_retired(self, flow: Flow[FlowIO]) -> None:
        if flow in self._retired:
            self._retired.discard(flow)
            self._release(flow, "replaced_by_moved")

    # client -> endpoint

    def _from_clients(self, listener: socket.socket) -> None:
        if listener not in self._listeners:
            return
        for _ in range(self.config.batch):
            try:
                data, ancillary, flags, peer = listener.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._drop("receive_error")
                self._warn("receive", "UDP listener receive failed: %s", err)
                return
            client = host_port(peer)
            destination = original_destination(ancillary)
            if destination is None or flags & socket.MSG_TRUNC:
                self._drop("no_original_destination" if destination is None else "truncated")
                continue
            try:
                self.forward(data, client, destination)
            except Exception as err:  # a bug costs this datagram and a rate-limited line, not the listener
                self._drop("internal_error")
                self.stats.connection_errors[("internal", type(err).__name__)] += 1
                self._warn("internal", "UDP relay: unexpected error forwarding a datagram from %s: %r",
                           join_host_port(*client), err)

    def forward(self, data: bytes, client: Address, destination: Address) -> None:
        """One datagram from `client` to the service address `destination`: to its flow's endpoint."""
        now = self.clock()
        key: FlowKey = (client, destination)
        flow = self.flows.get(key) or self._open(key, now)
        if flow is None:
            return
        try:
            flow.handle.upstream.send(data)
        except BlockingIOError:
            self._drop("upstream_busy")
            return
        except ConnectionRefusedError:  # the endpoint's port is closed (ICMP from the pod)
            self._drop("endpoint_refused")
            self._close(flow, "endpoint_refused")
            return
        except OSError as err:
            self._drop("upstream_error")
            self._warn("send", "UDP send to %s failed: %s", join_host_port(*flow.endpoint), err)
            self._close(flow, "upstream_error")
            return
        self.flows.touch(flow, now)
        udp, port = self.stats.udp, flow.handle.stats
        udp.datagrams_in += 1
        udp.bytes_in += len(data)
        port.datagrams_in += 1
        port.bytes_in += len(data)
        flow.handle.bytes_in += len(data)

    def _open(self, key: FlowKey, now: float) -> Flow[FlowIO] | None:
        """A new flow: route, plan and pick as the TCP relay does; None (counted) if it cannot be served."""
        client, destination = key
        route = self.table.routes.get((destination[0], "UDP", destination[1]))
        if route is None:
            self.stats.unknown_destination += 1
            self._drop("unknown_destination")
            return None
        name = route.port.name
        port_stats = self.stats.port(name)
        plan = plan_connection(route, source_matters(route) and self.is_local_source(client[0]))
        balancer = self.table.balancers.get(name)
        endpoint = balancer.pick(client[0], plan.candidates, now) if balancer is not None else None
        if endpoint is None:
            port_stats.refused += 1
            self._drop("no_endpoint")
            return None
        sources = self.sources()
        keep = sources.keeps_client(sources.target_source(plan.transparent, endpoint.ip), client[0], endpoint.ip)
        try:
            self._reply_socket(destination)
            upstream = self.open_upstream(client if keep else None, endpoint.address,
                                          self.config.upstream_buffer)
        except OSError as err:
            self._drop("socket_error")
            self._warn("socket", "cannot open a UDP flow from %s to %s: %s", join_host_port(*client), endpoint, err)
            self._close_reply_if_unused(destination)
            return None
        flow = Flow(key, name, endpoint.address, FlowIO(upstream, port_stats, started=now))
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_reader(upstream.fileno(), self._from_endpoint, flow)
        except BaseException:  # the flow never existed: its socket must not outlive it
            upstream.close()
            self._close_reply_if_unused(destination)
            raise
        self._planned_with.setdefault(name, route.port)
        evicted = self.flows.add(flow, now)
        for old in evicted:
            self._release(old, "evicted")
        if evicted:
            self._warn("full", "UDP flow table full (%d flows): evicting the least recently active (%d so far)",
                       self.config.max_flows, self.stats.udp.flows_closed["evicted"])
        udp = self.stats.udp
        udp.flows_active += 1
        udp.flows_total += 1
        port_stats.active += 1
        port_stats.total += 1
        self._arm_timer()
        return flow

    # endpoint -> client

    def _from_endpoint(self, flow: Flow[FlowIO]) -> None:
        reply = self._replies.get(flow.service_address)
        if reply is None or (self.flows.get(flow.key) is not flow and flow not in self._retired):
            return  # closed in this same loop iteration
        sock, port = flow.handle.upstream, flow.handle.stats
        received = 0
        for _ in range(self.config.batch):
            try:
                data = sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._drop("endpoint_refused")
                self._close(flow, "endpoint_refused")
                return
            except OSError as err:
                self._warn("recv", "UDP receive from %s failed: %s", join_host_port(*flow.endpoint), err)
                self._close(flow, "upstream_error")
                return
            try:
                reply.sendto(data, flow.client)
            except OSError:
                self._drop("client_send_error")
                continue
            received += 1
            self.stats.udp.datagrams_out += 1
            self.stats.udp.bytes_out += len(data)
            port.datagrams_out += 1
            port.bytes_out += len(data)
            flow.handle.bytes_out += len(data)
        if received:
            self.flows.touch(flow, self.clock())

    def _reply_socket(self, address: Address) -> socket.socket:
        sock = self._replies.get(address)
        if sock is None:
            sock = self.open_reply(address)
            self._replies[address] = sock
        return sock

    # closing

    def _close(self, flow: Flow[FlowIO], reason: str) -> None:
        if self.flows.remove(flow.key) is flow:
            self._release(flow, reason)

    def _release(self, flow: Flow[FlowIO], reason: str) -> None:
        """Close a flow that has left the table: its socket, its counters, maybe its reply socket."""
        sock = flow.handle.upstream
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()
        self.stats.udp.flows_active -= 1
        self.stats.udp.flows_closed[reason] += 1
        flow.handle.stats.active -= 1
        self._close_reply_if_unused(flow.service_address)

    def _close_reply_if_unused(self, address: Address) -> None:
        if not self.flows.address_in_use(address):
            sock = self._replies.pop(address, None)
            if sock is not None:
                sock.close()

    def _arm_timer(self) -> None:
        if self._timer is not None or self._loop is None:
            return
        expiry = self.flows.next_expiry()
        if expiry is not None:
            delay = max(0.0, expiry - self.clock()) + 0.01
            self._timer = self._loop.call_later(delay, self.expire_idle)

    def expire_idle(self) -> int:
        """Close flows idle past the timeout (a bounded batch; the timer comes back for more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        expired = self.flows.expire(self.clock())
        for flow in expired:
            self._release(flow, "idle")
        self._arm_timer()
        return len(expired)

    # accounting

    def _drop(self, reason: str) -> None:
        self.stats.udp.drops[reason] += 1

    def _warn(self, topic: str, message: str, *args: object) -> None:
        """Log a warning at most once per WARN_INTERVAL per topic: floods must not flood the log."""
        now = self.clock()
        if now - self._warned.get(topic, -WARN_INTERVAL) >= WARN_INTERVAL:
            self._warned[topic] = now
            log.warning(message, *args)


def ensure_fd_budget(needed: int) -> None:
    """Raise the soft open-files limit towards `needed` (never lower it; the hard limit caps it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < cap:
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
    if cap < needed:
        log.warning("open-files limit %d is below the %d that maxUDPFlows may need", cap, needed)
