"""The UDP relay's behaviour as traces, on fake sockets and a hand-driven clock (no network).

Each flow's upstream socket is one end of an AF_UNIX datagram socketpair (a real fd the
event loop can watch); the test holds the other end and plays the endpoint. Reply sockets
record what they would have sent to the client. Runs under asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pyproxy.dataplane.stats import DataplaneStats
from pyproxy.dataplane.udp import IP_ORIGDSTADDR, IPV6_ORIGDSTADDR, UdpConfig, UdpRelay, original_destination
from pyproxy.model.objects import ServiceKey, parse_endpoint_slice, parse_service
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import ServiceTable

SVC = ("10.96.0.10", 53)
PODS = ("10.244.1.2", "10.244.2.2", "10.244.2.3")
CLIENT = "10.244.1.9"


class FakeReply:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False

    def sendto(self, data: bytes, client: tuple[str, int]) -> int:
        self.sent.append((data, client))
        return len(data)

    def close(self) -> None:
        self.closed = True


@dataclass
class Sockets:
    """The fake OS: upstream socketpairs (relay end, endpoint end) and reply sockets, as opened."""

    upstreams: list[tuple[tuple[str, int] | None, tuple[str, int], socket.socket, socket.socket]] = field(
        default_factory=list)
    replies: list[FakeReply] = field(default_factory=list)

    def open_upstream(self, source: tuple[str, int] | None, endpoint: tuple[str, int], buffer: int) -> socket.socket:
        relay_end, endpoint_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        relay_end.setblocking(False)
        endpoint_end.settimeout(1)
        self.upstreams.append((source, endpoint, relay_end, endpoint_end))
        return relay_end

    def open_reply(self, address: tuple[str, int]) -> Any:
        reply = FakeReply(address)
        self.replies.append(reply)
        return reply

    def endpoint_end(self, index: int) -> socket.socket:
        return self.upstreams[index][3]

    def close(self) -> None:
        for _, _, relay_end, endpoint_end in self.upstreams:
            relay_end.close()
            endpoint_end.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table_with(pods: tuple[str, ...], affinity: bool = False) -> tuple[ServiceTable, ClusterStore]:
    store = ClusterStore()
    spec: dict[str, Any] = {"clusterIP": SVC[0], "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    set_pods(store, pods, spec)
    table = ServiceTable("node1")
    table.update({ServiceKey("kube-system", "kube-dns")}, store, ())
    return table, store


def set_pods(store: ClusterStore, pods: tuple[str, ...], spec: dict[str, Any] | None = None) -> None:
    key = ServiceKey("kube-system", "kube-dns")
    if spec is not None:
        service = parse_service({"kind": "Service", "metadata": {"name": key.name, "namespace": key.namespace},
                                 "spec": spec})
        store.replace_services([service] if service else [])
    endpoint_slice = parse_endpoint_slice({
        "kind": "EndpointSlice",
        "metadata": {"name": "kube-dns-1", "namespace": key.namespace,
                     "labels": {"kubernetes.io/service-name": key.name}},
        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": [{"addresses": [ip], "nodeName": "node1" if ip.startswith("10.244.1.") else "node2"}
                      for ip in pods],
    })
    store.replace_all(store.services.values(), [endpoint_slice] if endpoint_slice else [])


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    fake = Sockets()
    yield fake
    fake.close()


def relay_for(table: ServiceTable, sockets: Sockets, clock: Clock, max_flows: int = 100) -> UdpRelay:
    return UdpRelay(table, lambda ip: ip.startswith("10.244.1."), DataplaneStats(),
                    UdpConfig(idle_timeout=30, max_flows=max_flows), clock=clock,
                    open_upstream=sockets.open_upstream, open_reply=sockets.open_reply)


async def until(condition: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_the_original_destination_is_read_from_ancillary_data() -> None:
    sockaddr = (2).to_bytes(2, "little") + (53).to_bytes(2, "big") + socket.inet_aton("10.96.0.10") + bytes(8)
    assert original_destination([(socket.SOL_IP, IP_ORIGDSTADDR, sockaddr)]) == ("10.96.0.10", 53)
    assert original_destination([(socket.SOL_IP, 8, b"\x00" * 12)]) is None
    assert original_destination([]) is None


def test_the_ipv6_original_destination_is_read_from_a_sockaddr_in6() -> None:
    sockaddr6 = ((10).to_bytes(2, "little") + (5353).to_bytes(2, "big") + bytes(4)
                 + socket.inet_pton(socket.AF_INET6, "fd00:96::53") + bytes(4))
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, sockaddr6)]) == ("fd00:96::53", 5353)
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, sockaddr6[:20])]) is None  # cut short


async def test_a_query_and_its_answer_pass_whole_and_the_answer_comes_from_the_service_address(
    sockets: Sockets,
) -> None:
    table, _ = table_with(PODS)
    relay = relay_for(table, sockets, Clock())
    query = b"q" * 65000
    relay.forward(query, (CLIENT, 40000), SVC)
    assert len(sockets.upstreams) == 1
    source, endpoint, _, pod = sockets.upstreams[0]
    assert source is None, "ClusterIP with Cluster policy: the proxy's own address"
    assert endpoint[0] in PODS and endpoint[1] == 53
    assert pod.recv(70000) == query
    pod.send(b"a" * 64000)
    reply = sockets.replies[0]
    await until(lambda: reply.sent)
    assert reply.address == SVC and reply.sent == [(b"a" * 64000, (CLIENT, 40000))]
    udp = relay.stats.udp
    assert (udp.flows_active, udp.datagrams_in, udp.datagrams_out, udp.bytes_in, udp.bytes_out) == (1, 1, 1, 65000, 64000)
    relay.close()
    assert reply.closed and sockets.upstreams[0][2].fileno() == -1


async def test_datagrams_of_one_flow_share_its_socket_and_new_client_ports_are_new_flows(sockets: Sockets) -> None:
    table, _ = table_with(PODS)
    relay = relay_for(table, sockets, Clock())
    for _ in range(3):
        relay.forward(b"x", (CLIENT, 40000), SVC)
    assert len(sockets.upstreams) == 1 and relay.stats.udp.flows_total == 1
    for port in range(40001, 40031):
        relay.forward(b"x", (CLIENT, port), SVC)
    assert relay.stats.udp.flows_total == 31
    assert {endpoint[0] for _, endpoint, _, _ in sockets.upstreams} == set(PODS), "new flows are spread"
    assert len(sockets.replies) == 1, "one reply socket per service address"
    relay.close()


async def test_affinity_pins_new_flows_of_a_client_ip(sockets: Sockets) -> None:
    table, _ = table_with(PODS, affinity=True)
    relay = relay_for(table, sockets, Clock())
    for port in range(40000, 40020):
        relay.forward(b"x", (CLIENT, port), SVC)
    assert len({endpoint for _, endpoint, _, _ in sockets.upstreams}) == 1
    relay.close()


async def test_the_flow_table_is_bounded_and_evicted_sockets_are_closed(sockets: Sockets) -> None:
    table, _ = table_with(PODS)
    clock = Clock()
    relay = relay_for(table, sockets, clock, max_flows=5)
    for port in range(40000, 40020):
        clock.now += 0.001
        relay.forward(b"x", (CLIENT, port), SVC)
    assert len(relay.flows) == 5 and relay.stats.udp.flows_active == 5
    assert relay.stats.udp.flows_closed["evicted"] == 15
    open_ends = [relay_end for _, _, relay_end, _ in sockets.upstreams if relay_end.fileno() != -1]
    assert len(open_ends) == 5
    assert {f.client[1] for f in relay.flows} == set(range(40015, 40020)), "the newest flows stay"
    relay.close()


async def test_idle_flows_expire_with_their_sockets_and_traffic_keeps_them(sockets: Sockets) -> None:
    table, _ = table_with(PODS)
    clock = Clock()
    relay = relay_for(table, sockets, clock)
    relay.forward(b"x", (CLIENT, 40000), SVC)
    relay.forward(b"x", (CLIENT, 40001), SVC)
    clock.now += 20
    relay.forward(b"x", (CLIENT, 40001), SVC)  # slides 40001's expiry
    clock.now += 15
    assert relay.expire_idle() == 1
    assert [f.client[1] for f in relay.flows] == [40001]
    assert sockets.upstreams[0][2].fileno() == -1 and not sockets.replies[0].closed
    clock.now += 31
    assert relay.expire_idle() == 1
    assert sockets.replies[0].closed, "the reply socket goes with its address's last flow"
    assert relay.stats.udp.flows_active == 0 and relay.stats.udp.flows_closed["idle"] == 2
    relay.close()


async def test_flows_to_an_endpoint_that_left_are_dropped_after_the_sync(sockets: Sockets) -> None:
    table, store = table_with(PODS)
    relay = relay_for(table, sockets, Clock())
    for port in range(40000, 40030):
        relay.forward(b"x", (CLIENT, port), SVC)
    gone = PODS[0]
    set_pods(store, PODS[1:])
    table.update(store.take_changes(), store, ())
    relay.on_sync()
    assert relay.flows and all(f.endpoint[0] != gone for f in relay.flows)
    assert all(relay_end.fileno() == -1 for _, endpoint, relay_end, _ in sockets.upstreams if endpoint[0] == gone)
    set_pods(store, ())
    table.update(store.take_changes(), store, ())
    relay.on_sync()
    assert len(relay.flows) == 0 and relay.stats.udp.flows_active == 0
    assert relay.stats.udp.flows_closed["endpoint_gone"] == 30
    relay.close()


async def test_what_cannot_be_forwarded_is_dropped_and_counted(sockets: Sockets) -> None:
    table, _ = table_with(())
    relay = relay_for(table, sockets, Clock())
    relay.forward(b"x", (CLIENT, 40000), ("10.96.9.9", 53))
    relay.forward(b"x", (CLIENT, 40000), SVC)  # no endpoints (nftables refuses these first)
    assert relay.stats.udp.drops == {"unknown_destination": 1, "no_endpoint": 1}
    assert not sockets.upstreams and not sockets.replies
    relay.close()


async def test_local_policy_keeps_the_clients_address_for_remote_clients(sockets: Sockets) -> None:
    store = ClusterStore()
    spec = {"type": "NodePort", "clusterIP": SVC[0], "externalTrafficPolicy": "Local",
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}
    set_pods(store, PODS, spec)
    table = ServiceTable("node1")
    table.update({ServiceKey("kube-system", "kube-dns")}, store, ("192.168.56.101",))
    relay = relay_for(table, sockets, Clock())
    relay.forward(b"x", ("192.168.56.100", 40000), ("192.168.56.101", 30053))
    relay.forward(b"x", ("10.244.1.9", 40000), ("192.168.56.101", 30053))  # a pod here: hairpin
    (remote_source, remote_endpoint, _, _), (pod_source, _, _, _) = sockets.upstreams
    assert remote_source == ("192.168.56.100", 40000), "the client's address and port, as DNAT leaves them"
    assert remote_endpoint == ("10.244.1.2", 53), "local endpoint only"
    assert pod_source is None
    relay.close()


async def test_an_endpoint_refusing_ends_its_flow(sockets: Sockets) -> None:
    table, _ = table_with(PODS)
    relay = relay_for(table, sockets, Clock())
    relay.forward(b"x", (CLIENT, 40000), SVC)
    sockets.endpoint_end(0).close()  # the peer is gone: the next send fails
    relay.forward(b"x", (CLIENT, 40000), SVC)
    assert len(relay.flows) == 0 and relay.stats.udp.drops["endpoint_refused"] == 1
    relay.close()


async def test_a_moved_flow_goes_on_in_the_successor_with_its_idle_time(sockets: Sockets) -> None:
    table, _ = table_with(PODS)
    clock = Clock()
    old = relay_for(table, sockets, clock)
    old.forward(b"q1", (CLIENT, 40000), SVC)
    pod = sockets.endpoint_end(0)
    assert pod.recv(100) == b"q1"
    clock.now += 10
    moved = old.detach_flows()
    assert len(moved) == 1 and len(old.flows) == 0 and old.stats.udp.flows_closed["moved"] == 1
    assert sockets.replies[0].closed, "the old process's reply socket goes with its last flow"
    state, fd = moved[0]
    assert (state.client, state.service, state.idle, state.bytes_in) == ((CLIENT, 40000), SVC, 10.0, 2)
    pod.send(b"a1")  # a reply while the flow is between processes waits in the socket
    successor = relay_for(table, sockets, clock)
    assert successor.adopt_flows([(state, socket.socket(fileno=fd))]) == 1
    assert successor.flows.next_expiry() == clock.now - 10 + 30, "the idle time came along"
    reply = sockets.replies[1]
    await until(lambda: reply.sent)
    assert reply.address == SVC and reply.sent == [(b"a1", (CLIENT, 40000))]
    successor.forward(b"q2", (CLIENT, 40000), SVC)
    assert pod.recv(100) == b"q2", "the client's next datagram takes the same socket to the same pod"
    assert len(sockets.upstreams) == 1
    clock.now += 29
    successor.expire_idle()
    assert len(successor.flows) == 1, "the moved flow's expiry slides with traffic as before"
    successor.close()


async def test_a_moved_flow_takes_its_key_back_and_the_successors_own_still_passes_answers(
    sockets: Sockets,
) -> None:
    """The client's datagram reached the successor before its flow did: the successor
    opened a flow of its own. The moved flow takes over; answers to both reach the client."""
    table, _ = table_with(PODS)
    clock = Clock()
    old = relay_for(table, sockets, clock)
    old.forward(b"q1", (CLIENT, 40000), SVC)
    successor = relay_for(table, sockets, clock)
    successor.forward(b"q2", (CLIENT, 40000), SVC)
    moved_pod, own_pod = sockets.endpoint_end(0), sockets.endpoint_end(1)
    assert moved_pod.recv(100) == b"q1" and own_pod.recv(100) == b"q2"
    moved = [(state, socket.socket(fileno=fd)) for state, fd in old.detach_flows()]
    assert successor.adopt_flows(moved) == 1
    flow = successor.flows.get(((CLIENT, 40000), SVC))
    assert flow is not None and flow.handle.upstream is moved[0][1]
    own_pod.send(b"a2")
    moved_pod.send(b"a1")
    reply = sockets.replies[-1]
    await until(lambda: len(reply.sent) == 2)
    assert sorted(reply.sent) == [(b"a1", (CLIENT, 40000)), (b"a2", (CLIENT, 40000))]
    successor.forward(b"q3", (CLIENT, 40000), SVC)
    assert moved_pod.recv(100) == b"q3"
    assert successor.stats.udp.flows_active == 2, "the retired flow counts until it is closed"
    successor.close()
    assert successor.stats.udp.flows_active == 0 and sockets.upstreams[1][2].fileno() == -1
