"""Endpoint selection: which endpoints a service port may send new connections to.

The contract (kube-proxy's CategorizeEndpoints, SPEC.md §2), as one pure function:
- Slices of a Service are merged; the same ip:port twice collapses to one endpoint,
  preferring the non-terminating copy.
- Cluster set: ready endpoints; if none, serving-and-terminating ones.
- Local set: ready endpoints on this node; if none, local serving-and-terminating ones.
- Topology hints narrow the cluster set to this node's zone, only when every ready
  endpoint carries hints and at least one names the zone.
- Dual-stack: each family is categorized on its own (`categorize_families`), as
  kube-proxy's per-family proxiers do, so the terminating fallback and the hints of one
  family never depend on the other's endpoints; the port's combined sets are their union.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyproxy.model.family import Family, family_of, join_host_port
from pyproxy.model.objects import EndpointSlice, ServicePortName


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    is_local: bool
    zone_hints: frozenset[str] | None = None

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
    for endpoint_slice in slices:
        numbers = [p.port for p in endpoint_slice.ports if (p.name, p.protocol) == (port.port_name, port.protocol)]
        if not numbers:
            continue
        for raw in endpoint_slice.endpoints:
            endpoint = Endpoint(
                ip=raw.ip,
                port=numbers[0],
                ready=raw.ready,
                serving=raw.serving,
                terminating=raw.terminating,
                is_local=raw.node_name == node_name,
                zone_hints=raw.zone_hints,
            )
            previous = merged.get(endpoint.address)
            if previous is None or (previous.terminating and not endpoint.terminating):
                merged[endpoint.address] = endpoint
    return tuple(sorted(merged.values()))


def categorize(endpoints: tuple[Endpoint, ...], zone: str | None) -> EndpointSets:
    """Split a service port's endpoints into the cluster and local sets (see module doc)."""
    return EndpointSets(
        all=endpoints,
        cluster=_apply_hints(_usable(endpoints), zone),
        local=_usable(tuple(e for e in endpoints if e.is_local)),
    )


def categorize_families(endpoints: tuple[Endpoint, ...], zone: str | None) -> dict[Family, EndpointSets]:
    """`categorize` for each family on its own (every family present, empty or not)."""
    return {f: categorize(tuple(e for e in endpoints if e.family is f), zone) for f in Family}


def combine(endpoints: tuple[Endpoint, ...], families: Mapping[Family, EndpointSets]) -> EndpointSets:
    """A port's sets over every family: what it may use at all (affinity pins, flows, views)."""
    return EndpointSets(
        all=endpoints,
        cluster=tuple(e for f in Family for e in families[f].cluster),
        local=tuple(e for f in Family for e in families[f].local),
    )


def _usable(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    ready = tuple(e for e in endpoints if e.ready)
    if ready:
        return ready
    return tuple(e for e in endpoints if e.serving and e.terminating)


def _apply_hints(endpoints: tuple[Endpoint, ...], zone: str | None) -> tuple[Endpoint, ...]:
    ready = [e for e in endpoints if e.ready]
    if zone is None or not ready or any(e.zone_hints is None for e in ready):
        return endpoints
    in_zone = tuple(e for e in endpoints if e.zone_hints is not None and zone in e.zone_hints)
    return in_zone or endpoints
