"""The UDP flow table's rules, on plain values and a hand-driven clock."""

from __future__ import annotations

import pytest

from pyproxy.model.endpoints import Endpoint, EndpointSets
from pyproxy.model.flows import Flow, FlowKey, FlowTable, usable_endpoints
from pyproxy.model.objects import ServiceKey, ServicePortName
from pyproxy.model.table import PortState

DNS = ServicePortName(ServiceKey("kube-system", "kube-dns"), "dns", "UDP")
OTHER = ServicePortName(ServiceKey("default", "other"), "", "UDP")
SVC = ("10.96.0.10", 53)
POD_A = ("10.244.1.2", 53)
POD_B = ("10.244.2.2", 53)


def key(client_port: int, service: tuple[str, int] = SVC, client_ip: str = "10.244.1.9") -> FlowKey:
    return ((client_ip, client_port), service)


def flow(client_port: int, endpoint: tuple[str, int] = POD_A, port: ServicePortName = DNS,
         service: tuple[str, int] = SVC) -> Flow[str]:
    return Flow(key(client_port, service), port, endpoint, handle=f"sock{client_port}")


def endpoint(address: tuple[str, int], local: bool = True) -> Endpoint:
    return Endpoint(address[0], address[1], ready=True, serving=True, terminating=False, is_local=local)


def test_a_new_flow_is_found_by_its_key() -> None:
    table: FlowTable[str] = FlowTable(capacity=10, idle_timeout=30)
    assert table.add(flow(1000), now=0) == []
    found = table.get(key(1000))
    assert found is not None and found.endpoint == POD_A and found.handle == "sock1000"
    assert table.get(key(1001)) is None
    assert len(table) == 1


def test_adding_the_same_flow_twice_is_a_bug() -> None:
    table: FlowTable[str] = FlowTable(capacity=10, idle_timeout=30)
    table.add(flow(1000), now=0)
    with pytest.raises(KeyError):
        table.add(flow(1000), now=1)


def test_idle_flows_expire_and_traffic_slides_the_expiry() -> None:
    table: FlowTable[str] = FlowTable(capacity=10, idle_timeout=30)
    quiet, busy = flow(1000), flow(1001)
    table.add(quiet, now=0)
    table.add(busy, now=0)
    table.touch(busy, now=20)  # a datagram at t=20: busy lives until t=50
    assert table.expire(now=30) == []  # exactly the timeout is not past it
    assert table.next_expiry() == 30
    assert table.expire(now=31) == [quiet]
    assert table.next_expiry() == 50
    assert table.expire(now=49) == []
    assert table.expire(now=50.5) == [busy]
    assert table.next_expiry() is None and len(table) == 0


def test_expiry_is_bounded_per_call() -> None:
    table: FlowTable[str] = FlowTable(capacity=100, idle_timeout=1)
    for port in range(10):
        table.add(flow(port), now=0)
    assert len(table.expire(now=5, limit=3)) == 3
    assert len(table) == 7
    assert len(table.expire(now=5)) == 7


def test_a_full_table_evicts_the_least_recently_active_flow() -> None:
    table: FlowTable[str] = FlowTable(capacity=3, idle_timeout=30)
    flows = [flow(p) for p in (1, 2, 3)]
    for i, f in enumerate(flows):
        table.add(f, now=i)
    table.touch(flows[0], now=5)  # flow 1 is now the most recently active
    assert table.add(flow(4), now=6) == [flows[1]]
    assert table.add(flow(5), now=7) == [flows[2]]
    assert {f.client[1] for f in table} == {1, 4, 5}
    assert len(table) == 3


def test_a_flood_of_client_ports_never_grows_the_table_past_capacity() -> None:
    table: FlowTable[str] = FlowTable(capacity=50, idle_timeout=30)
    evicted = 0
    for port in range(10000):
        evicted += len(table.add(flow(port), now=port * 0.001))
        assert len(table) <= 50
    assert evicted == 10000 - 50
    assert table.ports() == {DNS}


def test_flows_whose_endpoint_left_are_dropped_and_others_kept() -> None:
    table: FlowTable[str] = FlowTable(capacity=10, idle_timeout=30)
    to_a, to_b, other = flow(1, POD_A), flow(2, POD_B), flow(3, POD_A, port=OTHER, service=("10.96.0.11", 53))
    for f in (to_a, to_b, other):
        table.add(f, now=0)
    assert table.retain(DNS, usable={POD_B}) == [to_a]
    assert table.get(to_a.key) is None and table.get(to_b.key) is to_b
    assert table.get(other.key) is other, "another port's flows are not touched"
    assert table.retain(DNS, usable=set()) == [to_b]
    assert table.ports() == {OTHER}


def test_a_service_address_is_in_use_while_any_of_its_flows_lives() -> None:
    table: FlowTable[str] = FlowTable(capacity=10, idle_timeout=30)
    first, second = flow(1), flow(2)
    table.add(first, now=0)
    table.add(second, now=1)
    assert table.address_in_use(SVC)
    table.remove(first.key)
    assert table.address_in_use(SVC)
    assert table.remove(first.key) is None
    table.expire(now=100)
    assert not table.address_in_use(SVC)


def test_clear_returns_every_flow() -> None:
    table: FlowTable[str] = FlowTable(capacity=10, idle_timeout=30)
    for port in range(4):
        table.add(flow(port), now=0)
    assert len(table.clear()) == 4
    assert len(table) == 0 and table.ports() == set() and not table.address_in_use(SVC)


@pytest.mark.parametrize("capacity, timeout", [(0, 30), (10, 0)])
def test_nonsense_bounds_are_refused(capacity: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        FlowTable[str](capacity=capacity, idle_timeout=timeout)


def test_usable_endpoints_are_the_cluster_and_local_sets() -> None:
    a, b = endpoint(POD_A), endpoint(POD_B, local=False)
    state = PortState(DNS, EndpointSets(all=(a, b), cluster=(b,), local=(a,)), None, False, False)
    assert usable_endpoints(state) == {POD_A, POD_B}
    assert usable_endpoints(None) == frozenset(), "a port that is gone has no usable endpoint"


def test_moved_flows_keep_their_idle_time_and_the_expiry_order() -> None:
    table: FlowTable[str] = FlowTable(capacity=3, idle_timeout=30)
    table.add(flow(1000), now=100)
    old, older = flow(2000), flow(3000)
    old.last_active, older.last_active = 90, 80
    assert table.adopt([old, older]) == []
    assert [f.client[1] for f in table] == [3000, 2000, 1000], "least recently active first"
    assert table.next_expiry() == 110
    assert [f.client[1] for f in table.expire(now=121)] == [3000, 2000]
    assert table.address_in_use(SVC)


def test_moved_flows_beyond_capacity_evict_the_least_recently_active() -> None:
    table: FlowTable[str] = FlowTable(capacity=2, idle_timeout=30)
    table.add(flow(1000), now=100)
    moved = [flow(2000), flow(3000)]
    moved[0].last_active, moved[1].last_active = 50, 101
    assert [f.client[1] for f in table.adopt(moved)] == [2000]
    assert {f.client[1] for f in table} == {1000, 3000}
    with pytest.raises(KeyError):
        table.adopt([flow(1000)])
