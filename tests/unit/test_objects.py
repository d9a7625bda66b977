"""Parsing API-server-shaped Services, EndpointSlices and Nodes (SPEC.md §1, §2, §4)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from pyproxy.model.objects import (
    DEFAULT_AFFINITY_TIMEOUT,
    InvalidObject,
    ServiceKey,
    ServicePortName,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)


def service_dict(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }
    base["spec"].update(spec)
    return base


def slice_dict(endpoints: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints if endpoints is not None else [{"addresses": ["10.0.1.5"], "nodeName": "node1"}],
    }
    base.update(extra)
    return base


def rejections(parse: Callable[..., Any], obj: dict[str, Any]) -> list[InvalidObject]:
    """Every rejection parsing `obj` makes: of a part (reported, the rest is used) or of
    the whole object (raised)."""
    reported: list[InvalidObject] = []
    try:
        parse(obj, report=reported.append)
    except InvalidObject as err:
        reported.append(err)
    return reported


def parse_ok(obj: dict[str, Any], proxy_name: str | None = None) -> Any:
    service = parse_service(obj, proxy_name)
    assert service is not None
    return service


# --- Services: defaults -------------------------------------------------------------------


def test_minimal_service_defaults() -> None:
    service = parse_ok(service_dict())
    assert service.key == ServiceKey("shop", "web")
    assert service.type == "ClusterIP"
    assert service.cluster_ips == ("10.96.0.10",)
    assert service.affinity_timeout is None  # sessionAffinity defaults to None
    assert not service.external_local and not service.internal_local
    assert service.external_ips == () and service.load_balancer_ips == ()
    assert service.health_check_node_port is None
    (port,) = service.ports
    assert port.name == ServicePortName(ServiceKey("shop", "web"), "http", "TCP")  # protocol defaults to TCP
    assert (port.port, port.node_port, port.target_port) == (80, None, 8080)


def test_namespace_defaults_to_default() -> None:
    obj = service_dict()
    del obj["metadata"]["namespace"]
    assert parse_ok(obj).key == ServiceKey("default", "web")


def test_target_port_defaults_to_port_and_names_are_kept() -> None:
    obj = service_dict(ports=[{"name": "a", "port": 81}, {"name": "b", "port": 82, "targetPort": "metrics"}])
    a, b = parse_ok(obj).ports
    assert a.target_port == 81
    assert b.target_port == "metrics"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"clusterIPs": ["10.96.0.11", "fd00::11"]}, ("10.96.0.11", "fd00::11")),  # dual-stack, IPv4 primary
        ({"clusterIPs": ["FD00:0:0::11", "10.96.0.11"]}, ("fd00::11", "10.96.0.11")),  # IPv6 primary, canonical
        ({"clusterIPs": ["fd00::11"]}, ("fd00::11",)),  # single-stack IPv6
        ({"clusterIP": "fd00::12"}, ("fd00::12",)),  # only the old field
    ],
)
def test_cluster_ips_of_both_families(spec: dict[str, Any], expected: tuple[str, ...]) -> None:
    obj = service_dict()
    del obj["spec"]["clusterIP"]
    obj["spec"].update(spec)
    assert parse_ok(obj).cluster_ips == expected


def test_two_cluster_ips_of_one_family_reject_the_service() -> None:
    with pytest.raises(InvalidObject, match=r"clusterIPs\[1\].*second IPv6 cluster IP"):
        parse_service(service_dict(clusterIPs=["fd00::1", "fd00::2"]))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"sessionAffinity": "None"}, None),
        ({"sessionAffinity": "ClientIP"}, DEFAULT_AFFINITY_TIMEOUT),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}, 10800),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}, 1),
        ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}, 86400),
        # a timeout configured while affinity is off means nothing
        ({"sessionAffinity": "None", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}, None),
    ],
)
def test_affinity_timeout(spec: dict[str, Any], expected: int | None) -> None:
    assert DEFAULT_AFFINITY_TIMEOUT == 10800
    assert parse_ok(service_dict(**spec)).affinity_timeout == expected


@pytest.mark.parametrize("timeout", [0, -1, 86401, "60", 1.5, True, None])
def test_affinity_timeout_out_of_range_is_invalid(timeout: Any) -> None:
    obj = service_dict(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}})
    with pytest.raises(InvalidObject) as info:
        parse_service(obj)
    assert "shop/web" in str(info.value)
    assert "timeoutSeconds" in str(info.value)


# --- Services that are not ours -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "proxy_name"),
    [
        ({"spec": {"clusterIP": "None"}}, None),
        ({"spec": {"clusterIP": ""}}, None),
        ({"spec": {"clusterIP": None}}, None),
        ({"spec": {"clusterIPs": ["None"]}}, None),
        ({"spec": {"type": "ExternalName", "externalName": "example.com", "clusterIP": ""}}, None),
        ({"labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"}}, None),
        ({"labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"}}, "pyproxy"),
    ],
    ids=["headless", "empty-ip", "null-ip", "headless-list", "external-name",
         "other-proxy-unnamed", "other-proxy-named"],
)
def test_services_pyproxy_ignores_parse_to_none(change: dict[str, Any], proxy_name: str | None) -> None:
    obj = service_dict()
    if "spec" in change:
        del obj["spec"]["clusterIP"]
        obj["spec"].update(change["spec"])
    if "labels" in change:
        obj["metadata"]["labels"] = change["labels"]
    assert parse_service(obj, proxy_name) is None


def test_service_proxy_name_label_matching_our_name_is_served() -> None:
    obj = service_dict()
    obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "pyproxy"}
    assert parse_service(obj, "pyproxy") is not None
    assert parse_service(obj, None) is None


def test_external_name_is_skipped_even_with_a_cluster_ip() -> None:
    assert parse_service(service_dict(type="ExternalName")) is None


# --- Service types, addresses and policies ------------------------------------------------


def test_load_balancer_ingress_ips_and_external_ips() -> None:
    obj = service_dict(type="LoadBalancer", externalIPs=["192.0.2.7"],
                       ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"hostname": "lb.example.com"},
                                                  {"ip": "203.0.113.2"}]}}
    service = parse_ok(obj)
    assert service.external_ips == ("192.0.2.7",)
    assert service.load_balancer_ips == ("203.0.113.1", "203.0.113.2")
    assert service.ports[0].node_port == 30080


def test_dual_stack_service_keeps_the_addresses_of_both_families() -> None:
    """External and ingress addresses of either family are served, in the order given."""
    obj = service_dict(type="LoadBalancer", clusterIPs=["10.96.0.10", "fd00::10"],
                       externalIPs=["192.0.2.7", "2001:DB8::7"], ports=[{"port": 80, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "2001:db8::1"}, {"ip": "203.0.113.1"}]}}
    service = parse_ok(obj)
    assert service.cluster_ips == ("10.96.0.10", "fd00::10")
    assert service.external_ips == ("192.0.2.7", "2001:db8::7")
    assert service.load_balancer_ips == ("2001:db8::1", "203.0.113.1")


def test_load_balancer_ips_only_for_type_load_balancer() -> None:
    obj = service_dict(type="NodePort", ports=[{"port": 80, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}
    assert parse_ok(obj).load_balancer_ips == ()


def test_node_port_ignored_for_cluster_ip_services() -> None:
    service = parse_ok(service_dict(ports=[{"port": 80, "nodePort": 30080}]))
    assert service.ports[0].node_port is None


@pytest.mark.parametrize(
    ("svc_type", "etp", "itp", "external_local", "internal_local"),
    [
        ("ClusterIP", None, None, False, False),
        ("ClusterIP", "Local", "Local", False, True),  # no external traffic on a ClusterIP service
        ("NodePort", "Local", None, True, False),
        ("LoadBalancer", "Local", "Cluster", True, False),
        ("LoadBalancer", "Cluster", "Local", False, True),
    ],
)
def test_traffic_policies(svc_type: str, etp: str | None, itp: str | None,
                          external_local: bool, internal_local: bool) -> None:
    spec: dict[str, Any] = {"type": svc_type, "ports": [{"port": 80, "nodePort": 30080}]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    service = parse_ok(service_dict(**spec))
    assert (service.external_local, service.internal_local) == (external_local, internal_local)


@pytest.mark.parametrize(
    ("svc_type", "etp", "expected"),
    [
        ("LoadBalancer", "Local", 32000),
        ("LoadBalancer", "Cluster", None),
        ("NodePort", "Local", None),
        ("ClusterIP", None, None),
    ],
)
def test_health_check_node_port_only_for_local_load_balancers(svc_type: str, etp: str | None,
                                                              expected: int | None) -> None:
    spec: dict[str, Any] = {"type": svc_type, "healthCheckNodePort": 32000,
                            "ports": [{"port": 80, "nodePort": 30080}]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    assert parse_ok(service_dict(**spec)).health_check_node_port == expected


def test_same_port_number_tcp_and_udp_are_two_ports() -> None:
    service = parse_ok(service_dict(type="NodePort",
                                    ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                                           {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053}]))
    assert [(p.name.port_name, p.name.protocol, p.port, p.node_port) for p in service.ports] == [
        ("dns", "UDP", 53, 30053), ("dns-tcp", "TCP", 53, 30053)]


# --- Invalid Services: the error names the object and the field ---------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "Weird"}, "spec.type"),
        ({"ports": []}, "spec.ports"),
        ({"ports": [{"port": 0}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 70000}]}, "spec.ports[0].port"),
        ({"ports": [{"port": "80"}]}, "spec.ports[0].port"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81, "protocol": "SCTP"}]},
         "spec.ports[1].protocol"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, "spec.ports[1]"),
        ({"ports": [{"port": 80, "targetPort": 1.5}]}, "spec.ports[0].targetPort"),
        # one address:port can only be one service port (the API server refuses this too)
        ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80, "targetPort": 81}]}, "spec.ports[1].port"),
        ({"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                                        {"name": "b", "port": 81, "nodePort": 30080}]}, "spec.ports[1].nodePort"),
        ({"type": "NodePort", "ports": [{"port": 80, "nodePort": 0}]}, "spec.ports[0].nodePort"),
        ({"clusterIP": "10.96.0.300"}, "spec.clusterIP"),
        ({"externalIPs": ["not-an-ip"]}, "spec.externalIPs"),
        ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
        ({"externalTrafficPolicy": "Nearby"}, "spec.externalTrafficPolicy"),
        ({"internalTrafficPolicy": "Nearby"}, "spec.internalTrafficPolicy"),
        ({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 99999,
          "ports": [{"port": 80, "nodePort": 30080}]}, "spec.healthCheckNodePort"),
    ],
)
def test_invalid_service_names_object_and_field(spec: dict[str, Any], field: str) -> None:
    found = rejections(parse_service, service_dict(**spec))
    assert any(field in str(err) for err in found), found
    assert all(str(err).startswith("Service shop/web: ") for err in found)
    assert all(err.kind == "Service" and err.key == "shop/web" for err in found)


def test_invalid_load_balancer_ingress_ip() -> None:
    obj = service_dict(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "bogus"}]}}
    found = rejections(parse_service, obj)
    assert [str(e) for e in found] == [
        "Service shop/web: status.loadBalancer.ingress[0].ip: 'bogus' is not an IP address (load-balancer IP skipped)"]


def test_missing_name_is_invalid() -> None:
    obj = service_dict()
    del obj["metadata"]["name"]
    with pytest.raises(InvalidObject, match=r"shop/\?.*metadata\.name"):
        parse_service(obj)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("metadata",), "oops", "metadata"),
        (("metadata", "labels"), ["a"], "metadata.labels"),
        (("spec",), ["a"], "spec"),
        (("spec", "ports"), {"port": 80}, "spec.ports"),
        (("spec", "ports"), ["http"], "spec.ports[0]"),
        (("spec", "externalIPs"), "192.0.2.7", "spec.externalIPs"),
        (("spec", "sessionAffinityConfig"), "long", "spec.sessionAffinityConfig"),
        (("status",), "up", "status"),
        (("status", "loadBalancer"), {"ingress": ["203.0.113.1"]}, "status.loadBalancer.ingress"),
    ],
)
def test_malformed_service_shapes_raise_invalid_object(path: tuple[str, ...], value: Any, field: str) -> None:
    """Any bad input is an InvalidObject, never an AttributeError that kills a watcher."""
    obj = service_dict(type="LoadBalancer", sessionAffinity="ClientIP", ports=[{"port": 80, "nodePort": 30080}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}
    target = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    found = rejections(parse_service, obj)
    assert any(field in str(err) for err in found), found


# --- EndpointSlices -----------------------------------------------------------------------


def test_slice_defaults_for_missing_conditions() -> None:
    parsed = parse_endpoint_slice(slice_dict())
    assert parsed is not None
    assert parsed.service == ServiceKey("shop", "web")
    assert parsed.key == ("shop", "web-abc")
    (endpoint,) = parsed.endpoints
    assert endpoint.ip == "10.0.1.5"
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == (True, True, False)
    assert endpoint.node_name == "node1"
    assert endpoint.zone_hints is None
    assert [(p.name, p.protocol, p.port) for p in parsed.ports] == [("http", "TCP", 8080)]


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({}, (True, True, False)),
        ({"ready": False}, (False, True, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
        ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
        ({"serving": False}, (True, False, False)),
    ],
)
def test_slice_endpoint_conditions(conditions: dict[str, Any], expected: tuple[bool, bool, bool]) -> None:
    parsed = parse_endpoint_slice(slice_dict([{"addresses": ["10.0.1.5"], "conditions": conditions}]))
    assert parsed is not None
    endpoint = parsed.endpoints[0]
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == expected


def test_slice_uses_first_address_and_keeps_hints() -> None:
    parsed = parse_endpoint_slice(slice_dict([
        {"addresses": ["10.0.1.5", "10.0.1.6"], "hints": {"forZones": [{"name": "a"}, {"name": "b"}]}},
        {"addresses": ["10.0.1.7"], "hints": {"forZones": []}},
    ]))
    assert parsed is not None
    first, second = parsed.endpoints
    assert first.ip == "10.0.1.5"
    assert first.zone_hints == frozenset({"a", "b"})
    assert second.zone_hints is None


def test_slice_port_protocol_default_and_unresolved_port_dropped() -> None:
    parsed = parse_endpoint_slice(slice_dict(ports=[{"name": "http", "port": 8080},
                                                    {"name": "metrics", "port": None}]))
    assert parsed is not None
    assert [(p.name, p.protocol, p.port) for p in parsed.ports] == [("http", "TCP", 8080)]


@pytest.mark.parametrize(
    ("labels", "address_type"),
    [
        ({"kubernetes.io/service-name": "web", "service.kubernetes.io/headless": ""}, "IPv4"),
        ({"kubernetes.io/service-name": "web"}, "FQDN"),
    ],
)
def test_slices_pyproxy_ignores_parse_to_none(labels: dict[str, str], address_type: str) -> None:
    obj = slice_dict(addressType=address_type)
    obj["metadata"]["labels"] = labels
    assert parse_endpoint_slice(obj) is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"metadata": {"name": "web-abc", "namespace": "shop"}}, "kubernetes.io/service-name"),
        # YAML reads `kubernetes.io/service-name: 123` as a number; names are strings
        ({"metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": 123}}},
         "kubernetes.io/service-name"),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses"),
        ({"endpoints": [{"addresses": ["10.0.1.5"]}, {"addresses": ["nope"]}]}, "endpoints[1].addresses[0]"),
        ({"ports": [{"port": 0}]}, "ports[0].port"),
        ({"ports": [{"port": 80, "protocol": "SCTP"}]}, "ports[0].protocol"),
        ({"ports": ["http"]}, "ports[0]"),
        ({"endpoints": ["10.0.1.5"]}, "endpoints[0]"),
        ({"endpoints": [{"addresses": ["10.0.1.5"], "conditions": "ready"}]}, "endpoints[0].conditions"),
        # a quoted "false" is not false: refuse it rather than send traffic to an unready pod
        ({"endpoints": [{"addresses": ["10.0.1.5"], "conditions": {"ready": "false"}}]},
         "endpoints[0].conditions.ready"),
        ({"endpoints": [{"addresses": ["10.0.1.5"], "conditions": {"terminating": "true"}}]},
         "endpoints[0].conditions.terminating"),
        ({"endpoints": [{"addresses": ["10.0.1.5"], "hints": {"forZones": ["a"]}}]}, "endpoints[0].hints"),
    ],
)
def test_invalid_slice_names_object_and_field(change: dict[str, Any], field: str) -> None:
    obj = slice_dict()
    obj.update(copy.deepcopy(change))
    found = rejections(parse_endpoint_slice, obj)
    assert any(field in str(err) for err in found), found
    assert all(str(err).startswith("EndpointSlice shop/web-abc: ") for err in found)


# --- Nodes --------------------------------------------------------------------------------


def test_node_zone_deletion_and_autoscaler_taint() -> None:
    node = parse_node({"metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}}})
    assert (node.name, node.zone, node.being_deleted, node.autoscaler_tainted) == ("node1", "z1", False, False)
    node = parse_node({
        "metadata": {"name": "node1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
    })
    assert (node.zone, node.being_deleted, node.autoscaler_tainted) == (None, True, True)


def test_node_other_taints_do_not_count() -> None:
    node = parse_node({"metadata": {"name": "n"}, "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable"}]}})
    assert not node.autoscaler_tainted


def test_node_malformed_taints_are_reported_and_ignored() -> None:
    found: list[InvalidObject] = []
    node = parse_node({"metadata": {"name": "n"}, "spec": {"taints": ["ToBeDeletedByClusterAutoscaler"]}},
                      report=found.append)
    assert not node.autoscaler_tainted
    assert [str(e) for e in found] == ["Node n: spec.taints[0]: expected a mapping, got 'ToBeDeletedByClusterAutoscaler' (taint skipped)"]
