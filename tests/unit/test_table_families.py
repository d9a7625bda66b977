"""Dual-stack in the service table (SPEC.md §11): each frontend is served from endpoints of
its own family, and gets the verdict of its own family."""

from __future__ import annotations

from typing import Any

import pytest

from pyproxy.model.family import Family
from pyproxy.model.objects import parse_endpoint_slice
from pyproxy.model.table import ServiceTable, Verdict, plan_connection
from tests.unit.test_table import Harness, port_name, service

CAP, REJ, DE = Verdict.CAPTURE, Verdict.REJECT, Verdict.DROP_EXTERNAL
V4_PODS = (("10.244.1.2", "node1"), ("10.244.2.2", "node2"))
V6_PODS = (("fd00:244:1::2", "node1"), ("fd00:244:2::2", "node2"))


def family_slice(name: str, family: str, *endpoints: tuple[str, str]) -> Any:
    parsed = parse_endpoint_slice({
        "kind": "EndpointSlice", "addressType": family,
        "metadata": {"name": f"{name}-{family.lower()}", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": name}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": node} for ip, node in endpoints],
    })
    assert parsed is not None
    return parsed


def dual(**spec: Any) -> Any:
    return service("web", "10.96.0.10", clusterIPs=["10.96.0.10", "fd00:96::10"],
                   ports=[{"name": "http", "port": 80, **({"nodePort": 30080} if spec.get("type") else {})}], **spec)


def harness_with_node_ips() -> Harness:
    harness = Harness()
    harness.sync = lambda: harness.table.update(  # type: ignore[method-assign]
        harness.store.take_changes(), harness.store, ("192.168.56.101", "fd00:56::101"))
    return harness


@pytest.mark.parametrize(("v4", "v6", "expected"), [
    (V4_PODS, V6_PODS, {(CAP, ("10.96.0.10", "TCP", 80)), (CAP, ("fd00:96::10", "TCP", 80))}),
    # no IPv6 endpoints: the IPv6 ClusterIP refuses while the IPv4 one serves
    (V4_PODS, (), {(CAP, ("10.96.0.10", "TCP", 80)), (REJ, ("fd00:96::10", "TCP", 80))}),
    ((), V6_PODS, {(REJ, ("10.96.0.10", "TCP", 80)), (CAP, ("fd00:96::10", "TCP", 80))}),
])
def test_verdicts_are_per_family(v4: tuple[tuple[str, str], ...], v6: tuple[tuple[str, str], ...],
                                 expected: set[Any]) -> None:
    harness = Harness()
    added, _ = harness.put(dual(), family_slice("web", "IPv4", *v4), family_slice("web", "IPv6", *v6))
    assert added == expected


def test_each_frontend_plans_from_its_own_family() -> None:
    harness = Harness()
    harness.put(dual(), family_slice("web", "IPv4", *V4_PODS), family_slice("web", "IPv6", *V6_PODS))
    for frontend, family, ips in [(("10.96.0.10", "TCP", 80), Family.IPV4, {"10.244.1.2", "10.244.2.2"}),
                                  (("fd00:96::10", "TCP", 80), Family.IPV6, {"fd00:244:1::2", "fd00:244:2::2"})]:
        route = harness.table.routes[frontend]
        assert route.family is family
        assert {e.ip for e in plan_connection(route, client_is_local=False).candidates} == ips


def test_local_policy_without_a_local_endpoint_of_one_family_drops_only_that_family() -> None:
    harness = harness_with_node_ips()
    added, _ = harness.put(dual(type="NodePort", externalTrafficPolicy="Local"),
                           family_slice("web", "IPv4", *V4_PODS),
                           family_slice("web", "IPv6", ("fd00:244:2::2", "node2")))
    assert (CAP, ("192.168.56.101", "TCP", 30080)) in added
    assert (DE, ("fd00:56::101", "TCP", 30080)) in added
    route = harness.table.routes[("fd00:56::101", "TCP", 30080)]
    assert plan_connection(route, client_is_local=False).candidates == ()
    # the node's own and its pods' traffic is served from the IPv6 cluster set
    assert [e.ip for e in plan_connection(route, client_is_local=True).candidates] == ["fd00:244:2::2"]


