"""Endpoint selection: which endpoints a service port may send new connections to.

The contract (kube-proxy's CategorizeEndpoints, SPEC.md §2), as one pure function:
- Slices of a Service are merged; the same ip:port twice collapses to one endpoint,
  preferring the non-terminating copy.
- Cluster set: ready endpoints; if none, serving-and-terminating ones.
- Local set: ready endpoints on this node; if none, local serving-and-terminating ones.
- Traffic distribution (`spec.trafficDistribution`, which the EndpointSlice controller
  writes into hints; kube-proxy reads only the hints): `topology_mode` picks one mode for
  the cluster set from the ready endpoints' hints, and then only ready endpoints hinted for
  this node (PreferSameNode) or this zone (PreferSameZone, and PreferClose, its older name)
  are used. The mode is PreferSameNode when every ready endpoint has `hints.forNodes` and
  one names this node; else PreferSameZone when every ready endpoint has `hints.forZones`
  and one names the node's zone (`topology.kubernetes.io/zone`); else none: every ready
  endpoint. So missing or partial hints, a node without a zone, or no endpoint hinted for
  here all fall back to the whole cluster. The serving-and-terminating fallback ignores
  hints; the local set never uses them.
- Dual-stack: each family is categorized on its own (`categorize_families`), as
  kube-proxy's per-family proxiers do, so the terminating fallback and the hints of one
  family never depend on the other's endpoints; the port's combined sets are their union.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from pyproxy.model.family import FAMILIES, Family, family_of, join_host_port
from pyproxy.model.objects import EndpointSlice, ServicePortName


class Endpoint(NamedTuple):
    """One endpoint of a service port. A NamedTuple, not a dataclass: a cluster holds one per
    endpoint and port, and a first sync builds them all (a tuple is built 3.5x faster than a
    frozen dataclass and is as small as a slotted one). Its order is the fields' order."""

    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    is_local: bool
    zone_hints: frozenset[str] | None = None
    node_hints: frozenset[str] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def family(self) -> Family:
        return family_of(self.ip)

    def __str__(self) -> str:
        return join_host_port(self.ip, self.port)


@dataclass(frozen=True)
class EndpointSets:
    all: tuple[Endpoint, ...]
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]

    @property
    def local_ready_ips(self) -> frozenset[str]:
        """What the health check node port counts: terminating pods are left out."""
        return frozenset(e.ip for e in self.all if e.is_local and e.ready)


def merge_slices(
    port: ServicePortName, slices: Iterable[EndpointSlice], node_name: str
) -> tuple[Endpoint, ...]:
    """The endpoints of one service port across all of its Service's slices, deduplicated."""
    merged: dict[tuple[str, int], Endpoint] = {}
    wanted = (port.port_name, port.protocol)
    for endpoint_slice in slices:
        numbers = [p.port for p in endpoint_slice.ports if (p.name, p.protocol) == wanted]
        if not numbers:
            continue
        number = numbers[0]
        for raw in endpoint_slice.endpoints:
            address = (raw.ip, number)
            previous = merged.get(address)
            if previous is None or (previous.terminating and not raw.terminating):
                merged[address] = Endpoint(raw.ip, number, raw.ready, raw.serving, raw.terminating,
                                           raw.node_name == node_name, raw.zone_hints, raw.node_hints)
    # (ip, port) is unique here, so the order of the keys is the order of the endpoints
    return tuple([merged[address] for address in sorted(merged)])


NO_ENDPOINTS = EndpointSets(all=(), cluster=(), local=())  # immutable: shared by every empty family

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


def categorize(endpoints: tuple[Endpoint, ...], zone: str | None, node_name: str = "") -> EndpointSets:
    """Split a service port's endpoints into the cluster and local sets (see module doc)."""
    if not endpoints:
        return EndpointSets(all=endpoints, cluster=(), local=())
    mode = topology_mode(endpoints, node_name, zone)
    if mode is None:  # every ready endpoint is available: no call per endpoint
        cluster = tuple(e for e in endpoints if e.ready)
    else:
        cluster = tuple(e for e in endpoints if e.ready and _available(e, mode, node_name, zone))
    if not cluster:  # no ready endpoint anywhere (a mode always leaves one): terminating ones
        cluster = tuple(e for e in endpoints if e.serving and e.terminating)
    return EndpointSets(all=endpoints, cluster=cluster, local=_usable(tuple(e for e in endpoints if e.is_local)))


def topology_mode(endpoints: tuple[Endpoint, ...], node_name: str, zone: str | None) -> str | None:
    """PREFER_SAME_NODE, PREFER_SAME_ZONE or None, from the ready endpoints' hints."""
    ready = [e for e in endpoints if e.ready]
    if not ready:
        return None
    if all(e.node_hints for e in ready) and any(node_name in (e.node_hints or ()) for e in ready):
        return PREFER_SAME_NODE
    if zone and all(e.zone_hints for e in ready) and any(zone in (e.zone_hints or ()) for e in ready):
        return PREFER_SAME_ZONE
    return None


def _available(endpoint: Endpoint, mode: str | None, node_name: str, zone: str | None) -> bool:
    if mode == PREFER_SAME_NODE:
        return node_name in (endpoint.node_hints or ())
    if mode == PREFER_SAME_ZONE:
        return zone in (endpoint.zone_hints or ())
    return True


def categorize_families(
    endpoints: tuple[Endpoint, ...], zone: str | None, node_name: str = ""
) -> dict[Family, EndpointSets]:
    """`categorize` for each family on its own (every family present, empty or not)."""
    v6 = [e for e in endpoints if ":" in e.ip]  # family_of, once per endpoint
    if not v6:  # the common case: one family, no regrouping
        return {Family.IPV4: categorize(endpoints, zone, node_name), Family.IPV6: NO_ENDPOINTS}
    if len(v6) == len(endpoints):
        return {Family.IPV4: NO_ENDPOINTS, Family.IPV6: categorize(endpoints, zone, node_name)}
    v4 = tuple(e for e in endpoints if ":" not in e.ip)
    return {Family.IPV4: categorize(v4, zone, node_name), Family.IPV6: categorize(tuple(v6), zone, node_name)}


def combine(endpoints: tuple[Endpoint, ...], families: Mapping[Family, EndpointSets]) -> EndpointSets:
    """A port's sets over every family: what it may use at all (affinity pins, flows, views)."""
    v4, v6 = families[Family.IPV4], families[Family.IPV6]
    if v6 is NO_ENDPOINTS and v4.all is endpoints:
        return v4  # one family: its sets are the port's
    if v4 is NO_ENDPOINTS and v6.all is endpoints:
        return v6
    return EndpointSets(
        all=endpoints,
        cluster=tuple(e for f in FAMILIES for e in families[f].cluster),
        local=tuple(e for f in FAMILIES for e in families[f].local),
    )


def _usable(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    ready = tuple(e for e in endpoints if e.ready)
    if ready:
        return ready
    return tuple(e for e in endpoints if e.serving and e.terminating)
