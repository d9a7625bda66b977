"""The service table: what every captured address means, and what the kernel must capture.

Rules kept here:
- A frontend is one captured address: (ip, protocol, port) of a ClusterIP, externalIP,
  load-balancer IP, or node address + nodePort. ClusterIPs are internal traffic; the rest
  is external traffic (SPEC.md §2).
- The first Service to claim a frontend keeps it; a later claimant is reported, not served,
  and takes the frontend over in the same update once the owner lets it go.
- Each frontend lands in exactly one kernel set (see `Verdict`): captured to the proxy,
  refused (no endpoints at all), or dropped (Local policy with no local endpoint).
- `update()` rebuilds only the Services it is told changed, and returns the kernel set
  elements to add and remove, so a sync costs what changed, not the table's size.
- Balancers (and so affinity state) outlive rebuilds: they are keyed by service port.
- A load-balancer frontend with source ranges (firewall.py) is also a `FIREWALL` element,
  and each source range allowed to reach it an `Allow`; `update()` leaves the Allows it
  added and removed in `allow_changes` (the kernel's firewall set, written in the same
  transaction as the elements).
- Families (SPEC §11): a frontend's family is its address's. Its route plans from the
  port's endpoints of that family only, and its verdict is that family's: an IPv6
  ClusterIP of a Service whose only endpoints are IPv4 refuses. One balancer per service
  port serves both families (an affinity pin is keyed by the client's address, so an IPv6
  client's pin can only name an IPv6 endpoint).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pyproxy.model.affinity import Balancer
from pyproxy.model.endpoints import Endpoint, EndpointSets, categorize_families, combine, merge_slices
from pyproxy.model.family import FAMILIES, Family, family_of
from pyproxy.model.firewall import allowed_sources
from pyproxy.model.objects import Service, ServiceKey, ServicePort, ServicePortName
from pyproxy.model.store import ClusterStore

Frontend = tuple[str, str, int]  # (ip, protocol, port)


class Verdict(enum.Enum):
    CAPTURE = "capture"  # to the proxy's transparent listener
    REJECT = "reject"  # no endpoints at all: connection refused
    DROP_INTERNAL = "drop_internal"  # internalTrafficPolicy Local, no local endpoint
    DROP_EXTERNAL = "drop_external"  # externalTrafficPolicy Local, no local endpoint (non-local clients)
    FIREWALL = "firewall"  # a load-balancer IP with source ranges: only its Allows may reach it

    __hash__ = object.__hash__  # by identity, in C (see Family): elements are hashed by the 10,000


Element = tuple[Verdict, Frontend]
Allow = tuple[Frontend, str]  # (firewalled frontend, a source CIDR allowed to reach it)


@dataclass(frozen=True)
class PortState:
    """Everything the data plane needs to know about one service port, as of the last sync."""

    name: ServicePortName
    endpoints: EndpointSets
    affinity_timeout: int | None
    internal_local: bool
    external_local: bool
    families: Mapping[Family, EndpointSets] = field(default_factory=dict)  # empty: `endpoints` serves every family

    def sets(self, family: Family) -> EndpointSets:
        """The endpoint sets that frontends of `family` are served from."""
        if not self.families:
            return self.endpoints
        return self.families[family]


@dataclass(frozen=True)
class Route:
    port: PortState
    external: bool
    family: Family = Family.IPV4


@dataclass(frozen=True)
class Plan:
    """How a new connection is served: from which endpoints, and whether the source is kept."""

    candidates: tuple[Endpoint, ...]
    transparent: bool


def source_matters(route: Route) -> bool:
    """Whether `plan_connection`'s answer depends on `client_is_local` (an external frontend
    of a Local port): only then need a relay classify the client's address, which costs
    an address parse per connection."""
    return route.external and route.port.external_local


def plan_connection(route: Route, client_is_local: bool) -> Plan:
    """Choose the endpoint set and source address policy for one new connection.

    Traffic from the node itself or its pods to an external address is served from the
    cluster set (kube-proxy's short-circuit). `transparent` is the client's address kept for
    every client; where it is False, model/source.py still keeps a pod's own address.
    """
    port = route.port
    sets = port.sets(route.family)
    if route.external:
        if port.external_local and not client_is_local:
            return Plan(sets.local, transparent=True)
        return Plan(sets.cluster, transparent=False)
    if port.internal_local:
        return Plan(sets.local, transparent=False)
    return Plan(sets.cluster, transparent=False)


def verdicts(port: PortState, family: Family = Family.IPV4) -> tuple[Verdict, Verdict]:
    """The kernel verdict for (internal, external) frontends of `family` of a service port."""
    sets = port.sets(family)
    if not sets.cluster:
        return Verdict.REJECT, Verdict.REJECT
    internal = Verdict.DROP_INTERNAL if port.internal_local and not sets.local else Verdict.CAPTURE
    external = Verdict.DROP_EXTERNAL if port.external_local and not sets.local else Verdict.CAPTURE
    return internal, external


@dataclass
class ServiceTable:
    node_name: str
    capacity: int = 65536
    consistent_seed: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    on_conflict: Callable[[ServiceKey, Frontend, ServiceKey], None] = lambda *_: None
    routes: dict[Frontend, Route] = field(default_factory=dict)
    ports: dict[ServicePortName, PortState] = field(default_factory=dict)
    balancers: dict[ServicePortName, Balancer] = field(default_factory=dict)
    _owners: dict[Frontend, ServiceKey] = field(default_factory=dict)
    _frontends_of: dict[ServiceKey, list[Frontend]] = field(default_factory=dict)
    _ports_of: dict[ServiceKey, list[ServicePortName]] = field(default_factory=dict)
    _elements: dict[ServiceKey, frozenset[Element]] = field(default_factory=dict)
    _waiting: dict[ServiceKey, set[Frontend]] = field(default_factory=dict)  # claims lost to an owner
    _allows: dict[ServiceKey, frozenset[Allow]] = field(default_factory=dict)
    allow_changes: tuple[set[Allow], set[Allow]] = field(default_factory=lambda: (set(), set()))
    # kept by `update`, so that nothing run per sync walks every Service or port:
    affine: dict[ServicePortName, Balancer] = field(default_factory=dict)  # balancers with ClientIP affinity
    health_checked: dict[ServiceKey, Service] = field(default_factory=dict)  # with a healthCheckNodePort

    def update(
        self, changed: Iterable[ServiceKey], store: ClusterStore, node_addresses: Iterable[str]
    ) -> tuple[set[Element], set[Element]]:
        """Rebuild the changed Services; return (elements to add, elements to remove)."""
        addresses = tuple(node_addresses)
        zone = store.node.zone if store.node else None
        node_ips = store.node.host_ips if store.node else ()
        added: set[Element] = set()
        removed: set[Element] = set()
        allows_added: set[Allow] = set()
        allows_removed: set[Allow] = set()
        pending = sorted(set(changed), key=_key_order)  # the dataclass order, without its __lt__ per comparison
        queued = set(pending)  # the keys of pending[done:], for membership tests in O(1)
        done = 0  # pending[:done] are rebuilt (an index: pop(0) would move the whole list per key)
        while done < len(pending):
            key = pending[done]
            done += 1
            queued.discard(key)
            old = self._elements.pop(key, frozenset())
            old_allows = self._allows.pop(key, frozenset())
            old_ports = self._forget(key)
            service = store.services.get(key)
            if service is not None and service.health_check_node_port is not None:
                self.health_checked[key] = service
            else:
                self.health_checked.pop(key, None)
            new = self._build(service, store, addresses, zone) if service else frozenset()
            new_allows = _allows(service, new, node_ips) if service else frozenset()
            for name in old_ports - set(self._ports_of.get(key, ())):
                del self.balancers[name]  # the port is gone: so is its affinity state
                self.affine.pop(name, None)
            if new:
                self._elements[key] = new
            if new_allows:
                self._allows[key] = new_allows
            added |= new - old
            removed |= old - new
            allows_added |= new_allows - old_allows
            allows_removed |= old_allows - new_allows
            if self._waiting:
                claimants = self._claimants_of_released(queued)
                pending += claimants
                queued.update(claimants)
        self.allow_changes = (allows_added - allows_removed, allows_removed - allows_added)
        return added - removed, removed - added

    def _claimants_of_released(self, pending: set[ServiceKey]) -> list[ServiceKey]:
        """Services that lost a frontend claim to an owner that has since let go of it."""
        return sorted(
            (key for key, frontends in self._waiting.items()
             if key not in pending and any(f not in self._owners for f in frontends)),
            key=_key_order,
        )

    def all_elements(self) -> set[Element]:
        return set().union(*self._elements.values()) if self._elements else set()

    def all_allows(self) -> set[Allow]:
        return set().union(*self._allows.values()) if self._allows else set()

    def expire_affinity(self, now: float) -> int:
        """Drop stale affinity entries of every service port (bounded per port); returns
        how many went. Lookups drop stale entries too; this keeps idle tables honest."""
        return sum(b.affinity.expire(now) for b in self.affine.values() if b.affinity is not None)

    def ports_of(self, key: ServiceKey) -> list[ServicePortName]:
        """The port names of a Service in the table (none when it is not)."""
        return list(self._ports_of.get(key, ()))

    def balancer(self, name: ServicePortName) -> Balancer:
        return self.balancers[name]

    def _forget(self, key: ServiceKey) -> set[ServicePortName]:
        """Drop a Service's routes and port states; return its port names (balancers stay)."""
        self._waiting.pop(key, None)
        for frontend in self._frontends_of.pop(key, ()):
            del self._owners[frontend]
            del self.routes[frontend]
        names = self._ports_of.pop(key, [])
        for name in names:
            del self.ports[name]
        return set(names)

    def _build(
        self, service: Service, store: ClusterStore, addresses: tuple[str, ...], zone: str | None
    ) -> frozenset[Element]:
        elements: set[Element] = set()
        slices = list(store.slices_of(service.key))
        for service_port in service.ports:
            merged = merge_slices(service_port.name, slices, self.node_name)
            families = categorize_families(merged, zone, self.node_name)
            state = PortState(
                name=service_port.name,
                endpoints=combine(merged, families),
                affinity_timeout=service.affinity_timeout,
                internal_local=service.internal_local,
                external_local=service.external_local,
                families=families,
            )
            self.ports[state.name] = state
            self._ports_of.setdefault(service.key, []).append(state.name)
            self._configure_balancer(state)
            by_family = {f: verdicts(state, f) for f in FAMILIES}
            for frontend, external in _frontends(service, service_port, addresses):
                family = family_of(frontend[0])
                if self._claim(service.key, frontend, Route(state, external, family)):
                    internal_verdict, external_verdict = by_family[family]
                    elements.add((external_verdict if external else internal_verdict, frontend))
            for ip in service.load_balancer_ips if service.source_ranges else ():
                frontend = (ip, service_port.name.protocol, service_port.port)
                if self._owners.get(frontend) == service.key and _firewalled(service, ip):
                    elements.add((Verdict.FIREWALL, frontend))
        return frozenset(elements)

    def _configure_balancer(self, state: PortState) -> None:
        balancer = self.balancers.get(state.name)
        if balancer is None:
            balancer = Balancer(self.capacity, rng=self.rng, consistent_seed=self.consistent_seed)
            self.balancers[state.name] = balancer
        if state.affinity_timeout is None:  # most ports: no affinity, no set of usable addresses to build
            balancer.configure(None, ())
        else:
            usable = {(e.ip, e.port) for e in state.endpoints.cluster + state.endpoints.local}
            balancer.configure(state.affinity_timeout, usable)
        if balancer.affinity is not None:
            self.affine[state.name] = balancer
        else:
            self.affine.pop(state.name, None)

    def _claim(self, key: ServiceKey, frontend: Frontend, route: Route) -> bool:
        owner = self._owners.get(frontend)
        if owner is not None and owner != key:
            self.on_conflict(key, frontend, owner)
            self._waiting.setdefault(key, set()).add(frontend)
            return False
        if owner is None:
            self._owners[frontend] = key
            self._frontends_of.setdefault(key, []).append(frontend)
        self.routes[frontend] = route
        return True


def _key_order(key: ServiceKey) -> tuple[str, str]:
    return (key.namespace, key.name)


def _frontends(
    service: Service, port: ServicePort, node_addresses: tuple[str, ...]
) -> Iterable[tuple[Frontend, bool]]:
    """Every address of the Service's own families (those of its cluster IPs, as
    kube-proxy's per-family proxiers serve it): a single-stack IPv6 Service has no
    frontend on an IPv4 node address or an IPv4 external IP."""
    protocol = port.name.protocol
    families = {family_of(ip) for ip in service.cluster_ips}
    for ip in service.cluster_ips:
        yield (ip, protocol, port.port), False
    for ip in service.external_ips + service.load_balancer_ips:
        if family_of(ip) in families:
            yield (ip, protocol, port.port), True
    if port.node_port is not None:
        for ip in node_addresses:
            if family_of(ip) in families:
                yield (ip, protocol, port.node_port), True


def _firewalled(service: Service, lb_ip: str) -> bool:
    return allowed_sources(service.source_ranges, lb_ip, service.load_balancer_ips, ()) is not None


def _allows(service: Service, elements: frozenset[Element], node_ips: tuple[str, ...]) -> frozenset[Allow]:
    """The source CIDRs allowed to reach each of the Service's firewalled frontends."""
    allows: set[Allow] = set()
    for verdict, frontend in elements:
        if verdict is Verdict.FIREWALL:
            sources = allowed_sources(service.source_ranges, frontend[0], service.load_balancer_ips, node_ips) or ()
            allows.update((frontend, cidr) for cidr in sources)
    return frozenset(allows)