def test_terminating_fallback_is_per_family() -> None:
    """IPv4 has a ready endpoint; IPv6 only a serving, terminating one: each family uses
    its own best, so IPv6 falls back to the terminating pod rather than refusing."""
    harness = Harness()
    v6 = parse_endpoint_slice({
        "kind": "EndpointSlice", "addressType": "IPv6",
        "metadata": {"name": "web-v6", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["fd00:244:1::9"], "nodeName": "node1",
                       "conditions": {"ready": False, "serving": True, "terminating": True}}],
    })
    added, _ = harness.put(dual(), family_slice("web", "IPv4", *V4_PODS), v6)
    assert (CAP, ("fd00:96::10", "TCP", 80)) in added
    state = harness.table.ports[port_name("web")]
    assert [e.ip for e in state.sets(Family.IPV6).cluster] == ["fd00:244:1::9"]
    assert {e.ip for e in state.sets(Family.IPV4).cluster} == {"10.244.1.2", "10.244.2.2"}
    # the port's combined view (affinity pins, UDP flows, the debug API) holds both families
    assert {e.ip for e in state.endpoints.cluster} == {"10.244.1.2", "10.244.2.2", "fd00:244:1::9"}


def test_affinity_is_keyed_by_the_ipv6_client_address() -> None:
    harness = Harness()
    harness.put(dual(sessionAffinity="ClientIP"), family_slice("web", "IPv4", *V4_PODS),
                family_slice("web", "IPv6", *V6_PODS))
    table: ServiceTable = harness.table
    route = table.routes[("fd00:96::10", "TCP", 80)]
    balancer = table.balancer(port_name("web"))
    candidates = plan_connection(route, False).candidates
    first = balancer.pick("fd00:56::100", candidates, now=0.0)
    assert first is not None and first.ip.startswith("fd00:244:")
    assert all(balancer.pick("fd00:56::100", candidates, now=float(t)) == first for t in range(1, 20))
    # an IPv4 client of the same Service has a pin of its own, to an IPv4 pod
    v4 = balancer.pick("192.168.56.100", plan_connection(table.routes[("10.96.0.10", "TCP", 80)], False).candidates,
                       now=1.0)
    assert v4 is not None and v4.ip.startswith("10.244.")
    assert balancer.pick("fd00:56::100", candidates, now=2.0) == first


def test_single_stack_ipv6_service() -> None:
    harness = harness_with_node_ips()
    svc = service("v6", "fd00:96::20", type="NodePort", externalIPs=["fd00:56::200"],
                  ports=[{"name": "http", "port": 80, "nodePort": 30081}])
    added, _ = harness.put(svc, family_slice("v6", "IPv6", *V6_PODS))
    # an IPv6-only Service is not served on the node's IPv4 address, as kube-proxy's IPv4
    # proxier leaves it alone
    assert added == {(CAP, ("fd00:96::20", "TCP", 80)), (CAP, ("fd00:56::200", "TCP", 80)),
                     (CAP, ("fd00:56::101", "TCP", 30081))}


def test_addresses_of_a_family_the_service_lacks_are_not_served() -> None:
    harness = harness_with_node_ips()
    svc = service("v4", "10.96.0.21", type="NodePort", externalIPs=["fd00:56::201", "192.168.56.201"],
                  ports=[{"name": "http", "port": 80, "nodePort": 30082}])
    added, _ = harness.put(svc, family_slice("v4", "IPv4", *V4_PODS))
    assert {frontend for _, frontend in added} == {
        ("10.96.0.21", "TCP", 80), ("192.168.56.201", "TCP", 80), ("192.168.56.101", "TCP", 30082)}
