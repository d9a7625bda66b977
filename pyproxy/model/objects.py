"""Kubernetes objects as pyproxy sees them, parsed from API-server-shaped dicts.

Rules kept here:
- Parsing is pure: a dict in, a frozen value out, or `InvalidObject` naming the object, the
  field path and the reason. Nothing else is raised for bad input, of any type, size or
  depth: every field is read through the typed accessors of `fields.py`.
- A bad field rejects as little as it can, as kube-proxy skips what it cannot use: a port,
  not the Service; an endpoint, not the slice; a zone label, not the Node. The rejected
  part goes to the caller's `report` (logged, and an Event in cluster mode); only a field
  that governs the whole object (name, type, cluster IPs, affinity, traffic policy, the
  slice's Service label) rejects the object.
- Only what the proxy needs is kept; unknown fields are ignored, as the API server would.
- Objects the proxy must ignore (headless, ExternalName, another proxy's, headless slices)
  parse to `None`, never to an error: they are valid, just not ours.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyproxy.model.family import Family, family_of
from pyproxy.model.fields import MAX_ITEMS, MAX_NAME, Field, InvalidObject

__all__ = ["InvalidObject"]  # re-exported: callers catch it from here
log = logging.getLogger("pyproxy.objects")

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
PROTOCOLS = ("TCP", "UDP")
KNOWN_PROTOCOLS = ("TCP", "UDP", "SCTP")  # valid for the API server; pyproxy serves PROTOCOLS
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
POLICIES = ("Cluster", "Local")
MAX_PORTS = 1000
MAX_ENDPOINTS = 10000  # the API server allows 1000 per slice
MAX_ZONES = 100
MAX_SOURCE_RANGES = 1000
MAX_NODE_ADDRESSES = 100
IP_MODES = ("VIP", "Proxy")  # status.loadBalancer.ingress[].ipMode (KEP-1860)


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
    # spec.loadBalancerSourceRanges that parse, canonical, both families (firewall.py reads them)
    source_ranges: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)  # slots: a cluster holds one per endpoint
class SliceEndpoint:
    ip: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone_hints: frozenset[str] | None
    node_hints: frozenset[str] | None = None  # hints.forNodes (PreferSameNode)


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
    address_type: Family = Family.IPV4  # every endpoint's address is of this family

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Node:
    name: str
    zone: str | None
    being_deleted: bool
    autoscaler_tainted: bool
    pod_cidrs: tuple[str, ...] = ()  # spec.podCIDRs (or the older spec.podCIDR): --detect-local-mode NodeCIDR
    # the node's primary IPs, at most one per family: the first InternalIP, else ExternalIP,
    # of status.addresses, then the first of the other family (kube-proxy's GetNodeHostIPs)
    host_ips: tuple[str, ...] = ()


Report = Callable[[InvalidObject], None]


def log_part(err: InvalidObject) -> None:
    """The default `report`: a rejected part is never dropped without a log line."""
    log.warning("skipping part of an object: %s", err)


def part(err: InvalidObject, what: str) -> InvalidObject:
    """A rejection of one part (a port, an address, an endpoint): the rest is used."""
    return InvalidObject(err.kind, err.key, f"{err.reason} ({what} skipped)")


@dataclass(frozen=True)
class _Meta:
    namespace: str
    name: str
    key: str  # "namespace/name", or the name of a cluster-scoped object
    root: Field
    labels: Field
    annotations: Field

    def label(self, name: str) -> Field:
        return Field(self.labels.mapping().get(name), self.root.kind, self.key, f"metadata.labels[{name!r}]")


def _meta(obj: Any, kind: str, namespaced: bool = True) -> _Meta:
    top = Field(obj, kind, "?")
    if not isinstance(obj, Mapping):
        raise top.wrong("a mapping")
    meta = top.get("metadata")
    meta.mapping()
    namespace = meta.get("namespace").string("default", limit=MAX_NAME) if namespaced else ""
    name_field = meta.get("name")
    name_field.key = f"{namespace}/?" if namespaced else "?"
    name = name_field.string(limit=MAX_NAME)
    key = f"{namespace}/{name}" if namespaced else name
    root = Field(obj, kind, key)
    labels, annotations = root.get("metadata").get("labels"), root.get("metadata").get("annotations")
    labels.mapping()
    annotations.mapping()
    return _Meta(namespace, name, key, root, labels, annotations)


def parse_service(obj: Mapping[str, Any], proxy_name: str | None = None, report: Report = log_part) -> Service | None:
    """Parse a v1 Service. None when pyproxy must not proxy it (not an error).

    A bad field that governs the whole Service (its name, type, cluster IPs, affinity,
    traffic policies) rejects it; a bad port, external IP, load-balancer IP or health
    check port is reported through `report` and left out, and the rest is served."""
    meta = _meta(obj, "Service")
    spec = meta.root.get("spec")
    spec.mapping()
    if not meta.label(SERVICE_PROXY_NAME_LABEL).missing and meta.label(SERVICE_PROXY_NAME_LABEL).value != proxy_name:
        return None
    svc_type = spec.get("type").choice("ClusterIP", SERVICE_TYPES)
    if svc_type == "ExternalName":
        return None
    cluster_ips = _cluster_ips(spec)
    if not cluster_ips:
        return None  # headless
    service_key = ServiceKey(meta.namespace, meta.name)
    return Service(
        key=service_key,
        type=svc_type,
        cluster_ips=cluster_ips,
        external_ips=_addresses(spec.get("externalIPs").items(), report, "external IP"),
        load_balancer_ips=_lb_ips(meta.root, report) if svc_type == "LoadBalancer" else (),
        ports=_service_ports(spec, service_key, svc_type, report),
        affinity_timeout=_affinity_timeout(spec),
        external_local=spec.get("externalTrafficPolicy").choice("Cluster", POLICIES) == "Local"
        and svc_type != "ClusterIP",
        internal_local=spec.get("internalTrafficPolicy").choice("Cluster", POLICIES) == "Local",
        health_check_node_port=_health_check_node_port(spec, svc_type, report),
        source_ranges=_source_ranges(spec, report) if svc_type == "LoadBalancer" else (),
    )


def _cluster_ips(spec: Field) -> tuple[str, ...]:
    """The cluster IPs, of both families (at most one of each, as the API server allows);
    () for a headless Service. A bad one, or two of one family, rejects the Service."""
    fields = spec.get("clusterIPs").items(limit=2)
    if not fields and not spec.get("clusterIP").missing:
        fields = [spec.get("clusterIP")]
    if not fields or fields[0].value in ("None", ""):
        return ()
    ips = tuple(f.ip() for f in fields)
    if len(ips) == 2 and family_of(ips[0]) == family_of(ips[1]):
        raise fields[1].error(f"a second {family_of(ips[1]).value} cluster IP ({ips[1]}); dual-stack "
                              "means one of each family")
    return ips


def _addresses(fields: list[Field], report: Report, what: str) -> tuple[str, ...]:
    """The addresses of a list, of both families; a bad one is reported and left out."""
    result = []
    for f in fields:
        try:
            result.append(f.ip())
        except InvalidObject as err:
            report(part(err, what))
    return tuple(result)


class _PortSeen:
    """What earlier ports of one Service claimed: a later duplicate is the bad one."""

    def __init__(self) -> None:
        self.names: set[tuple[str, str]] = set()
        self.numbers: set[tuple[str, int]] = set()
        self.node_ports: set[tuple[str, int]] = set()


def _service_ports(spec: Field, key: ServiceKey, svc_type: str, report: Report) -> tuple[ServicePort, ...]:
    fields = spec.get("ports").items(limit=MAX_PORTS)
    if not fields:
        raise spec.get("ports").error("at least one port is required")
    ports: list[ServicePort] = []
    seen = _PortSeen()
    rejected: list[InvalidObject] = []
    for raw in fields:
        try:
            ports.append(_service_port(raw, key, svc_type, seen))
        except InvalidObject as err:
            rejected.append(err)
    if not ports:  # one rejection of the whole, not one per port as well
        raise spec.get("ports").error(f"no port can be served ({rejected[0].reason})")
    for rejection in rejected:
        report(part(rejection, "port"))
    return tuple(ports)


def _service_port(raw: Field, key: ServiceKey, svc_type: str, seen: _PortSeen) -> ServicePort:
    raw.mapping()
    name = raw.get("name").string("", limit=MAX_NAME)
    protocol = _protocol(raw.get("protocol"))
    if (name, protocol) in seen.names:
        raise raw.error(f"duplicate port name {name!r}/{protocol}")
    port = raw.get("port").port()
    if (protocol, port) in seen.numbers:
        raise raw.get("port").error(f"duplicate port {port}/{protocol}")
    node_port = None
    if svc_type != "ClusterIP" and not raw.get("nodePort").missing:
        node_port = raw.get("nodePort").port()
        if (protocol, node_port) in seen.node_ports:
            raise raw.get("nodePort").error(f"duplicate node port {node_port}/{protocol}")
    target = raw.get("targetPort").int_or_name(port)
    seen.names.add((name, protocol))
    seen.numbers.add((protocol, port))
    if node_port is not None:
        seen.node_ports.add((protocol, node_port))
    return ServicePort(ServicePortName(key, name, protocol), port, node_port, target)


def _protocol(f: Field) -> str:
    protocol = f.choice("TCP", KNOWN_PROTOCOLS)
    if protocol not in PROTOCOLS:
        raise f.error(f"protocol {protocol} is not supported by pyproxy ({', '.join(PROTOCOLS)})")
    return protocol


def _lb_ips(root: Field, report: Report) -> tuple[str, ...]:
    try:
        ingress = root.get("status").get("loadBalancer").get("ingress").items()
    except InvalidObject as err:
        report(part(err, "load-balancer status"))
        return ()
    fields = []
    for entry in ingress:
        try:
            entry.mapping()
        except InvalidObject as err:
            report(part(err, "load-balancer IP"))
            continue
        if not entry.get("ip").missing and _captured_ip_mode(entry, report):
            fields.append(entry.get("ip"))
    return _addresses(fields, report, "load-balancer IP")


def _captured_ip_mode(entry: Field, report: Report) -> bool:
    """KEP-1860: an ingress IP with `ipMode: Proxy` is the load balancer's own proxy, which
    forwards to the node: pyproxy leaves that address alone. Unset or `VIP` is captured.
    Any other value is reported and, as kube-proxy treats every mode but VIP, not captured."""
    mode = entry.get("ipMode")
    try:
        return mode.choice("VIP", IP_MODES) == "VIP"
    except InvalidObject as err:
        report(part(err, "load-balancer IP"))
        return False


def _source_ranges(spec: Field, report: Report) -> tuple[str, ...]:
    """spec.loadBalancerSourceRanges as kube-proxy reads them: each trimmed and parsed
    sloppily; a bad one is reported and left out, and the others still apply."""
    try:
        fields = spec.get("loadBalancerSourceRanges").items(limit=MAX_SOURCE_RANGES)
    except InvalidObject as err:
        report(part(err, "loadBalancerSourceRanges"))
        return ()
    ranges = []
    for f in fields:
        if isinstance(f.value, str) and not f.value.strip():
            continue  # kube-proxy ignores empty strings silently
        try:
            ranges.append(f.cidr())
        except InvalidObject as err:
            report(part(err, "source range"))
    return tuple(dict.fromkeys(ranges))


def _affinity_timeout(spec: Field) -> int | None:
    if spec.get("sessionAffinity").choice("None", ("None", "ClientIP")) == "None":
        return None
    client_ip = spec.get("sessionAffinityConfig").get("clientIP")
    if "timeoutSeconds" not in client_ip.mapping():  # an explicit null is not "left out"
        return DEFAULT_AFFINITY_TIMEOUT
    return client_ip.get("timeoutSeconds").integer(1, MAX_AFFINITY_TIMEOUT)


def _health_check_node_port(spec: Field, svc_type: str, report: Report) -> int | None:
    port = spec.get("healthCheckNodePort")
    if port.missing or svc_type != "LoadBalancer" or spec.get("externalTrafficPolicy").value != "Local":
        return None
    try:
        return port.port()
    except InvalidObject as err:
        report(part(err, "health check"))
        return None


def parse_endpoint_slice(obj: Mapping[str, Any], report: Report = log_part) -> EndpointSlice | None:
    """Parse a discovery.k8s.io/v1 EndpointSlice. None for slices pyproxy ignores.

    A bad name, Service label or address type rejects the slice; a bad port or endpoint
    is reported through `report` and left out, and the rest is used."""
    meta = _meta(obj, "EndpointSlice")
    if not meta.label(HEADLESS_LABEL).missing:
        return None
    service_name = meta.label(SERVICE_NAME_LABEL).string(limit=MAX_NAME)
    address_type = meta.root.get("addressType").string("IPv4", limit=MAX_NAME)
    if address_type not in (Family.IPV4.value, Family.IPV6.value):
        return None  # FQDN slices: kube-proxy does not use them either
    family = Family(address_type)
    ports = []
    for raw in meta.root.get("ports").items(limit=MAX_PORTS):
        try:
            slice_port = _slice_port(raw)
        except InvalidObject as err:
            report(part(err, "port"))
            continue
        if slice_port is not None:
            ports.append(slice_port)
    endpoints = []
    for raw in meta.root.get("endpoints").items(limit=MAX_ENDPOINTS):
        fast = _plain_endpoint(raw.value) if family is Family.IPV4 else None
        if fast is not None:
            endpoints.append(fast)
            continue
        try:
            endpoints.append(_slice_endpoint(raw, family))
        except InvalidObject as err:
            report(part(err, "endpoint"))
    return EndpointSlice(
        namespace=meta.namespace,
        name=meta.name,
        service=ServiceKey(meta.namespace, service_name),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=_trigger_time(meta, report),
        address_type=family,
    )


def _slice_port(raw: Field) -> SlicePort | None:
    raw.mapping()
    if raw.get("port").missing:
        return None  # a port the controller could not resolve: no traffic can use it
    return SlicePort(
        name=raw.get("name").string("", limit=MAX_NAME),
        protocol=_protocol(raw.get("protocol")),
        port=raw.get("port").port(),
    )


def _slice_endpoint(raw: Field, family: Family) -> SliceEndpoint:
    raw.mapping()
    addresses = raw.get("addresses").items(limit=100)
    if not addresses:
        raise raw.get("addresses").error("at least one address is required")
    ip = addresses[0].ip()
    if family_of(ip) != family:
        raise addresses[0].error(f"{ip} is not an {family.value} address (addressType is {family.value})")
    conditions = raw.get("conditions")
    ready, serving, terminating = (conditions.get(c).optional_bool() for c in ("ready", "serving", "terminating"))
    zones = _hints(raw.get("hints").get("forZones"))
    nodes = _hints(raw.get("hints").get("forNodes"))
    return SliceEndpoint(
        ip=ip,
        ready=True if ready is None else ready,
        serving=True if serving is None else serving,
        terminating=False if terminating is None else terminating,
        node_name=raw.get("nodeName").optional_string(limit=MAX_NAME),
        zone_hints=zones,
        node_hints=nodes,
    )


_CONDITIONS = ("ready", "serving", "terminating")


def _plain_endpoint(raw: Any) -> SliceEndpoint | None:
    """`_slice_endpoint` for the common shape, without `Field`s: an IPv4 endpoint whose first
    address is already canonical, conditions absent or booleans, no hints. Anything else is
    None, and the careful path reads it (and names what is wrong). Same result either way:
    a first sync parses every endpoint of the cluster."""
    if type(raw) is not dict or len(raw) > MAX_ITEMS or raw.get("hints") is not None:
        return None
    addresses = raw.get("addresses")
    if type(addresses) is not list or not 1 <= len(addresses) <= 100:
        return None
    ip = addresses[0]
    if type(ip) is not str or not _canonical_ipv4(ip):
        return None
    conditions = raw.get("conditions")
    if conditions is None:
        ready = serving = terminating = None
    elif type(conditions) is dict and len(conditions) <= MAX_ITEMS:
        ready, serving, terminating = (conditions.get(c) for c in _CONDITIONS)
        if any(v is not None and type(v) is not bool for v in (ready, serving, terminating)):
            return None
    else:
        return None
    node = raw.get("nodeName")
    if node == "":
        node = None
    elif node is not None and (type(node) is not str or len(node) > MAX_NAME):
        return None
    return SliceEndpoint(ip=ip, ready=True if ready is None else ready, serving=True if serving is None else serving,
                         terminating=False if terminating is None else terminating, node_name=node,
                         zone_hints=None, node_hints=None)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}").fullmatch  # one C call per address


def _canonical_ipv4(text: str) -> bool:
    """Dotted quad as `ipaddress` prints it: four decimal octets, no leading zero, <= 255."""
    return _CANONICAL_IPV4(text) is not None


def _hints(f: Field) -> frozenset[str] | None:
    """hints.forZones / hints.forNodes names; an empty or missing list is no hint."""
    names = frozenset(h.get("name").string(limit=MAX_NAME) for h in f.items(limit=MAX_ZONES))
    return names or None


def _trigger_time(meta: _Meta, report: Report) -> str | None:
    field = Field(meta.annotations.mapping().get(TRIGGER_TIME_ANNOTATION), "EndpointSlice", meta.key,
                  f"metadata.annotations[{TRIGGER_TIME_ANNOTATION!r}]")
    try:
        return field.optional_string(limit=64)
    except InvalidObject as err:
        report(part(err, "annotation"))
        return None


def parse_node(obj: Mapping[str, Any], report: Report = log_part) -> Node:
    """Parse a v1 Node. A bad zone label or taint is reported and ignored (no zone: no
    topology hints), never a failure of the syncs that read it."""
    meta = _meta(obj, "Node", namespaced=False)
    zone = None
    try:
        zone = meta.label(ZONE_LABEL).optional_string(limit=MAX_NAME)
    except InvalidObject as err:
        report(part(err, "zone label"))
    autoscaler_tainted = False
    try:
        taints = meta.root.get("spec").get("taints").items()
    except InvalidObject as err:
        report(part(err, "taints"))
        taints = []
    for taint in taints:
        try:
            autoscaler_tainted |= taint.get("key").optional_string() == "ToBeDeletedByClusterAutoscaler"
        except InvalidObject as err:
            report(part(err, "taint"))
    return Node(
        name=meta.name,
        zone=zone,
        being_deleted=not meta.root.get("metadata").get("deletionTimestamp").missing,
        autoscaler_tainted=autoscaler_tainted,
        pod_cidrs=_pod_cidrs(meta.root.get("spec"), report),
        host_ips=_host_ips(meta.root.get("status"), report),
    )


def _pod_cidrs(spec: Field, report: Report) -> tuple[str, ...]:
    """spec.podCIDRs (else spec.podCIDR); a bad one is reported and left out."""
    try:
        fields = spec.get("podCIDRs").items(limit=2) or ([spec.get("podCIDR")] if spec.get("podCIDR").value else [])
    except InvalidObject as err:
        report(part(err, "pod CIDRs"))
        return ()
    cidrs = []
    for f in fields:
        try:
            cidrs.append(f.cidr())
        except InvalidObject as err:
            report(part(err, "pod CIDR"))
    return tuple(cidrs)


def _host_ips(status: Field, report: Report) -> tuple[str, ...]:
    """The primary node IPs (see Node.host_ips); unusable addresses are reported and skipped."""
    try:
        entries = status.get("addresses").items(limit=MAX_NODE_ADDRESSES)
    except InvalidObject as err:
        report(part(err, "node addresses"))
        return ()
    by_type: dict[str, list[str]] = {"InternalIP": [], "ExternalIP": []}
    for entry in entries:
        try:
            kind = entry.get("type").optional_string(limit=MAX_NAME)
            if kind in by_type:
                by_type[kind].append(entry.get("address").ip())
        except InvalidObject as err:
            report(part(err, "node address"))
    ordered = by_type["InternalIP"] + by_type["ExternalIP"]
    if not ordered:
        return ()
    other = next((ip for ip in ordered if family_of(ip) != family_of(ordered[0])), None)
    return (ordered[0],) if other is None else (ordered[0], other)
