"""Kubernetes objects as pyproxy sees them, parsed from API-server-shaped dicts.

Rules kept here:
- Parsing is pure: a dict in, a frozen value out, or `InvalidObject` naming the object and
  the reason. Nothing else is raised for bad input.
- Only what the proxy needs is kept; unknown fields are ignored, as the API server would.
- Objects the proxy must ignore (headless, ExternalName, another proxy's, headless slices)
  parse to `None`, never to an error: they are valid, just not ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
PROTOCOLS = ("TCP", "UDP")


class InvalidObject(ValueError):
    """A Service, EndpointSlice or Node that cannot be used, and why."""

    def __init__(self, kind: str, key: str, reason: str) -> None:
        super().__init__(f"{kind} {key}: {reason}")
        self.kind = kind
        self.key = key
        self.reason = reason


@dataclass(frozen=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class ServicePortName:
    """Identity of one service port: the unit of load balancing and of affinity."""

    service: ServiceKey
    port_name: str
    protocol: str

    def __str__(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.service}{port}/{self.protocol}"


@dataclass(frozen=True)
class ServicePort:
    name: ServicePortName
    port: int
    node_port: int | None
    target_port: int | str


@dataclass(frozen=True)
class Service:
    key: ServiceKey
    type: str
    cluster_ips: tuple[str, ...]
    external_ips: tuple[str, ...]
    load_balancer_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    affinity_timeout: int | None  # None: sessionAffinity None
    external_local: bool
    internal_local: bool
    health_check_node_port: int | None


@dataclass(frozen=True)
class SliceEndpoint:
    ip: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone_hints: frozenset[str] | None


@dataclass(frozen=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service: ServiceKey
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    trigger_time: str | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Node:
    name: str
    zone: str | None
    being_deleted: bool
    autoscaler_tainted: bool


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, Mapping[str, str], Mapping[str, str]]:
    meta = obj.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise InvalidObject(str(obj.get("kind", "object")), "?", "metadata is not a mapping")
    name = meta.get("name")
    namespace = meta.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        raise InvalidObject(str(obj.get("kind", "object")), f"{namespace}/?", "metadata.name is missing")
    kind, key = str(obj.get("kind", "object")), f"{namespace}/{name}"
    labels = _mapping(meta.get("labels"), kind, key, "metadata.labels")
    annotations = _mapping(meta.get("annotations"), kind, key, "metadata.annotations")
    return str(namespace), name, labels, annotations


def _mapping(value: Any, kind: str, key: str, field: str) -> Mapping[str, Any]:
    """`value` as a mapping (missing: empty); any other shape is an InvalidObject, never a crash."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidObject(kind, key, f"{field}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, kind: str, key: str, field: str) -> list[Any]:
    """`value` as a list (missing: empty); any other shape is an InvalidObject, never a crash."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidObject(kind, key, f"{field}: expected a list, got {type(value).__name__}")
    return value


def _ipv4(value: Any, kind: str, key: str, field: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise InvalidObject(kind, key, f"{field}: {value!r} is not an IPv4 address") from None


def _port_number(value: Any, kind: str, key: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidObject(kind, key, f"{field}: {value!r} is not a port number (1-65535)")
    return value


def _protocol(value: Any, kind: str, key: str, field: str) -> str:
    protocol = value or "TCP"
    if protocol not in PROTOCOLS:
        raise InvalidObject(kind, key, f"{field}: protocol {protocol!r} is not supported")
    return str(protocol)


def parse_service(obj: Mapping[str, Any], proxy_name: str | None = None) -> Service | None:
    """Parse a v1 Service. None when pyproxy must not proxy it (not an error)."""
    namespace, name, labels, _ = _meta(obj)
    key = f"{namespace}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise InvalidObject("Service", key, "spec is not a mapping")
    owner = labels.get(SERVICE_PROXY_NAME_LABEL)
    if owner is not None and owner != proxy_name:
        return None
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type == "ExternalName":
        return None
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise InvalidObject("Service", key, f"spec.type: unknown type {svc_type!r}")
    cluster_ips = _cluster_ips(spec)
    if not cluster_ips or cluster_ips[0] == "None":
        return None
    cluster_ips = tuple(_ipv4(ip, "Service", key, "spec.clusterIPs") for ip in cluster_ips if ":" not in ip)
    if not cluster_ips:
        return None  # IPv6-only: not served by this IPv4 proxier
    service_key = ServiceKey(namespace, name)
    ports = _service_ports(spec, service_key, svc_type)
    return Service(
        key=service_key,
        type=svc_type,
        cluster_ips=cluster_ips,
        external_ips=tuple(
            _ipv4(ip, "Service", key, "spec.externalIPs")
            for ip in _list(spec.get("externalIPs"), "Service", key, "spec.externalIPs")
            if ":" not in str(ip)  # IPv6: the other family's proxier serves it, as with clusterIPs
        ),
        load_balancer_ips=_lb_ips(obj, key) if svc_type == "LoadBalancer" else (),
        ports=ports,
        affinity_timeout=_affinity_timeout(spec, key),
        external_local=_policy(spec, "externalTrafficPolicy", key) and svc_type != "ClusterIP",
        internal_local=_policy(spec, "internalTrafficPolicy", key),
        health_check_node_port=_health_check_node_port(spec, key, svc_type),
    )


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...]:
    ips = spec.get("clusterIPs") or ()
    if not ips and spec.get("clusterIP"):
        ips = (spec["clusterIP"],)
    return tuple(str(ip) for ip in ips)


def _service_ports(spec: Mapping[str, Any], key: ServiceKey, svc_type: str) -> tuple[ServicePort, ...]:
    raw_ports = spec.get("ports") or ()
    if not isinstance(raw_ports, list) or not raw_ports:
        raise InvalidObject("Service", str(key), "spec.ports: at least one port is required")
    ports: list[ServicePort] = []
    seen: set[tuple[str, str]] = set()
    numbers: set[tuple[str, int]] = set()  # one address:port is one service port, as the API server insists
    node_ports: set[tuple[str, int]] = set()
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidObject("Service", str(key), f"{field} is not a mapping")
        port_name = str(raw.get("name") or "")
        protocol = _protocol(raw.get("protocol"), "Service", str(key), f"{field}.protocol")
        if (port_name, protocol) in seen:
            raise InvalidObject("Service", str(key), f"{field}: duplicate port name {port_name!r}/{protocol}")
        seen.add((port_name, protocol))
        port = _port_number(raw.get("port"), "Service", str(key), f"{field}.port")
        if (protocol, port) in numbers:
            raise InvalidObject("Service", str(key), f"{field}.port: duplicate port {port}/{protocol}")
        numbers.add((protocol, port))
        node_port = raw.get("nodePort")
        if svc_type == "ClusterIP" or node_port is None:
            node_port = None
        else:
            node_port = _port_number(node_port, "Service", str(key), f"{field}.nodePort")
            if (protocol, node_port) in node_ports:
                raise InvalidObject("Service", str(key), f"{field}.nodePort: duplicate node port {node_port}/{protocol}")
            node_ports.add((protocol, node_port))
        target = raw.get("targetPort", port)
        if not isinstance(target, (int, str)) or isinstance(target, bool):
            raise InvalidObject("Service", str(key), f"{field}.targetPort: {target!r} is neither a number nor a name")
        ports.append(ServicePort(ServicePortName(key, port_name, protocol), port, node_port, target))
    return tuple(ports)


def _lb_ips(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    status = _mapping(obj.get("status"), "Service", key, "status")
    balancer = _mapping(status.get("loadBalancer"), "Service", key, "status.loadBalancer")
    ingress = _list(balancer.get("ingress"), "Service", key, "status.loadBalancer.ingress")
    ingress = [_mapping(i, "Service", key, f"status.loadBalancer.ingress[{n}]") for n, i in enumerate(ingress)]
    return tuple(
        _ipv4(i["ip"], "Service", key, "status.loadBalancer.ingress")
        for i in ingress
        if i.get("ip") and ":" not in str(i["ip"])  # IPv6 ingress: not this IPv4 proxier's
    )


def _affinity_timeout(spec: Mapping[str, Any], key: str) -> int | None:
    affinity = spec.get("sessionAffinity") or "None"
    if affinity == "None":
        return None
    if affinity != "ClientIP":
        raise InvalidObject("Service", key, f"spec.sessionAffinity: {affinity!r} is not None or ClientIP")
    config = _mapping(spec.get("sessionAffinityConfig"), "Service", key, "spec.sessionAffinityConfig")
    config = _mapping(config.get("clientIP"), "Service", key, "spec.sessionAffinityConfig.clientIP")
    timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise InvalidObject(
            "Service", key,
            f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {timeout!r} is not in 1..{MAX_AFFINITY_TIMEOUT}",
        )
    return timeout


def _policy(spec: Mapping[str, Any], field: str, key: str) -> bool:
    value = spec.get(field) or "Cluster"
    if value not in ("Cluster", "Local"):
        raise InvalidObject("Service", key, f"spec.{field}: {value!r} is not Cluster or Local")
    return bool(value == "Local")


def _health_check_node_port(spec: Mapping[str, Any], key: str, svc_type: str) -> int | None:
    port = spec.get("healthCheckNodePort")
    if port is None or svc_type != "LoadBalancer" or spec.get("externalTrafficPolicy") != "Local":
        return None
    return _port_number(port, "Service", key, "spec.healthCheckNodePort")


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice | None:
    """Parse a discovery.k8s.io/v1 EndpointSlice. None for slices pyproxy ignores."""
    namespace, name, labels, annotations = _meta(obj)
    key = f"{namespace}/{name}"
    if HEADLESS_LABEL in labels:
        return None
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        raise InvalidObject("EndpointSlice", key, f"label {SERVICE_NAME_LABEL} is missing")
    if not isinstance(service_name, str):  # e.g. YAML's unquoted 123; a ServiceKey must sort with the rest
        raise InvalidObject("EndpointSlice", key, f"label {SERVICE_NAME_LABEL}: {service_name!r} is not a string")
    address_type = obj.get("addressType", "IPv4")
    if address_type != "IPv4":
        return None
    ports = []
    for i, raw in enumerate(_list(obj.get("ports"), "EndpointSlice", key, "ports")):
        field = f"ports[{i}]"
        raw = _mapping(raw, "EndpointSlice", key, field)
        if raw.get("port") is None:
            continue  # a port the controller could not resolve: no traffic can use it
        ports.append(SlicePort(
            name=str(raw.get("name") or ""),
            protocol=_protocol(raw.get("protocol"), "EndpointSlice", key, f"{field}.protocol"),
            port=_port_number(raw.get("port"), "EndpointSlice", key, f"{field}.port"),
        ))
    endpoints = tuple(
        _slice_endpoint(_mapping(raw, "EndpointSlice", key, f"endpoints[{i}]"), key, f"endpoints[{i}]")
        for i, raw in enumerate(_list(obj.get("endpoints"), "EndpointSlice", key, "endpoints"))
    )
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service=ServiceKey(namespace, service_name),
        ports=tuple(ports),
        endpoints=tuple(e for e in endpoints if e is not None),
        trigger_time=annotations.get(TRIGGER_TIME_ANNOTATION),
    )


def _slice_endpoint(raw: Mapping[str, Any], key: str, field: str) -> SliceEndpoint | None:
    addresses = _list(raw.get("addresses"), "EndpointSlice", key, f"{field}.addresses")
    if not addresses:
        raise InvalidObject("EndpointSlice", key, f"{field}.addresses: at least one address is required")
    conditions = _mapping(raw.get("conditions"), "EndpointSlice", key, f"{field}.conditions")
    ready, serving, terminating = (
        _condition(conditions, name, key, field) for name in ("ready", "serving", "terminating")
    )
    hints = _mapping(raw.get("hints"), "EndpointSlice", key, f"{field}.hints")
    for_zones = _list(hints.get("forZones"), "EndpointSlice", key, f"{field}.hints.forZones")
    zones = None
    if for_zones:
        zones = frozenset(
            str(_mapping(z, "EndpointSlice", key, f"{field}.hints.forZones[{n}]").get("name"))
            for n, z in enumerate(for_zones)
        )
    return SliceEndpoint(
        ip=_ipv4(addresses[0], "EndpointSlice", key, f"{field}.addresses[0]"),
        ready=True if ready is None else ready,
        serving=True if serving is None else serving,
        terminating=False if terminating is None else terminating,
        node_name=raw.get("nodeName"),
        zone_hints=zones,
    )


def _condition(conditions: Mapping[str, Any], name: str, key: str, field: str) -> bool | None:
    value = conditions.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidObject("EndpointSlice", key, f"{field}.conditions.{name}: {value!r} is not true or false")
    return value


def parse_node(obj: Mapping[str, Any]) -> Node:
    _, name, labels, _ = _meta(obj)
    metadata = obj.get("metadata") or {}
    spec = _mapping(obj.get("spec"), "Node", name, "spec")
    taints = [_mapping(t, "Node", name, f"spec.taints[{n}]")
              for n, t in enumerate(_list(spec.get("taints"), "Node", name, "spec.taints"))]
    return Node(
        name=name,
        zone=labels.get(ZONE_LABEL),
        being_deleted=metadata.get("deletionTimestamp") is not None,
        autoscaler_tainted=any(t.get("key") == "ToBeDeletedByClusterAutoscaler" for t in taints),
    )
