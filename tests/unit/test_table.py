"""The service table (SPEC.md §1-§3): frontends, verdicts, plans and incremental updates."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pyproxy.model.endpoints import Endpoint, EndpointSets
from pyproxy.model.objects import (
    ServiceKey,
    ServicePortName,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from pyproxy.model.store import ClusterStore
from pyproxy.model.table import (
    Element,
    Frontend,
    PortState,
    Route,
    ServiceTable,
    Verdict,
    plan_connection,
    source_matters,
    verdicts,
)

NODE = "node1"
NODE_IPS = ("192.168.1.10", "172.16.0.10")
CAP, REJ, DI, DE = Verdict.CAPTURE, Verdict.REJECT, Verdict.DROP_INTERNAL, Verdict.DROP_EXTERNAL


# --- builders -----------------------------------------------------------------------------


def service(name: str, cluster_ip: str, ports: list[dict[str, Any]] | None = None, **spec: Any) -> Any:
    obj: dict[str, Any] = {"kind": "Service", "metadata": {"name": name, "namespace": "ns"},
           "spec": {"clusterIP": cluster_ip, "ports": ports or [{"name": "http", "port": 80}], **spec}}
    if "ingress" in spec:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in spec.pop("ingress")]}}
        del obj["spec"]["ingress"]
    parsed = parse_service(obj)
    assert parsed is not None
    return parsed


def endpoint_slice(service_name: str, *endpoints: tuple[str, str] | tuple[str, str, dict[str, bool]],
                   ports: list[dict[str, Any]] | None = None, name: str | None = None) -> Any:
    obj = {"kind": "EndpointSlice",
           "metadata": {"name": name or f"{service_name}-1", "namespace": "ns",
                        "labels": {"kubernetes.io/service-name": service_name}},
           "ports": ports or [{"name": "http", "port": 8080}],
           "endpoints": [{"addresses": [e[0]], "nodeName": e[1], "conditions": e[2] if len(e) > 2 else {}}
                         for e in endpoints]}
    parsed = parse_endpoint_slice(obj)
    assert parsed is not None
    return parsed


def key(name: str) -> ServiceKey:
    return ServiceKey("ns", name)


def port_name(name: str, port: str = "http", protocol: str = "TCP") -> ServicePortName:
    return ServicePortName(key(name), port, protocol)


class Harness:
    """A store and a table, synced the way the proxier does it."""

    def __init__(self, **table_args: Any) -> None:
        self.store = ClusterStore()
        self.store.replace_all([], [])
        self.conflicts: list[tuple[ServiceKey, Frontend, ServiceKey]] = []
        self.table = ServiceTable(NODE, rng=random.Random(1),
                                  on_conflict=lambda *args: self.conflicts.append(args), **table_args)

    def sync(self) -> tuple[set[Element], set[Element]]:
        return self.table.update(self.store.take_changes(), self.store, NODE_IPS)

    def put(self, *objects: Any) -> tuple[set[Element], set[Element]]:
        for obj in objects:
            if hasattr(obj, "cluster_ips"):
                self.store.upsert_service(obj.key, obj)
            else:
                self.store.upsert_slice(obj.key, obj)
        return self.sync()


# --- plan_connection and verdicts ---------------------------------------------------------


def endpoint(ip: str, local: bool) -> Endpoint:
    return Endpoint(ip, 8080, True, True, False, local)


REMOTE, LOCAL = endpoint("10.0.2.1", False), endpoint("10.0.1.1", True)
BOTH = EndpointSets(all=(LOCAL, REMOTE), cluster=(LOCAL, REMOTE), local=(LOCAL,))
REMOTE_ONLY = EndpointSets(all=(REMOTE,), cluster=(REMOTE,), local=())
NONE = EndpointSets(all=(), cluster=(), local=())


def state(sets: EndpointSets, internal_local: bool = False, external_local: bool = False) -> PortState:
    return PortState(port_name("web"), sets, None, internal_local, external_local)


@pytest.mark.parametrize(
    ("internal_local", "external_local", "external", "client_is_local", "candidates", "transparent"),
    [
        (False, False, False, False, (LOCAL, REMOTE), False),  # ClusterIP, Cluster policy
        (True, False, False, False, (LOCAL,), False),  # internalTrafficPolicy Local
        (True, False, False, True, (LOCAL,), False),  # ...also for the node's own clients
        (False, False, True, False, (LOCAL, REMOTE), False),  # NodePort/LB, Cluster: node's source
        (False, True, True, False, (LOCAL,), True),  # externalTrafficPolicy Local: keep the client IP
        (False, True, True, True, (LOCAL, REMOTE), False),  # short-circuit for node/pod clients
        (False, True, False, False, (LOCAL, REMOTE), False),  # ETP Local doesn't touch ClusterIP traffic
        (True, False, True, False, (LOCAL, REMOTE), False),  # ITP Local doesn't touch external traffic
    ],
)
def test_plan_connection(internal_local: bool, external_local: bool, external: bool, client_is_local: bool,
                         candidates: tuple[Endpoint, ...], transparent: bool) -> None:
    route = Route(state(BOTH, internal_local, external_local), external)
    plan = plan_connection(route, client_is_local)
    assert (plan.candidates, plan.transparent) == (candidates, transparent)


@pytest.mark.parametrize(
    ("sets", "internal_local", "external_local", "expected"),
    [
        (BOTH, False, False, (CAP, CAP)),
        (NONE, False, False, (REJ, REJ)),
        (NONE, True, True, (REJ, REJ)),  # nothing at all: refuse, even with Local policies
        (REMOTE_ONLY, True, False, (DI, CAP)),
        (REMOTE_ONLY, False, True, (CAP, DE)),
        (REMOTE_ONLY, True, True, (DI, DE)),
        (BOTH, True, True, (CAP, CAP)),
    ],
)
def test_verdicts(sets: EndpointSets, internal_local: bool, external_local: bool,
                  expected: tuple[Verdict, Verdict]) -> None:
    assert verdicts(state(sets, internal_local, external_local)) == expected


# --- frontends ----------------------------------------------------------------------------


def test_all_frontends_of_a_load_balancer_service() -> None:
    h = Harness()
    svc = service("web", "10.96.0.10", [{"name": "http", "port": 80, "nodePort": 30080}], type="LoadBalancer",
                  externalIPs=["192.0.2.7"], ingress=["203.0.113.1"])
    added, removed = h.put(svc, endpoint_slice("web", ("10.0.2.1", "node2")))
    assert removed == set()
    assert added == {
        (CAP, ("10.96.0.10", "TCP", 80)),
        (CAP, ("192.0.2.7", "TCP", 80)),
        (CAP, ("203.0.113.1", "TCP", 80)),
        (CAP, ("192.168.1.10", "TCP", 30080)),
        (CAP, ("172.16.0.10", "TCP", 30080)),
    }
    assert {f: r.external for f, r in h.table.routes.items()} == {
        ("10.96.0.10", "TCP", 80): False, ("192.0.2.7", "TCP", 80): True, ("203.0.113.1", "TCP", 80): True,
        ("192.168.1.10", "TCP", 30080): True, ("172.16.0.10", "TCP", 30080): True}
    assert h.table.all_elements() == added


def test_same_port_number_tcp_and_udp_are_two_frontends() -> None:
    h = Harness()
    dns = service("dns", "10.96.0.53", [{"name": "dns", "port": 53, "protocol": "UDP"},
                                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    added, _ = h.put(dns, endpoint_slice("dns", ("10.0.2.1", "node2"),
                                         ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]))
    assert added == {(CAP, ("10.96.0.53", "UDP", 53)), (CAP, ("10.96.0.53", "TCP", 53))}
    assert h.table.routes[("10.96.0.53", "UDP", 53)].port.name == port_name("dns", "dns", "UDP")
    assert h.table.routes[("10.96.0.53", "TCP", 53)].port.name == port_name("dns", "dns-tcp", "TCP")


def test_local_policies_with_no_local_endpoint_drop() -> None:
    h = Harness()
    svc = service("web", "10.96.0.10", [{"name": "http", "port": 80, "nodePort": 30080}], type="NodePort",
                  externalTrafficPolicy="Local", internalTrafficPolicy="Local")
    added, _ = h.put(svc, endpoint_slice("web", ("10.0.2.1", "node2")))
    assert added == {(DI, ("10.96.0.10", "TCP", 80)), (DE, ("192.168.1.10", "TCP", 30080)),
                     (DE, ("172.16.0.10", "TCP", 30080))}
    # a local endpoint appears: everything is captured, nothing else is touched
    added, removed = h.put(endpoint_slice("web", ("10.0.2.1", "node2"), ("10.0.1.1", NODE)))
    assert added == {(CAP, f) for _, f in removed}
    assert {v for v, _ in removed} == {DI, DE}


def test_service_without_endpoints_is_rejected_then_captured() -> None:
    h = Harness()
    added, _ = h.put(service("web", "10.96.0.10"))
    assert added == {(REJ, ("10.96.0.10", "TCP", 80))}
    added, removed = h.put(endpoint_slice("web", ("10.0.2.1", "node2")))
    assert (added, removed) == ({(CAP, ("10.96.0.10", "TCP", 80))}, {(REJ, ("10.96.0.10", "TCP", 80))})


def test_only_unready_endpoints_is_rejected() -> None:
    h = Harness()
    added, _ = h.put(service("web", "10.96.0.10"),
                     endpoint_slice("web", ("10.0.2.1", "node2", {"ready": False})))
    assert added == {(REJ, ("10.96.0.10", "TCP", 80))}


# --- incremental updates ------------------------------------------------------------------


def test_update_touches_only_the_changed_service() -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1"), service("b", "10.96.0.2"), endpoint_slice("a", ("10.0.2.1", "node2")))
    before = h.table.all_elements()
    added, removed = h.put(endpoint_slice("b", ("10.0.2.2", "node2")))
    assert (added, removed) == ({(CAP, ("10.96.0.2", "TCP", 80))}, {(REJ, ("10.96.0.2", "TCP", 80))})
    assert h.table.all_elements() == (before - removed) | added


def test_no_change_means_no_elements() -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1"), endpoint_slice("a", ("10.0.2.1", "node2")))
    # an endpoint change that keeps the verdict changes no kernel element
    assert h.put(endpoint_slice("a", ("10.0.2.1", "node2"), ("10.0.2.9", "node2"))) == (set(), set())
    # rebuilding a service explicitly, without any change, neither
    assert h.table.update({key("a")}, h.store, NODE_IPS) == (set(), set())


def test_port_change_replaces_the_frontend() -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1"), endpoint_slice("a", ("10.0.2.1", "node2")))
    added, removed = h.put(service("a", "10.96.0.1", [{"name": "http", "port": 81}]))
    assert (added, removed) == ({(CAP, ("10.96.0.1", "TCP", 81))}, {(CAP, ("10.96.0.1", "TCP", 80))})
    assert set(h.table.routes) == {("10.96.0.1", "TCP", 81)}


def test_deleting_a_service_removes_its_elements_routes_and_ports() -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1"), service("b", "10.96.0.2"), endpoint_slice("a", ("10.0.2.1", "node2")))
    h.store.upsert_service(key("a"), None)
    added, removed = h.sync()
    assert (added, removed) == (set(), {(CAP, ("10.96.0.1", "TCP", 80))})
    assert set(h.table.routes) == {("10.96.0.2", "TCP", 80)}
    assert set(h.table.ports) == {port_name("b")}


def test_node_address_change_moves_node_ports() -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1", [{"name": "http", "port": 80, "nodePort": 30080}], type="NodePort"),
          endpoint_slice("a", ("10.0.2.1", "node2")))
    added, removed = h.table.update({key("a")}, h.store, ("192.168.1.10", "192.168.1.11"))
    assert added == {(CAP, ("192.168.1.11", "TCP", 30080))}
    assert removed == {(CAP, ("172.16.0.10", "TCP", 30080))}


# --- conflicts ----------------------------------------------------------------------------


def test_first_claimant_keeps_the_frontend() -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1", externalIPs=["192.0.2.7"]), endpoint_slice("a", ("10.0.2.1", "node2")))
    added, _ = h.put(service("b", "10.96.0.2", externalIPs=["192.0.2.7"]))
    assert added == {(REJ, ("10.96.0.2", "TCP", 80))}  # b has no endpoints; 192.0.2.7 stays a's
    assert h.conflicts == [(key("b"), ("192.0.2.7", "TCP", 80), key("a"))]
    assert h.table.routes[("192.0.2.7", "TCP", 80)].port.name == port_name("a")
    # a's own rebuild is not a conflict with itself
    h.put(endpoint_slice("a", ("10.0.2.1", "node2"), ("10.0.2.5", "node2")))
    assert len(h.conflicts) == 1
    assert (CAP, ("192.0.2.7", "TCP", 80)) in h.table.all_elements()


@pytest.mark.parametrize("loser", ["b", "0"])  # sorts after, and before, the owner "a"
def test_a_frontend_released_by_its_owner_goes_to_the_other_claimant(loser: str) -> None:
    h = Harness()
    h.put(service("a", "10.96.0.1", externalIPs=["192.0.2.7"]), endpoint_slice("a", ("10.0.2.1", "node2")))
    h.put(service(loser, "10.96.0.2", externalIPs=["192.0.2.7"]))
    assert len(h.conflicts) == 1
    h.store.upsert_service(key("a"), None)
    added, removed = h.sync()
    assert (CAP, ("192.0.2.7", "TCP", 80)) in removed
    assert (REJ, ("192.0.2.7", "TCP", 80)) in added  # now the other Service's: no endpoints, refused
    assert h.table.routes[("192.0.2.7", "TCP", 80)].port.name == port_name(loser)
    assert h.table.all_elements() == {(REJ, ("10.96.0.2", "TCP", 80)), (REJ, ("192.0.2.7", "TCP", 80))}


# --- balancers ----------------------------------------------------------------------------


def test_balancer_survives_rebuilds_and_goes_with_its_port() -> None:
    h = Harness()
    svc = service("web", "10.96.0.10", [{"name": "http", "port": 80}, {"name": "admin", "port": 9000}],
                  sessionAffinity="ClientIP")
    slice_ports = [{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]
    h.put(svc, endpoint_slice("web", ("10.0.2.1", "node2"), ("10.0.2.2", "node2"), ports=slice_ports))
    balancer = h.table.balancer(port_name("web"))
    candidates = h.table.ports[port_name("web")].endpoints.cluster
    first = balancer.pick("192.0.2.1", candidates, now=0.0)
    assert first is not None
    # an endpoint is added: same balancer, pin kept
    h.put(endpoint_slice("web", ("10.0.2.1", "node2"), ("10.0.2.2", "node2"), ("10.0.2.3", "node2"),
                         ports=slice_ports))
    assert h.table.balancer(port_name("web")) is balancer
    candidates = h.table.ports[port_name("web")].endpoints.cluster
    assert balancer.pick("192.0.2.1", candidates, now=1.0) == first
    # the "admin" port is removed from the Service: its balancer goes, "http"'s stays
    h.put(service("web", "10.96.0.10", [{"name": "http", "port": 80}], sessionAffinity="ClientIP"))
    assert set(h.table.balancers) == {port_name("web")}
    assert h.table.balancer(port_name("web")) is balancer
    # the Service goes: so does all of its affinity state
    h.store.upsert_service(key("web"), None)
    h.sync()
    assert h.table.balancers == {}


def test_pinned_endpoint_leaving_drops_the_pin() -> None:
    h = Harness()
    h.put(service("web", "10.96.0.10", sessionAffinity="ClientIP"),
          endpoint_slice("web", ("10.0.2.1", "node2"), ("10.0.2.2", "node2")))
    balancer = h.table.balancer(port_name("web"))
    first = balancer.pick("192.0.2.1", h.table.ports[port_name("web")].endpoints.cluster, now=0.0)
    assert first is not None
    remaining = [e for e in ("10.0.2.1", "10.0.2.2") if e != first.ip]
    h.put(endpoint_slice("web", (remaining[0], "node2")))
    assert balancer.affinity is not None and len(balancer.affinity) == 0


def test_affinity_settings_follow_the_service() -> None:
    h = Harness()
    slc = endpoint_slice("web", ("10.0.2.1", "node2"))
    h.put(service("web", "10.96.0.10"), slc)
    assert h.table.balancer(port_name("web")).affinity is None
    h.put(service("web", "10.96.0.10", sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}))
    table = h.table.balancer(port_name("web")).affinity
    assert table is not None and table.timeout == 30
    h.put(service("web", "10.96.0.10", sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}))
    assert table.timeout == 60
    h.put(service("web", "10.96.0.10"))
    assert h.table.balancer(port_name("web")).affinity is None


def test_zone_hints_use_the_node_zone() -> None:
    h = Harness()
    h.store.set_node(parse_node({"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}}}))
    obj = {"kind": "EndpointSlice",
           "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
           "ports": [{"name": "http", "port": 8080}],
           "endpoints": [{"addresses": ["10.0.2.1"], "hints": {"forZones": [{"name": "z1"}]}},
                         {"addresses": ["10.0.2.2"], "hints": {"forZones": [{"name": "z2"}]}}]}
    h.put(service("web", "10.96.0.10"), parse_endpoint_slice(obj))
    assert [e.ip for e in h.table.ports[port_name("web")].endpoints.cluster] == ["10.0.2.1"]



def test_expire_affinity_drops_only_stale_entries_of_every_port() -> None:
    h = Harness()
    sticky = {"sessionAffinity": "ClientIP"}
    h.put(service("a", "10.96.0.1", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10}}, **sticky),
          service("b", "10.96.0.2", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 100}}, **sticky),
          endpoint_slice("a", ("10.244.1.2", NODE)), endpoint_slice("b", ("10.244.1.3", NODE)))
    for name, balancer in h.table.balancers.items():
        balancer.pick("192.168.56.100", h.table.ports[name].endpoints.cluster, now=0.0)
    assert h.table.expire_affinity(50.0) == 1  # a's 10 s pin is stale at t=50; b's 100 s pin is not
    sizes = {name.service.name: len(b.affinity) for name, b in h.table.balancers.items() if b.affinity is not None}
    assert sizes == {"a": 0, "b": 1}


def test_local_sources_are_the_node_the_cluster_cidrs_and_the_pod_bridges_subnets() -> None:
    from pyproxy.proxier import is_local_source, parse_cidrs

    node = frozenset({"192.168.56.101", "10.244.1.1"})
    assert is_local_source("192.168.56.101", node, ())
    assert not is_local_source("10.244.1.7", node, ())  # a pod, but nothing says so
    assert is_local_source("10.244.1.7", node, parse_cidrs(["10.244.1.0/24"]))  # on this node's bridge
    assert not is_local_source("10.244.2.7", node, parse_cidrs(["10.244.1.0/24"]))  # another node's pod
    assert not is_local_source("192.168.56.100", node, parse_cidrs("10.244.0.0/16,10.245.0.0/16"))


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("internal_local", [False, True])
@pytest.mark.parametrize("external_local", [False, True])
def test_source_matters_exactly_where_the_plan_reads_it(external: bool, internal_local: bool,
                                                         external_local: bool) -> None:
    """The relays skip classifying the client's address where `source_matters` says no: the
    plan must then be the same whatever the answer would have been."""
    route = Route(state(BOTH, internal_local, external_local), external)
    differs = plan_connection(route, True) != plan_connection(route, False)
    assert source_matters(route) == differs


def test_the_affinity_and_health_check_indexes_follow_every_update() -> None:
    from pyproxy.demo import manifests as m
    from pyproxy.model.objects import parse_service

    def svc(name: str, ip: str, **kw: Any) -> Any:
        parsed = parse_service(m.service(name, ip, [m.port(80, 8080, name="http")], **kw))
        assert parsed is not None
        return parsed

    store = ClusterStore()
    table = ServiceTable("node1", rng=random.Random(1))
    plain = svc("plain", "10.96.0.1")
    sticky = svc("sticky", "10.96.0.2", affinity_timeout=60)
    checked = svc("checked", "10.96.0.3", type="LoadBalancer", external_policy="Local", health_check_node_port=32000)
    store.replace_all([plain, sticky, checked], [])

    def scan() -> tuple[set[Any], set[Any]]:  # what a walk over everything finds
        return ({n for n, b in table.balancers.items() if b.affinity is not None},
                {k for k, s in store.services.items() if s.health_check_node_port is not None})

    table.update(store.take_changes(), store, ["192.168.56.101"])
    assert (set(table.affine), set(table.health_checked)) == scan() != (set(), set())
    store.upsert_service(sticky.key, svc("sticky", "10.96.0.2"))  # affinity off
    store.upsert_service(checked.key, None)  # gone
    store.upsert_service(plain.key, svc("plain", "10.96.0.1", affinity_timeout=30))  # affinity on
    table.update(store.take_changes(), store, ["192.168.56.101"])
    assert (set(table.affine), set(table.health_checked)) == scan()
    assert {n.service.name for n in table.affine} == {"plain"} and not table.health_checked
